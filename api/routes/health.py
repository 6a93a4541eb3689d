"""``/healthz`` (the process answers) and ``/readyz`` (database, broker and storage reachable)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.schemas import Health
from worker import dispatch
from worker.errors import ServiceError

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])
BROKER_TIMEOUT_S = 2.0


@router.get("/healthz", response_model=Health, summary="Liveness")
def healthz() -> Health:
    """The process answers (no dependency is checked)."""
    return Health(status="ok")


def _check_database(request: Request) -> None:
    with request.app.state.engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def _check_broker(request: Request) -> None:
    app = dispatch.publisher(request.app.state.settings)
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_S)


def _check_storage(request: Request) -> None:
    request.app.state.store.check()


@router.get("/readyz", response_model=Health, summary="Readiness",
            responses={503: {"model": Health, "description": "a dependency is unreachable: `checks` says which"}})
def readyz(request: Request) -> JSONResponse:
    """The database, the broker and object storage answer; 503 naming the ones that do not."""
    checks: dict[str, str] = {}
    for name, check in (("database", _check_database), ("broker", _check_broker), ("storage", _check_storage)):
        try:
            check(request)
            checks[name] = "ok"
        except ServiceError as exc:
            checks[name] = f"unavailable: {exc.message}"
        except Exception as exc:  # noqa: BLE001 — any failure means "not ready"; reported, not raised
            checks[name] = f"unavailable: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    ok = all(v == "ok" for v in checks.values())
    if not ok:
        log.warning("not ready: %s", checks)
    return JSONResponse(Health(status="ok" if ok else "unavailable", checks=checks).model_dump(),
                        status_code=200 if ok else 503)
