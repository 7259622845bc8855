"""Resolving an alert: a person says it was dealt with, and why; the audit log keeps both.

An alert is an unresolved event the controller shows in ``alerts`` (a refused policy bundle, a
halted rollout, a repeat offender, any critical event). Resolving does not delete anything: the
event keeps its facts and gains ``resolved_at``; a new occurrence raises a new alert.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session

from controller.actors import Actor, record
from controller.errors import Conflict, NotFound
from controller.evidence import ALERT_KINDS
from controller.models import RegisterEvent, utcnow


class ResolveRequest(BaseModel):
    model_config = ConfigDict(str_strip_whitespace=True, extra="forbid")

    reason: str = Field(min_length=1, max_length=1024, description="what was done about it")


class ResolvedAlert(BaseModel):
    id: int
    kind: str
    resolved_at: datetime
    resolved_by: str


def is_alert(event: RegisterEvent) -> bool:
    return event.kind in ALERT_KINDS or event.severity == "critical"


def resolve_alert(session: Session, actor: Actor, alert_id: int, reason: str) -> RegisterEvent:
    """Mark alert ``alert_id`` resolved by ``actor`` with ``reason`` (audited)."""
    event = session.get(RegisterEvent, alert_id)
    if event is None or not is_alert(event):
        raise NotFound(f"no alert {alert_id}")
    if event.resolved_at is not None:
        raise Conflict(f"alert {alert_id} was already resolved at {event.resolved_at.isoformat()}")
    event.resolved_at = utcnow()
    session.add(event)
    record(
        session,
        actor,
        action="alert.resolve",
        entity="event",
        entity_id=str(alert_id),
        before={"kind": event.kind, "detail": event.detail, "resolved_at": None},
        after={"resolved_at": event.resolved_at.isoformat()},
        reason=reason,
    )
    return event
