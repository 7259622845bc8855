"""Compliance evidence, read back: a fleet/site report over a period, one machine's timeline
and the open alerts (API, CLI and exports share these).

Shares are time-weighted over the intervals ``controller.evidence`` keeps, clipped to the
period. An open interval only counts until ``Rules.stale_after`` past the machine's latest
poll: after that nobody knows, so the rest is ``unknown``. Incidents are those detected in the
period; detect-to-verified percentiles are nearest-rank over the incidents verified by its end.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel
from sqlalchemy import func, or_, select
from sqlmodel import Session

from contract import PoolStatus
from controller.compliance_logic import (
    FAILED,
    VERIFIED,
    clipped_seconds,
    is_repeat_offender,
    percentile,
)
from controller.errors import NotFound
from controller.evidence import ALERT_KINDS, Rules
from controller.register import find_machine
from controller.tables import AGENT, EVENT, INCIDENT, INTERVAL, LATEST, MACHINE, SITE


class IntervalView(BaseModel):
    status: str
    cause: str
    started_at: datetime
    ended_at: datetime | None
    pool_set_version: int | None


class IncidentView(BaseModel):
    id: int
    detected_at: datetime
    problems: list[str]
    observed: list[dict[str, Any]]
    action: str
    action_at: datetime | None
    verified_at: datetime | None
    outcome: str
    cause: str
    attempts: int
    after_reboot: bool
    closed_at: datetime | None
    detect_to_verified_s: float | None


class MachineTimeline(BaseModel):
    machine_id: str
    site: str | None
    start: datetime
    end: datetime
    current_status: str | None
    repeat_offender: bool
    intervals: list[IntervalView]
    incidents: list[IncidentView]


class AlertView(BaseModel):
    id: int
    at: datetime
    kind: str
    severity: str
    detail: str
    machine_id: str | None
    agent_id: str | None
    ip: str | None
    site: str | None
    data: dict[str, Any]


class ComplianceStats(BaseModel):
    """Shares are percentages of the machine-time tracked in the period."""

    site: str | None = None
    machines_tracked: int = 0
    tracked_hours: float = 0.0
    compliant_pct: float = 0.0
    non_compliant_pct: float = 0.0
    unknown_pct: float = 0.0
    exempt_pct: float = 0.0
    incidents_opened: int = 0
    incidents_verified: int = 0
    incidents_failed: int = 0
    incidents_open: int = 0
    detect_to_verified_p50_s: float | None = None
    detect_to_verified_p95_s: float | None = None
    repeat_offenders: list[str] = []
    non_compliant_now: list[str] = []
    open_alerts: int = 0


class ComplianceStatus(BaseModel):
    start: datetime
    end: datetime
    fleet: ComplianceStats
    sites: list[ComplianceStats]
    alerts: list[AlertView]


@dataclass
class _Acc:
    """Per-site accumulator."""

    seconds: dict[str, float]
    machines: set[int]
    detect_to_verified: list[float]
    offenders: set[str]
    now_bad: set[str]
    opened: int = 0
    verified: int = 0
    failed: int = 0
    open: int = 0
    alerts: int = 0

    @classmethod
    def empty(cls) -> _Acc:
        return cls(defaultdict(float), set(), [], set(), set())

    def stats(self, site: str | None) -> ComplianceStats:
        total = sum(self.seconds.values())

        def pct(status: PoolStatus) -> float:
            return round(100 * self.seconds.get(status.value, 0.0) / total, 3) if total else 0.0

        return ComplianceStats(
            site=site,
            machines_tracked=len(self.machines),
            tracked_hours=round(total / 3600, 3),
            compliant_pct=pct(PoolStatus.COMPLIANT),
            non_compliant_pct=pct(PoolStatus.NON_COMPLIANT),
            unknown_pct=pct(PoolStatus.UNKNOWN),
            exempt_pct=pct(PoolStatus.EXEMPT),
            incidents_opened=self.opened,
            incidents_verified=self.verified,
            incidents_failed=self.failed,
            incidents_open=self.open,
            detect_to_verified_p50_s=percentile(self.detect_to_verified, 50),
            detect_to_verified_p95_s=percentile(self.detect_to_verified, 95),
            repeat_offenders=sorted(self.offenders),
            non_compliant_now=sorted(self.now_bad),
            open_alerts=self.alerts,
        )


def _site_id(session: Session, name: str) -> int:
    site_id = session.connection().execute(select(SITE.c.id).where(SITE.c.name == name)).scalar()
    if site_id is None:
        raise NotFound(f"no site named {name!r}")
    return int(site_id)


def _open_end(last_poll: datetime | None, hi: datetime, stale_after: timedelta) -> datetime:
    """Where an open interval's status stops being known: ``stale_after`` past the last poll."""
    if last_poll is None:
        return hi
    return min(hi, last_poll + stale_after)


