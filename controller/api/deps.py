"""Request dependencies: the database session and who is asking (user or agent), role checks.

Every route depends on one of :func:`require_roles`, :func:`require_agent` or
:func:`require_any_user`; there are no anonymous routes except ``/healthz`` and agent
enrollment (which is authenticated by its one-time token).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Query, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from controller.models import Agent, ApiToken, Role, User
from controller.security import AGENT_SECRET_PREFIX, token_hash
from controller.settings import Settings


@dataclass(frozen=True)
class Principal:
    """Who is making a request."""

    kind: str  # "user" or "agent"
    name: str
    role: Role | None = None
    user_id: int | None = None
    agent_id: str | None = None
    site_id: int | None = None
    source: str = ""


def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    """One session per request; routes commit explicitly, anything else is rolled back."""
    with Session(get_engine(request), expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]

# Integers in paths and queries are row ids, versions and cursors, kept in INTEGER columns: 32
# bits on PostgreSQL (64 on SQLite). A larger number reached the driver as an overflow (a 500).
MAX_SQL_INT = 2**31 - 1
IdPath = Annotated[int, Path(ge=1, le=MAX_SQL_INT)]
CursorQuery = Annotated[
    int | None, Query(ge=0, le=MAX_SQL_INT, description="next_cursor of the last page")
]

SettingsDep = Annotated[Settings, Depends(get_settings)]


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"}
    )


BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="A user's token from POST /api/v1/auth/token or /api/v1/users/me/tokens, "
    "or an agent's credential from enrollment.",
)
"""Declares the scheme in the OpenAPI document; the checks are :func:`authenticate`'s."""


def authenticate(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
) -> Principal:
    """Resolve the bearer token to a user (via an API token) or an agent (via its secret)."""
    if credentials is None or not credentials.credentials.strip():
        raise _unauthorized("missing bearer token")
    token = credentials.credentials.strip()
    digest = token_hash(token)
    source = request.client.host if request.client else ""
    now = datetime.now(UTC)
    if token.startswith(AGENT_SECRET_PREFIX):
        agent = session.exec(select(Agent).where(Agent.secret_hash == digest)).first()
        if agent is None or agent.disabled:
            raise _unauthorized("unknown or disabled agent credential")
        return Principal(
            kind="agent",
            name=f"agent:{agent.name}",
            agent_id=agent.id,
            site_id=agent.site_id,
            source=source,
        )
    api_token = session.exec(select(ApiToken).where(ApiToken.token_hash == digest)).first()
    if api_token is None or api_token.revoked:
        raise _unauthorized("unknown or revoked token")
    if api_token.expires_at is not None and api_token.expires_at <= now:
        raise _unauthorized("token expired")
    user = session.get(User, api_token.user_id)
    if user is None or user.disabled:
        raise _unauthorized("user disabled")
    return Principal(
        kind="user", name=user.name, role=Role(user.role), user_id=user.id, source=source
    )


PrincipalDep = Annotated[Principal, Depends(authenticate)]


def require_roles(*roles: Role, admin_passes: bool = True) -> Callable[[Principal], Principal]:
    """A dependency that lets through users with one of ``roles``. Admin passes too, unless
    ``admin_passes`` is False (evidence for an inspector is for the compliance roles only)."""
    allowed = set(roles) | ({Role.ADMIN} if admin_passes else set())

    def check(principal: PrincipalDep) -> Principal:
        if principal.kind != "user" or principal.role not in allowed:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                detail=f"requires role {' or '.join(sorted(r.value for r in allowed))}",
            )
        return principal

    return check


def require_any_user(principal: PrincipalDep) -> Principal:
    if principal.kind != "user":
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="requires a user")
    return principal


def require_agent(principal: PrincipalDep) -> Principal:
    if principal.kind != "agent":
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="requires an agent credential")
    return principal


AgentDep = Annotated[Principal, Depends(require_agent)]
AnyUserDep = Annotated[Principal, Depends(require_any_user)]
