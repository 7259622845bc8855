"""API routes: compliance evidence (a report over a period, one machine's timeline) and the
open alerts. Read by every user; an operator or compliance user resolves an alert."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query, status

from controller import timefmt
from controller.alerts import ResolvedAlert, ResolveRequest, resolve_alert
from controller.api.deps import (
    AnyUserDep,
    IdPath,
    Principal,
    SessionDep,
    SettingsDep,
    require_roles,
)
from controller.evidence import Rules
from controller.evidence_report import (
    AlertView,
    ComplianceStatus,
    MachineTimeline,
    compliance_status,
    machine_timeline,
    open_alerts,
)
from controller.models import Role

router = APIRouter(tags=["compliance"])

SiteQuery = Annotated[str | None, Query(max_length=128, description="site name (default: all)")]
StartQuery = Annotated[
    str | None,
    Query(
        max_length=64,
        description="ISO 8601 with a zone, a date or now (see Times and periods); "
        "default 24 h before end",
    ),
]
EndQuery = Annotated[
    str | None, Query(max_length=64, description="the same form, excluded; default now")
]


def _period(start: str | None, end: str | None, now: datetime) -> tuple[datetime, datetime]:
    try:
        return timefmt.resolve_period(start, end, now=now)
    except timefmt.TimeFormatError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None


@router.get("/compliance/status", response_model=ComplianceStatus)
def read_status(
    session: SessionDep,
    settings: SettingsDep,
    _: AnyUserDep,
    site: SiteQuery = None,
    start: StartQuery = None,
    end: EndQuery = None,
) -> ComplianceStatus:
    """Fleet and per-site compliance over ``[start, end)``: time-weighted shares, incidents,
    detect-to-verified p50/p95, repeat offenders, machines non-compliant now, open alerts."""
    now = datetime.now(UTC)
    lo, hi = _period(start, end, now)
    return compliance_status(session, site, lo, hi, rules=Rules.of(settings), now=now)


@router.get("/machines/{machine_id}/compliance", response_model=MachineTimeline)
def read_timeline(
    session: SessionDep,
    settings: SettingsDep,
    _: AnyUserDep,
    machine_id: Annotated[str, Path(max_length=64, description="machine_id, MAC or IP")],
    start: StartQuery = None,
    end: EndQuery = None,
) -> MachineTimeline:
    """One machine's compliance intervals and drift incidents in ``[start, end)``."""
    lo, hi = _period(start, end, datetime.now(UTC))
    return machine_timeline(session, machine_id, lo, hi, rules=Rules.of(settings))


@router.get("/alerts", response_model=list[AlertView])
def read_alerts(
    session: SessionDep,
    _: AnyUserDep,
    site: SiteQuery = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 500,
) -> list[AlertView]:
    """Unresolved alerts, newest first: refused policy bundles, halted rollouts, repeat
    offenders and any other unresolved critical event."""
    return open_alerts(session, site, limit=limit)


@router.post("/alerts/{alert_id}/resolve", response_model=ResolvedAlert)
def resolve(
    session: SessionDep,
    who: Annotated[Principal, Depends(require_roles(Role.OPERATOR, Role.COMPLIANCE))],
    alert_id: IdPath,
    body: ResolveRequest,
) -> ResolvedAlert:
    """Mark an alert dealt with, saying how (audited); it leaves the open alerts."""
    event = resolve_alert(session, who, alert_id, body.reason)
    session.commit()
    assert event.id is not None and event.resolved_at is not None
    return ResolvedAlert(
        id=event.id, kind=event.kind, resolved_at=event.resolved_at, resolved_by=who.name
    )