def compliance_status(
    session: Session,
    site: str | None,
    start: datetime,
    end: datetime,
    *,
    rules: Rules | None = None,
    now: datetime | None = None,
) -> ComplianceStatus:
    """Fleet and per-site compliance over ``[start, end)`` (time after ``now`` is not counted).

    An open interval counts until ``stale_after`` past the machine's latest poll; the rest of
    the period is ``unknown`` (no report). Incidents are those detected in the period.
    """
    rules = rules or Rules()
    now = now or datetime.now(UTC)
    hi = min(end, now)
    conn = session.connection()
    site_filter = _site_id(session, site) if site else None
    names = dict(conn.execute(select(SITE.c.id, SITE.c.name)).tuples().all())
    machine_filter = [MACHINE.c.site_id == site_filter] if site_filter is not None else []

    acc: dict[int | None, _Acc] = defaultdict(_Acc.empty)
    joined = INTERVAL.join(MACHINE, MACHINE.c.id == INTERVAL.c.machine_pk).outerjoin(
        LATEST, LATEST.c.machine_pk == INTERVAL.c.machine_pk
    )
    for row in conn.execute(
        select(
            INTERVAL.c.machine_pk,
            INTERVAL.c.status,
            INTERVAL.c.started_at,
            INTERVAL.c.ended_at,
            INTERVAL.c.checked_at,
            MACHINE.c.site_id,
            MACHINE.c.machine_id,
            LATEST.c.observed_at,
        )
        .select_from(joined)
        .where(
            INTERVAL.c.started_at < hi,
            or_(INTERVAL.c.ended_at.is_(None), INTERVAL.c.ended_at > start),
            *machine_filter,
        )
    ):
        a = acc[row.site_id]
        a.machines.add(row.machine_pk)
        if row.ended_at is not None:
            a.seconds[row.status] += clipped_seconds(row.started_at, row.ended_at, start, hi)
            continue
        # the newest poll that confirmed it (the same rule as the compliance export); the
        # latest poll for intervals recorded before intervals kept it
        confirmed = row.checked_at or row.observed_at
        known_until = max(_open_end(confirmed, hi, rules.stale_after), row.started_at)
        a.seconds[row.status] += clipped_seconds(row.started_at, known_until, start, hi)
        a.seconds[PoolStatus.UNKNOWN.value] += clipped_seconds(known_until, hi, start, hi)
        if row.status == PoolStatus.NON_COMPLIANT.value and end >= now:
            a.now_bad.add(row.machine_id)

    detections: dict[tuple[int | None, str], list[datetime]] = defaultdict(list)
    for inc in conn.execute(
        select(
            INCIDENT.c.detected_at,
            INCIDENT.c.verified_at,
            INCIDENT.c.outcome,
            INCIDENT.c.closed_at,
            MACHINE.c.site_id,
            MACHINE.c.machine_id,
        )
        .select_from(INCIDENT.join(MACHINE, MACHINE.c.id == INCIDENT.c.machine_pk))
        .where(
            INCIDENT.c.detected_at >= start - rules.repeat_window,
            INCIDENT.c.detected_at < hi,
            *machine_filter,
        )
    ):
        detections[(inc.site_id, inc.machine_id)].append(inc.detected_at)
        if inc.detected_at < start:
            continue  # only for the repeat-offender window
        a = acc[inc.site_id]
        a.opened += 1
        a.verified += inc.outcome == VERIFIED
        a.failed += inc.outcome == FAILED
        a.open += inc.closed_at is None or inc.closed_at >= hi
        if inc.verified_at is not None and inc.verified_at <= hi:
            a.detect_to_verified.append((inc.verified_at - inc.detected_at).total_seconds())
    for (site_id, machine_id), times in detections.items():
        in_period = [t for t in times if t >= start]
        if in_period and is_repeat_offender(times, rules.repeat_incidents, rules.repeat_window):
            acc[site_id].offenders.add(machine_id)

    alerts = open_alerts(session, site)
    for alert in alerts:
        site_id = next((k for k, v in names.items() if v == alert.site), None)
        acc[site_id].alerts += 1

    fleet = _Acc.empty()
    for a in acc.values():
        for status, seconds in a.seconds.items():
            fleet.seconds[status] += seconds
        fleet.machines |= a.machines
        fleet.detect_to_verified += a.detect_to_verified
        fleet.offenders |= a.offenders
        fleet.now_bad |= a.now_bad
        fleet.opened += a.opened
        fleet.verified += a.verified
        fleet.failed += a.failed
        fleet.open += a.open
        fleet.alerts += a.alerts
    sites = [
        a.stats(names.get(site_id) if site_id is not None else None)
        for site_id, a in sorted(acc.items(), key=lambda kv: names.get(kv[0] or -1, ""))
        if site_id is not None or a.machines
    ]
    return ComplianceStatus(
        start=start, end=end, fleet=fleet.stats(site), sites=sites, alerts=alerts
    )


