"""Users, roles and API tokens: the rules, shared by the API and the CLI.

Passwords are stored as Argon2id hashes and tokens only as SHA-256 digests. Every change is
audited in the caller's transaction; nothing secret ever goes into an audit entry. Callers
commit.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from controller.actors import Actor, record
from controller.errors import Conflict, ControllerError, NotFound, Refused
from controller.models import ApiToken, Role, User, utcnow
from controller.security import (
    MIN_PASSWORD_LENGTH,
    USER_TOKEN_PREFIX,
    hash_password,
    new_token,
    token_hash,
    verify_password,
)

log = logging.getLogger(__name__)

LOGIN_TOKEN_TTL = timedelta(hours=12)
LOGIN_TOKEN_NAME = "login"
MAX_PASSWORD_LENGTH = 1024
USER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
_USER_NAME = re.compile(USER_NAME_PATTERN)
RESERVED_NAMES = frozenset({"me"})  # /users/me is the caller, not a user called "me"


class LoginFailed(ControllerError):
    """Name or password wrong, or the user is disabled; deliberately says no more."""


@dataclass(frozen=True)
class IssuedToken:
    """A freshly made token: the secret is shown once and never stored."""

    secret: str
    row: ApiToken


# --- pure rules ---------------------------------------------------------------------------------


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a user name, or None."""
    if name in RESERVED_NAMES:
        return f"{name!r} is reserved"
    if not _USER_NAME.match(name):
        return (
            "user name must be 1-64 characters: letters, digits and . _ @ -, "
            "starting with a letter or digit"
        )
    return None


def password_problem(password: str) -> str | None:
    """Why ``password`` is not acceptable, or None."""
    if len(password) < MIN_PASSWORD_LENGTH:
        return f"password must be at least {MIN_PASSWORD_LENGTH} characters"
    if len(password) > MAX_PASSWORD_LENGTH:
        return f"password must be at most {MAX_PASSWORD_LENGTH} characters"
    return None


def leaves_no_admin(
    user: User, *, new_role: Role | None, new_disabled: bool | None, active_admins: int
) -> bool:
    """Would this change remove the last active admin (and lock everyone out of user admin)?"""
    if user.role != Role.ADMIN or user.disabled:
        return False
    stops_being_admin = (new_role is not None and new_role != Role.ADMIN) or bool(new_disabled)
    return stops_being_admin and active_admins <= 1


def user_view(user: User) -> dict[str, Any]:
    """What the audit log and the API show of a user (never the password hash)."""
    return {"name": user.name, "role": Role(user.role).value, "disabled": user.disabled}


def token_view(row: ApiToken, user_name: str) -> dict[str, Any]:
    return {
        "id": row.id,
        "user": user_name,
        "name": row.name,
        "expires_at": row.expires_at,
        "revoked": row.revoked,
    }


# --- users --------------------------------------------------------------------------------------


def get_user(session: Session, name: str) -> User:
    user = session.exec(select(User).where(User.name == name)).first()
    if user is None:
        raise NotFound(f"no user named {name!r}")
    return user


def list_users(session: Session) -> list[User]:
    return list(session.exec(select(User).order_by(col(User.name))).all())


def create_user(session: Session, actor: Actor, *, name: str, role: Role, password: str) -> User:
    """Add a user; a duplicate name is a :class:`Conflict`."""
    problem = name_problem(name) or password_problem(password)
    if problem:
        raise ControllerError(problem)
    if session.exec(select(User.id).where(User.name == name)).first() is not None:
        raise Conflict(f"user {name!r} already exists")
    user = User(name=name, role=role, password_hash=hash_password(password))
    session.add(user)
    try:
        session.flush()
    except IntegrityError:  # a concurrent create won the race
        raise Conflict(f"user {name!r} already exists") from None
    record(
        session, actor, action="user.create", entity="user", entity_id=name, after=user_view(user)
    )
    return user


def update_user(
    session: Session,
    actor: Actor,
    name: str,
    *,
    role: Role | None = None,
    disabled: bool | None = None,
    password: str | None = None,
) -> User:
    """Change role, enable/disable, or reset the password; refuses to remove the last admin.

    Disabling a user also revokes all their tokens, so re-enabling needs a fresh login.
    """
    user = get_user(session, name)
    if password is not None and (problem := password_problem(password)):
        raise ControllerError(problem)
    active_admins = len(
        session.exec(
            select(User.id).where(User.role == Role.ADMIN, col(User.disabled).is_(False))
        ).all()
    )
    if leaves_no_admin(user, new_role=role, new_disabled=disabled, active_admins=active_admins):
        raise Refused(f"{name!r} is the last active admin; make another admin first")
    before = user_view(user)
    if role is not None:
        user.role = role
    if disabled is not None:
        user.disabled = disabled
    if password is not None:
        user.password_hash = hash_password(password)
    after = user_view(user)
    if password is not None:
        after["password_changed"] = True
    if after == before:
        return user
    session.add(user)
    revoked = 0
    if disabled:
        revoked = _revoke_all(session, user)
    if revoked:
        after["tokens_revoked"] = revoked
    record(
        session,
        actor,
        action="user.update",
        entity="user",
        entity_id=name,
        before=before,
        after=after,
    )
    return user


