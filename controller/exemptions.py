"""Time-boxed exemptions of one machine from pool enforcement.

Requested with a reason and an end (at most :data:`MAX_EXEMPTION` ahead) by an operator,
compliance user or admin; in force only once a compliance user *other than the requester*
approved it, and only between its start and end; revocable at any time. Only such current
exemptions reach the policy bundle. Every step is audited; callers commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import update
from sqlmodel import Session, col, select

from controller import timefmt
from controller.actors import record
from controller.errors import Conflict, ControllerError, NotFound, Refused
from controller.models import Exemption, Machine, Site, utcnow
from controller.pool_policy import DECIDERS, PROPOSERS, RoledActor
from controller.register import find_machine
from controller.sites import get_site

MAX_EXEMPTION = timedelta(days=30)


class ExemptionState(StrEnum):
    PENDING = "pending"  # waiting for a compliance user
    SCHEDULED = "scheduled"  # approved, starts later
    ACTIVE = "active"
    EXPIRED = "expired"
    REVOKED = "revoked"


@dataclass(frozen=True)
class CurrentExemption:
    ends_at: datetime
    reason: str


# --- pure rules ---------------------------------------------------------------------------------


def exemption_state(row: Exemption, now: datetime) -> ExemptionState:
    if row.revoked_at is not None:
        return ExemptionState.REVOKED
    if row.ends_at <= now:
        return ExemptionState.EXPIRED
    if row.approved_at is None:
        return ExemptionState.PENDING
    if now < row.starts_at:
        return ExemptionState.SCHEDULED
    return ExemptionState.ACTIVE


def window_problem(starts_at: datetime, ends_at: datetime, now: datetime) -> str | None:
    """Why an exemption from ``starts_at`` to ``ends_at`` cannot be requested at ``now``."""
    if ends_at <= now:
        return f"the end {ends_at:%Y-%m-%d %H:%M} UTC is not in the future"
    if ends_at <= starts_at:
        return "the end must be after the start"
    if ends_at - max(starts_at, now) > MAX_EXEMPTION:
        return f"an exemption may last at most {MAX_EXEMPTION.days} days"
    if starts_at - now > MAX_EXEMPTION:
        return f"an exemption may start at most {MAX_EXEMPTION.days} days ahead"
    return None


class ExemptionRequest(BaseModel):
    model_config = ConfigDict(str_strip_whitespace=True, extra="forbid")

    reason: str = Field(min_length=1, max_length=1024)
    ends_at: timefmt.Instant = Field(
        description="when enforcement resumes (at most 30 days); see Times and periods"
    )
    starts_at: timefmt.Instant | None = Field(default=None, description="default: now")


class RevokeRequest(BaseModel):
    model_config = ConfigDict(str_strip_whitespace=True, extra="forbid")

    reason: str = Field(min_length=1, max_length=1024)


class ExemptionPublic(BaseModel):
    id: int
    machine_id: str
    site: str | None
    state: ExemptionState
    reason: str
    starts_at: datetime
    ends_at: datetime
    requested_by: str
    requested_at: datetime
    approved_by: str | None
    approved_at: datetime | None
    revoked_by: str | None
    revoked_at: datetime | None


def _public(row: Exemption, machine_id: str, site: str | None, now: datetime) -> ExemptionPublic:
    assert row.id is not None
    return ExemptionPublic(
        id=row.id,
        machine_id=machine_id,
        site=site,
        state=exemption_state(row, now),
        reason=row.reason,
        starts_at=row.starts_at,
        ends_at=row.ends_at,
        requested_by=row.requested_by,
        requested_at=row.requested_at,
        approved_by=row.approved_by,
        approved_at=row.approved_at,
        revoked_by=row.revoked_by,
        revoked_at=row.revoked_at,
    )


def _audit_view(view: ExemptionPublic) -> dict[str, Any]:
    return view.model_dump(mode="json")


# --- services -----------------------------------------------------------------------------------


def _site_name(session: Session, site_id: int | None) -> str | None:
    site = session.get(Site, site_id) if site_id is not None else None
    return site.name if site is not None else None


def _load(
    session: Session, exemption_id: int, machine_ref: str | None
) -> tuple[Exemption, Machine]:
    row = session.get(Exemption, exemption_id)
    machine = session.get(Machine, row.machine_pk) if row is not None else None
    if row is None or machine is None:
        raise NotFound(f"no exemption {exemption_id}")
    if machine_ref is not None and find_machine(session, machine_ref).id != machine.id:
        raise NotFound(f"exemption {exemption_id} is not for machine {machine_ref}")
    return row, machine


def request(
    session: Session,
    actor: RoledActor,
    machine_ref: str,
    req: ExemptionRequest,
    now: datetime | None = None,
) -> ExemptionPublic:
    """Ask for an exemption; it is not in force until a compliance user approves it."""
    if actor.role not in PROPOSERS:
        raise Refused("requesting an exemption needs the role admin, compliance or operator")
    now = now or utcnow()
    machine = find_machine(session, machine_ref)
    starts_at = req.starts_at or now
    if problem := window_problem(starts_at, req.ends_at, now):
        raise ControllerError(problem)
    assert machine.id is not None
    row = Exemption(
        machine_pk=machine.id,
        reason=req.reason,
        starts_at=starts_at,
        ends_at=req.ends_at,
        requested_by=actor.name,
        requested_at=now,
    )
    session.add(row)
    session.flush()
    view = _public(row, machine.machine_id, _site_name(session, machine.site_id), now)
    record(
        session,
        actor,
        action="exemption.request",
        entity="exemption",
        entity_id=str(row.id),
        after=_audit_view(view),
        reason=req.reason,
    )
    return view


def approve(
    session: Session,
    actor: RoledActor,
    exemption_id: int,
    machine_ref: str | None = None,
    now: datetime | None = None,
) -> ExemptionPublic:
    """Put an exemption in force: a compliance user other than the requester."""
    now = now or utcnow()
    row, machine = _load(session, exemption_id, machine_ref)
    if actor.name == row.requested_by:
        raise Refused(f"{actor.name} requested exemption {exemption_id} and cannot approve it")
    if actor.role not in DECIDERS:
        role = actor.role.value if actor.role else "no role"
        raise Refused(f"approving an exemption needs the compliance role ({actor.name} has {role})")
    state = exemption_state(row, now)
    if state is not ExemptionState.PENDING:
        raise Conflict(f"exemption {exemption_id} is {state.value}; only a pending one is approved")
    site = _site_name(session, machine.site_id)
    before = _public(row, machine.machine_id, site, now)
    result = session.exec(
        update(Exemption)
        .where(
            col(Exemption.id) == row.id,
            col(Exemption.approved_at).is_(None),
            col(Exemption.revoked_at).is_(None),
        )
        .values(approved_by=actor.name, approved_at=now)
    )
    if result.rowcount != 1:
        raise Conflict(f"exemption {exemption_id} was changed meanwhile; look again")
    session.refresh(row)
    after = _public(row, machine.machine_id, site, now)
    record(
        session,
        actor,
        action="exemption.approve",
        entity="exemption",
        entity_id=str(row.id),
        before=_audit_view(before),
        after=_audit_view(after),
    )
    return after


def revoke(
    session: Session,
    actor: RoledActor,
    exemption_id: int,
    reason: str,
    machine_ref: str | None = None,
    now: datetime | None = None,
) -> ExemptionPublic:
    """End an exemption now (or cancel a pending one); enforcement resumes with the next bundle."""
    if actor.role not in PROPOSERS:
        raise Refused("revoking an exemption needs the role admin, compliance or operator")
    if not reason.strip():
        raise ControllerError("give a reason for revoking an exemption")
    now = now or utcnow()
    row, machine = _load(session, exemption_id, machine_ref)
    state = exemption_state(row, now)
    if state in (ExemptionState.REVOKED, ExemptionState.EXPIRED):
        raise Conflict(f"exemption {exemption_id} is already {state.value}")
    site = _site_name(session, machine.site_id)
    before = _public(row, machine.machine_id, site, now)
    result = session.exec(
        update(Exemption)
        .where(col(Exemption.id) == row.id, col(Exemption.revoked_at).is_(None))
        .values(revoked_by=actor.name, revoked_at=now)
    )
    if result.rowcount != 1:
        raise Conflict(f"exemption {exemption_id} was revoked meanwhile")
    session.refresh(row)
    after = _public(row, machine.machine_id, site, now)
    record(
        session,
        actor,
        action="exemption.revoke",
        entity="exemption",
        entity_id=str(row.id),
        before=_audit_view(before),
        after=_audit_view(after),
        reason=reason,
    )
    return after


def list_exemptions(
    session: Session,
    *,
    site: str | None = None,
    state: ExemptionState | None = None,
    now: datetime | None = None,
) -> list[ExemptionPublic]:
    """Exemptions (newest first), optionally of one site and/or in one state."""
    now = now or utcnow()
    query = (
        select(Exemption, Machine.machine_id, Site.name)
        .join(Machine, col(Machine.id) == Exemption.machine_pk)
        .join(Site, col(Site.id) == Machine.site_id, isouter=True)
        .order_by(col(Exemption.id).desc())
    )
    if site is not None:
        query = query.where(Machine.site_id == get_site(session, site).id)
    views = [_public(row, machine_id, name, now) for row, machine_id, name in session.exec(query)]
    return [v for v in views if state is None or v.state is state]


def current_exemptions(
    session: Session, site_id: int, now: datetime
) -> dict[int, CurrentExemption]:
    """Approved, unrevoked exemptions in force at ``now`` for the site's machines (one query),
    keyed by machine primary key; of several, the one that lasts longest."""
    rows = session.exec(
        select(Exemption)
        .join(Machine, col(Machine.id) == Exemption.machine_pk)
        .where(
            Machine.site_id == site_id,
            col(Exemption.approved_at).is_not(None),
            col(Exemption.revoked_at).is_(None),
            col(Exemption.starts_at) <= now,
            col(Exemption.ends_at) > now,
        )
    )
    found: dict[int, CurrentExemption] = {}
    for row in rows:
        best = found.get(row.machine_pk)
        if best is None or row.ends_at > best.ends_at:
            found[row.machine_pk] = CurrentExemption(ends_at=row.ends_at, reason=row.reason)
    return found