def machine_timeline(
    session: Session,
    machine_ref: str,
    start: datetime,
    end: datetime,
    *,
    rules: Rules | None = None,
) -> MachineTimeline:
    """One machine's intervals and incidents overlapping ``[start, end)``."""
    rules = rules or Rules()
    machine = find_machine(session, machine_ref)
    conn = session.connection()
    site = (
        conn.execute(select(SITE.c.name).where(SITE.c.id == machine.site_id)).scalar()
        if machine.site_id is not None
        else None
    )
    intervals = [
        IntervalView(
            status=r.status,
            cause=r.cause,
            started_at=r.started_at,
            ended_at=r.ended_at,
            pool_set_version=r.pool_set_version,
        )
        for r in conn.execute(
            select(INTERVAL)
            .where(
                INTERVAL.c.machine_pk == machine.id,
                INTERVAL.c.started_at < end,
                or_(INTERVAL.c.ended_at.is_(None), INTERVAL.c.ended_at > start),
            )
            .order_by(INTERVAL.c.started_at)
        )
    ]
    current = conn.execute(
        select(INTERVAL.c.status).where(
            INTERVAL.c.machine_pk == machine.id, INTERVAL.c.ended_at.is_(None)
        )
    ).scalar()
    rows = conn.execute(
        select(INCIDENT)
        .where(
            INCIDENT.c.machine_pk == machine.id,
            INCIDENT.c.detected_at >= start - rules.repeat_window,
            INCIDENT.c.detected_at < end,
        )
        .order_by(INCIDENT.c.detected_at)
    ).all()
    incidents = [
        IncidentView(
            id=r.id,
            detected_at=r.detected_at,
            problems=list(r.problems),
            observed=list(r.observed),
            action=r.action,
            action_at=r.action_at,
            verified_at=r.verified_at,
            outcome=r.outcome,
            cause=r.cause,
            attempts=r.attempts,
            after_reboot=r.after_reboot,
            closed_at=r.closed_at,
            detect_to_verified_s=(
                (r.verified_at - r.detected_at).total_seconds() if r.verified_at else None
            ),
        )
        for r in rows
        if r.detected_at >= start
    ]
    offender = is_repeat_offender(
        [r.detected_at for r in rows], rules.repeat_incidents, rules.repeat_window
    ) and bool(incidents)
    return MachineTimeline(
        machine_id=machine.machine_id,
        site=site,
        start=start,
        end=end,
        current_status=current,
        repeat_offender=offender,
        intervals=intervals,
        incidents=incidents,
    )


def open_alerts(session: Session, site: str | None = None, limit: int = 500) -> list[AlertView]:
    """Unresolved alerts, newest first: refused policy bundles, halted rollouts, repeat
    offenders, and any other unresolved critical event."""
    conn = session.connection()
    site_filter = _site_id(session, site) if site else None
    site_col = func.coalesce(MACHINE.c.site_id, AGENT.c.site_id)
    query = (
        select(
            EVENT.c.id,
            EVENT.c.at,
            EVENT.c.kind,
            EVENT.c.severity,
            EVENT.c.detail,
            EVENT.c.agent_id,
            EVENT.c.ip,
            EVENT.c.data,
            MACHINE.c.machine_id,
            SITE.c.name.label("site"),
        )
        .select_from(
            EVENT.outerjoin(MACHINE, MACHINE.c.id == EVENT.c.machine_pk)
            .outerjoin(AGENT, AGENT.c.id == EVENT.c.agent_id)
            .outerjoin(SITE, SITE.c.id == site_col)
        )
        .where(
            EVENT.c.resolved_at.is_(None),
            or_(EVENT.c.kind.in_(ALERT_KINDS), EVENT.c.severity == "critical"),
        )
        .order_by(EVENT.c.at.desc(), EVENT.c.id.desc())
        .limit(limit)
    )
    if site_filter is not None:
        query = query.where(site_col == site_filter)
    return [
        AlertView(
            id=r.id,
            at=r.at,
            kind=r.kind,
            severity=r.severity,
            detail=r.detail,
            machine_id=r.machine_id,
            agent_id=r.agent_id,
            ip=r.ip,
            site=r.site,
            data=dict(r.data or {}),
        )
        for r in conn.execute(query)
    ]