def _revoke_all(session: Session, user: User) -> int:
    live = session.exec(
        select(ApiToken).where(ApiToken.user_id == user.id, col(ApiToken.revoked).is_(False))
    ).all()
    for row in live:
        row.revoked = True
        session.add(row)
    return len(live)


# --- logging in and tokens ----------------------------------------------------------------------


@cache
def _decoy_hash() -> str:
    """Verified against when the name is unknown, so timing does not tell names apart."""
    return hash_password("decoy password that matches nothing")


def check_password(session: Session, name: str, password: str) -> User | None:
    """The enabled user ``name`` if ``password`` is theirs, else None; the same work whether
    the name exists or not. The one password check for the API's login and the console."""
    # A name no user can have (a NUL, a lone surrogate) is not looked up: drivers refuse them.
    user = None
    if name_problem(name) is None:
        user = session.exec(select(User).where(User.name == name)).first()
    if user is None:
        verify_password(_decoy_hash(), password)
        return None
    if verify_password(user.password_hash, password) and not user.disabled:
        return user
    return None


def login(session: Session, *, name: str, password: str, source: str) -> IssuedToken:
    """Check a name and password and issue a session token (expires after LOGIN_TOKEN_TTL)."""
    user = check_password(session, name, password)
    if user is None:
        log.warning("failed login for user name %r from %s", name[:64], source)
        raise LoginFailed("invalid name or password")
    issued = _issue(session, user, LOGIN_TOKEN_NAME, utcnow() + LOGIN_TOKEN_TTL)
    record(
        session,
        _Self(user.name, source),
        action="auth.login",
        entity="api_token",
        entity_id=str(issued.row.id),
        after=token_view(issued.row, user.name),
    )
    return issued


@dataclass(frozen=True)
class _Self:
    name: str
    source: str
    kind: str = "user"


def create_api_token(
    session: Session, actor: Actor, user_id: int, *, name: str, expires_in: timedelta | None
) -> IssuedToken:
    """A named token for scripts, acting as its user; ``expires_in=None`` never expires."""
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"no user with id {user_id}")
    expires_at = None if expires_in is None else utcnow() + expires_in
    issued = _issue(session, user, name, expires_at)
    record(
        session,
        actor,
        action="api_token.create",
        entity="api_token",
        entity_id=str(issued.row.id),
        after=token_view(issued.row, user.name),
    )
    return issued


def list_api_tokens(session: Session, user_id: int, *, include_inactive: bool) -> list[ApiToken]:
    """The user's tokens, newest first; by default only those that still work."""
    query = select(ApiToken).where(ApiToken.user_id == user_id)
    if not include_inactive:
        now = utcnow()
        query = query.where(
            col(ApiToken.revoked).is_(False),
            (col(ApiToken.expires_at).is_(None)) | (col(ApiToken.expires_at) > now),
        )
    return list(session.exec(query.order_by(col(ApiToken.id).desc())).all())


def revoke_api_token(session: Session, actor: Actor, user_id: int, token_id: int) -> ApiToken:
    """Revoke one of the user's own tokens; someone else's token is reported as not found."""
    row = session.get(ApiToken, token_id)
    user = session.get(User, user_id)
    if row is None or user is None or row.user_id != user_id:
        raise NotFound(f"no token {token_id} of yours")
    if row.revoked:
        return row
    before = token_view(row, user.name)
    row.revoked = True
    session.add(row)
    record(
        session,
        actor,
        action="api_token.revoke",
        entity="api_token",
        entity_id=str(token_id),
        before=before,
        after=token_view(row, user.name),
    )
    return row


def _issue(session: Session, user: User, name: str, expires_at: datetime | None) -> IssuedToken:
    assert user.id is not None
    secret = new_token(USER_TOKEN_PREFIX)
    row = ApiToken(user_id=user.id, name=name, token_hash=token_hash(secret), expires_at=expires_at)
    session.add(row)
    session.flush()
    return IssuedToken(secret=secret, row=row)
