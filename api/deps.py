"""Request dependencies: settings, a database session, the object store and the caller's tenant.

Owns: ``Annotated`` aliases the routes take as parameters, and Bearer-key authentication
(``Authorization: Bearer bj_…`` → the key's tenant; anything else is a 401). Leaves key storage
to ``worker.tenants``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from worker import tenants
from worker.errors import Unauthorized
from worker.models import Tenant
from worker.settings import Settings
from worker.storage import ResultStore

_bearer = HTTPBearer(auto_error=False, description="API key issued by `bagel-jobs tenants create-key`")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> ResultStore:
    return request.app.state.store


def get_session(request: Request) -> Iterator[Session]:
    session = request.app.state.sessions()
    try:
        yield session
    finally:
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
