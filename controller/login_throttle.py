"""Login throttling: too many failed logins for one name, or from one address, within a window
lock that name or address out for a while (the API answers 429 with Retry-After).

Failures and lockouts live in the database, so every replica behind a load balancer counts
the same attempts, and the start of a lockout is audited once, by whichever replica wins the
row. While locked out, a login is refused before its password is checked: the right password
works only after the lockout ends. Counting restarts after a lockout, and a successful login
clears its name's failures. Callers commit, on failure too (the failure must be kept).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, or_, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from controller import accounts
from controller.actors import record
from controller.errors import ControllerError
from controller.models import LoginFailure, LoginLockout, utcnow
from controller.settings import Settings

USER, ADDRESS = "user", "address"


@dataclass(frozen=True)
class ThrottlePolicy:
    """How many failures within ``window`` lock a name or an address out, and for how long."""

    max_per_user: int = 5
    max_per_address: int = 20
    window: timedelta = timedelta(minutes=15)
    lockout: timedelta = timedelta(minutes=15)

    @classmethod
    def of(cls, settings: Settings) -> ThrottlePolicy:
        return cls(
            max_per_user=settings.login_max_failures_per_user,
            max_per_address=settings.login_max_failures_per_address,
            window=timedelta(seconds=settings.login_failure_window_s),
            lockout=timedelta(seconds=settings.login_lockout_s),
        )


class LoginThrottled(ControllerError):
    """Logins for this name or from this address are refused until the lockout ends."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"too many failed logins; try again in {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class _Throttle:
    """The audit actor of a lockout: the controller itself, on a request from ``source``."""

    source: str
    name: str = "login-throttle"
    kind: str = "system"


# --- pure rules ---------------------------------------------------------------------------------


def name_key(name: str) -> str:
    """The stored form of a name tried: a digest (whatever was typed, even a lone surrogate)."""
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()


def retry_after_s(until: datetime, now: datetime) -> int:
    """Whole seconds until ``until``, at least 1 (what Retry-After says)."""
    return max(1, math.ceil((until - now).total_seconds()))


def shown_name(name: str) -> str:
    """The name as the audit log shows it: only names a user could have."""
    return name if accounts.name_problem(name) is None else "(not a valid user name)"


# --- the throttle -------------------------------------------------------------------------------


def check(session: Session, name: str, source: str, now: datetime) -> None:
    """Raise :class:`LoginThrottled` while ``name`` or ``source`` is locked out."""
    until = session.exec(
        select(func.max(LoginLockout.until)).where(
            or_(
                and_(col(LoginLockout.kind) == USER, col(LoginLockout.key) == name_key(name)),
                and_(col(LoginLockout.kind) == ADDRESS, col(LoginLockout.key) == source),
            ),
            col(LoginLockout.until) > now,
        )
    ).one()
    if until is not None:
        # max() comes back naive from SQLite; lockouts are stored in UTC.
        until = until if until.tzinfo is not None else until.replace(tzinfo=now.tzinfo)
        raise LoginThrottled(retry_after_s(until, now))


def record_failure(
    session: Session, policy: ThrottlePolicy, name: str, source: str, now: datetime
) -> list[str]:
    """Keep one failed login; lock out its name and/or address when they reach the limit.

    Returns what was newly locked out (``user``, ``address``), each audited once.
    """
    key = name_key(name)
    session.add(LoginFailure(name_key=key, source=source, at=now))
    session.exec(delete(LoginFailure).where(col(LoginFailure.at) < now - policy.window))
    session.flush()
    locked = []
    for kind, lock_key, limit, column in (
        (USER, key, policy.max_per_user, col(LoginFailure.name_key)),
        (ADDRESS, source, policy.max_per_address, col(LoginFailure.source)),
    ):
        since = now - policy.window
        last = session.exec(
            select(LoginLockout.until).where(
                LoginLockout.kind == kind, LoginLockout.key == lock_key
            )
        ).first()
        if last is not None and last > since:
            since = last  # failures before the end of the last lockout were paid for
        failures = session.exec(
            select(func.count())
            .select_from(LoginFailure)
            .where(column == lock_key, col(LoginFailure.at) >= since)
        ).one()
        if failures < limit:
            continue
        until = now + policy.lockout
        if not _start_lockout(session, kind, lock_key, now, until):
            continue  # another request (or replica) started it
        locked.append(kind)
        record(
            session,
            _Throttle(source),
            action="auth.lockout",
            entity=kind,
            entity_id=shown_name(name) if kind == USER else source,
            after={
                "until": until.isoformat(),
                "failures": failures,
                "window_s": int(policy.window.total_seconds()),
                "source": source,
            },
        )
    return locked


def _start_lockout(session: Session, kind: str, key: str, now: datetime, until: datetime) -> bool:
    """Start a lockout unless one is running; True when this call started it."""
    renewed: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        update(LoginLockout)
        .where(
            col(LoginLockout.kind) == kind,
            col(LoginLockout.key) == key,
            col(LoginLockout.until) <= now,
        )
        .values(started_at=now, until=until)
    )
    if renewed.rowcount:
        return True
    exists = session.exec(
        select(LoginLockout.id).where(LoginLockout.kind == kind, LoginLockout.key == key)
    ).first()
    if exists is not None:
        return False
    try:
        with session.begin_nested():
            session.add(LoginLockout(kind=kind, key=key, started_at=now, until=until))
    except IntegrityError:
        return False
    return True


def record_success(session: Session, name: str) -> None:
    """The password was right: this name's earlier failures no longer count."""
    session.exec(delete(LoginFailure).where(col(LoginFailure.name_key) == name_key(name)))


def login(
    session: Session,
    policy: ThrottlePolicy,
    *,
    name: str,
    password: str,
    source: str,
    now: datetime | None = None,
) -> accounts.IssuedToken:
    """:func:`accounts.login` behind the throttle. Raises :class:`LoginThrottled` (password not
    checked) or :class:`accounts.LoginFailed` (failure recorded); the caller commits either way.
    """
    now = now or utcnow()
    source = source[:128]
    check(session, name, source, now)
    try:
        issued = accounts.login(session, name=name, password=password, source=source)
    except accounts.LoginFailed:
        record_failure(session, policy, name, source, now)
        raise
    record_success(session, name)
    return issued
