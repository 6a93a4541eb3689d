"""Request dependencies: settings, a database session, the object store and the caller's tenant.

Owns: ``Annotated`` aliases the routes take as parameters, Bearer-key authentication
(``Authorization: Bearer bj_…`` → the key's tenant; anything else is a 401), and refusing
control characters in path parameters (every route, as an app dependency). Leaves key storage
to ``worker.tenants`` and the checks of query parameters to their types and ``worker.queries``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from worker import tenants
from worker.errors import Unauthorized
from worker.models import Tenant
from worker.params import check_text
from worker.settings import Settings
from worker.storage import ResultStore

_bearer = HTTPBearer(auto_error=False, description="API key issued by `bagel-jobs key create`")


async def refuse_control_characters_in_path(request: Request) -> None:
    """A 422 naming the parameter for a path parameter with a C0 control character (``/v1/jobs/%00``):
    no id holds one, and Postgres refuses a NUL even in a lookup. ``async``: no I/O, no thread hop."""
    for name, value in request.path_params.items():
        check_text(value, name, allow_whitespace=False)


# The plain lookups are ``async def``: FastAPI runs a sync dependency in its thread pool, a hop
# that costs more than the lookup (and, with dozens of threads, a wait for the GIL).
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> ResultStore:
    return request.app.state.store


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session for the request. Making one does no I/O; closing one whose transaction ended
    (committed) does none either, so only a rollback is sent to the thread pool."""
    session = request.app.state.sessions()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[ResultStore, Depends(get_store)]
SessionDep = Annotated[Session, Depends(get_session)]


def current_tenant(session: SessionDep,
                   credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Tenant:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("Authorization: missing 'Bearer <api key>' header", field="Authorization")
    tenant = tenants.authenticate(session, credentials.credentials)
    if tenant is None:
        raise Unauthorized("Authorization: the API key is unknown or revoked", field="Authorization")
    return tenant


TenantDep = Annotated[Tenant, Depends(current_tenant)]
