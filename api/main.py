"""The API application factory.

Owns: building the FastAPI app for one ``Settings`` — database engine and sessions, object
store, error handlers, request body limits, routers, OpenAPI docs at ``/docs`` — and disposing
of them on shutdown.
Leaves logging configuration and serving (uvicorn) to the CLI (``bagel-jobs api``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from api import contract, deps, errors, events, metrics
from api.body_limit import BodyLimitMiddleware, BodyLimits
from api.routes import adapters, batches, files, gallery, health, jobs, objects, provenance, sessions, usage, webhooks
from worker.db import make_engine, session_factory
from worker.settings import Settings, load_settings
from worker.storage import make_store

DESCRIPTION = """
BAGEL-7B-MoT image generation, editing, understanding and product try-on as asynchronous jobs.

Upload input images to `/v1/files`, submit a job (`/v1/jobs`) or a batch (`/v1/batches`), then poll
or receive a signed webhook. Authenticate with `Authorization: Bearer <api key>`. Every creating
POST accepts an `Idempotency-Key` header. Errors are `{"error": {"code", "message", "field"}}`.
"""


def create_app(settings: Settings) -> FastAPI:
    engine = make_engine(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.dispose()

    app = FastAPI(title="bagel-jobs", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
                  dependencies=[Depends(deps.refuse_control_characters_in_path)],
                  generate_unique_id_function=contract.operation_id, openapi_tags=contract.TAGS)
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = session_factory(engine)
    app.state.store = make_store(settings)
    errors.install(app)
    for module in (files, adapters, jobs, provenance, batches, sessions, gallery, usage, webhooks, objects,
                       health):
        app.include_router(module.router)
    events.install(app)
    contract.finish_document(app, settings)
    # Inside the metrics middleware, so that its 413s are counted too.
    app.add_middleware(BodyLimitMiddleware, limits=BodyLimits.from_settings(settings))
    # Observability: request-duration middleware and GET /metrics (no API key; cluster network).
    metrics.install(app)
    return app


def app_from_env() -> FastAPI:
    """For ``uvicorn --factory api.main:app_from_env``: settings from the environment."""
    return create_app(load_settings())
