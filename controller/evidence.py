"""Compliance evidence: tracked on ingest from every poll, read back as timelines and reports.

Write side (:func:`track_compliance`, called once per report batch by ``controller.ingest``):
the controller judges each poll against the site's newest *approved* pool set and the
machine's worker name, keeps per machine non-overlapping intervals (compliant /
non_compliant / unknown / exempt, with the cause) and drift incidents (detected → action →
verified / failed), and raises a ``repeat_offender`` event once per streak. A site without an
approved pool set is not tracked: there is nothing to be compliant with yet.

Read side: ``controller.evidence_report`` (reports, timelines, alerts).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Protocol

from pydantic import ValidationError
from sqlalchemy import ColumnElement, and_, bindparam, func, insert, or_, select, update
from sqlalchemy.engine import Connection

from contract import (
    ApprovedPoolSet,
    EnforcementEvent,
    EnforcementFacts,
    EnforcementMode,
    Event,
    Observation,
)
from contract.policy import DevFeePolicy
from controller.compliance_logic import (
    INCIDENT_EVENTS,
    IncidentRow,
    IntervalRow,
    MachinePlan,
    Signal,
    Verdict,
    judge,
    plan_machine,
    readback_from_json,
    readback_json,
    signal_time,
    streak_start,
)
from controller.models import (
    PoolSetStatus,
)
from controller.settings import Settings
from controller.tables import (
    EVENT,
    EXEMPTION,
    INCIDENT,
    INTERVAL,
    MACHINE,
    POOL_SET,
    SITE,
    SITE_POLICY,
)
from controller.worker_names import DEFAULT_TEMPLATE, render_worker, worker_facts

log = logging.getLogger(__name__)


REPEAT_OFFENDER = "repeat_offender"
ALERT_KINDS = (
    EnforcementEvent.POLICY_REFUSED.value,
    EnforcementEvent.ROLLOUT_HALTED.value,
    REPEAT_OFFENDER,
)
STREAK_LOOKBACK = timedelta(days=30)  # how far back a streak's start is looked for


@dataclass(frozen=True)
class Rules:
    """The thresholds a report applies (from :class:`Settings`)."""

    repeat_incidents: int = 3
    repeat_window: timedelta = timedelta(hours=24)
    stale_after: timedelta = timedelta(minutes=15)

    @classmethod
    def of(cls, settings: Settings) -> Rules:
        return cls(
            repeat_incidents=settings.compliance_repeat_incidents,
            repeat_window=timedelta(hours=settings.compliance_repeat_window_h),
            stale_after=timedelta(minutes=settings.missing_after_minutes),
        )


class ReportingAgent(Protocol):
    @property
    def agent_id(self) -> str | None: ...

    @property
    def site_id(self) -> int | None: ...


# --- write side --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SitePolicy:
    approved: ApprovedPoolSet
    template: str
    observe: bool
    name: str


def track_compliance(
    conn: Connection,
    agent: ReportingAgent,
    observations: Sequence[tuple[int, Observation]],
    events: Sequence[Event],
    settings: Settings,
    now: datetime,
) -> None:
    """Update intervals and incidents of the machines in one batch (a few bulk statements)."""
    signals = _enforcement_signals(events, agent.agent_id)
    if not observations and not signals:
        return
    pks = {pk for pk, _ in observations}
    ids = {mid for mid, _, _ in signals if mid}
    ips = {ip for mid, ip, _ in signals if not mid and ip}
    conditions: list[ColumnElement[bool]] = [MACHINE.c.id.in_(sorted(pks))] if pks else []
    # An event names its machine by id or address: only among the agent's own site's machines
    # (and those with no site yet), as for every other item. Sites reuse private ranges, so an
    # address inside the agent's segments may still be another site's machine.
    own = (
        MACHINE.c.site_id.is_(None)
        if agent.site_id is None
        else or_(MACHINE.c.site_id.is_(None), MACHINE.c.site_id == agent.site_id)
    )
    if ids:
        conditions.append(and_(MACHINE.c.machine_id.in_(sorted(ids)), own))
    if ips:
        conditions.append(and_(MACHINE.c.current_ip.in_(sorted(ips)), own))
    if not conditions:
        return
    rows = conn.execute(
        select(
            MACHINE.c.id,
            MACHINE.c.machine_id,
            MACHINE.c.site_id,
            MACHINE.c.current_ip,
            MACHINE.c.reported_serial,
            MACHINE.c.label_serial,
            MACHINE.c.container,
            MACHINE.c.rack,
            MACHINE.c.shelf,
            MACHINE.c.slot,
            INTERVAL.c.id.label("iv_id"),
            INTERVAL.c.status,
            INTERVAL.c.cause,
            INTERVAL.c.started_at,
            INTERVAL.c.pool_set_version,
            INTERVAL.c.worker,
            INTERVAL.c.pools,
            INTERVAL.c.checked_at,
        )
        .select_from(
            MACHINE.outerjoin(
                INTERVAL,
                (INTERVAL.c.machine_pk == MACHINE.c.id) & INTERVAL.c.ended_at.is_(None),
            )
        )
        .where(or_(*conditions))
    ).all()
    machines: dict[int, Any] = {}
    intervals: dict[int, IntervalRow] = {}
    for row in rows:
        machines[row.id] = row
        if row.iv_id is not None:
            current = intervals.get(row.id)
            if current is None or row.started_at > current.started_at:
                intervals[row.id] = IntervalRow(
                    row.id,
                    row.status,
                    row.cause,
                    row.started_at,
                    None,
                    row.pool_set_version,
                    row.iv_id,
                    worker=row.worker,
                    readback=readback_from_json(row.pools),
                    checked_at=row.checked_at,
                )
    site_of = {pk: row.site_id or agent.site_id for pk, row in machines.items()}
    policies = _site_policies(conn, {s for s in site_of.values() if s is not None})
    tracked = {pk for pk, site in site_of.items() if site in policies}
    if not tracked:
        return

    by_id = {machines[pk].machine_id: pk for pk in tracked}
    by_ip = {machines[pk].current_ip: pk for pk in tracked if machines[pk].current_ip}
    machine_signals: dict[int, list[Signal]] = defaultdict(list)
    drift_polls: list[tuple[int, datetime, EnforcementFacts]] = []
    for mid, ip, signal in signals:
        target = by_id.get(mid) if mid else by_ip.get(ip or "")
        if target is None:
            continue
        if signal.kind is EnforcementEvent.POOL_DRIFT and signal.facts.observed:
            drift_polls.append((target, signal.at, signal.facts))  # what the miner reported
        else:
            machine_signals[target].append(signal)

    times = [obs.observed_at for pk, obs in observations if pk in tracked]
    times.extend(at for _, at, _ in drift_polls)
    exemptions = _exemptions(conn, tracked, min(times)) if times else {}
    incidents = _open_incidents(conn, tracked)

    workers: dict[int, str] = {}

    def verdict(pk: int, at: datetime, reachable: bool, error: str | None, pools: Any) -> Verdict:
        policy = policies[site_of[pk]]  # type: ignore[index]
        worker = workers.get(pk)
        if worker is None:
            worker = workers[pk] = _worker(policy, machines[pk])
        return judge(
            at,
            reachable=reachable,
            error=error,
            pools=pools,
            approved=policy.approved,
            worker=worker,
            exemption=_exempt(exemptions.get(pk, ()), at),
        )

    verdicts: dict[int, list[Verdict]] = defaultdict(list)
    for pk, obs in observations:
        if pk in tracked:
            verdicts[pk].append(verdict(pk, obs.observed_at, obs.reachable, obs.error, obs.pools))
    for pk, at, facts in drift_polls:
        verdicts[pk].append(verdict(pk, at, True, None, facts.observed))

    plans: dict[int, MachinePlan] = {}
    for pk in set(verdicts) | set(machine_signals):
        site = site_of[pk]
        plans[pk] = plan_machine(
            pk,
            intervals.get(pk),
            incidents.get(pk),
            verdicts.get(pk, ()),
            machine_signals.get(pk, ()),
            observe=policies[site].observe,  # type: ignore[index]
            site_id=site,
            agent_id=agent.agent_id,
        )
    _write(conn, plans.values())
    opened = {
        pk: min(i.detected_at for i in plan.opened) for pk, plan in plans.items() if plan.opened
    }
    if opened:
        _raise_repeat_offenders(conn, opened, machines, agent.agent_id, settings, now)


def _enforcement_signals(
    events: Sequence[Event], agent_id: str | None
) -> list[tuple[str | None, str | None, Signal]]:
    """(machine_id, ip, signal) for every well-formed enforcement event about a machine."""
    out: list[tuple[str | None, str | None, Signal]] = []
    for event in events:
        if event.kind not in INCIDENT_EVENTS:
            continue
        kind = EnforcementEvent(event.kind)
        try:
            facts = EnforcementFacts.model_validate(event.data)
        except ValidationError as exc:
            log.warning("agent %s: %s event with malformed data ignored: %s", agent_id, kind, exc)
            continue
        ip = str(event.ip) if event.ip else None
        if facts.machine_id is None and ip is None:
            continue
        at = signal_time(kind, facts, event.at)
        out.append((facts.machine_id, ip, Signal(kind, at, facts, event.detail, agent_id)))
    return out


def _site_policies(conn: Connection, site_ids: set[int]) -> dict[int, _SitePolicy]:
    """Per site: its newest approved pool set, worker template and mode (sites without one
    are left out)."""
    if not site_ids:
        return {}
    wanted = sorted(site_ids)
    sets: dict[int, Any] = {}
    for row in conn.execute(
        select(POOL_SET)
        .where(POOL_SET.c.site_id.in_(wanted), POOL_SET.c.status == PoolSetStatus.APPROVED)
        .order_by(POOL_SET.c.version.desc())
    ):
        sets.setdefault(row.site_id, row)
    if not sets:
        return {}
    rules = {
        row.site_id: row
        for row in conn.execute(select(SITE_POLICY).where(SITE_POLICY.c.site_id.in_(wanted)))
    }
    names = dict(
        conn.execute(select(SITE.c.id, SITE.c.name).where(SITE.c.id.in_(wanted))).tuples().all()
    )
    out: dict[int, _SitePolicy] = {}
    for site_id, row in sets.items():
        try:
            approved = ApprovedPoolSet(
                name=row.name,
                accreditation_ref=row.accreditation_ref or "",
                version=row.version,
                urls=list(row.urls),
                account=row.account,
                password=row.password or "x",
                devfee=DevFeePolicy(row.devfee),
            )
        except (ValidationError, ValueError) as exc:  # pragma: no cover - approved sets are valid
            log.error("site %s: approved pool set v%s is unusable: %s", site_id, row.version, exc)
            continue
        rule = rules.get(site_id)
        out[site_id] = _SitePolicy(
            approved=approved,
            template=(rule.worker_template if rule else None) or DEFAULT_TEMPLATE,
            observe=(rule.mode if rule else EnforcementMode.OBSERVE) != EnforcementMode.ENFORCE,
            name=names.get(site_id, ""),
        )
    return out


def _worker(policy: _SitePolicy, machine: Any) -> str:
    facts = worker_facts(
        account=policy.approved.account, site=policy.name, machine_id=machine.machine_id,
        reported_serial=machine.reported_serial, label_serial=machine.label_serial,
        rack=machine.rack, container=machine.container, shelf=machine.shelf, slot=machine.slot,
    )  # fmt: skip
    return _render(policy.template, tuple(facts.items()))


@lru_cache(maxsize=1 << 16)
def _render(template: str, facts: tuple[tuple[str, str | None], ...]) -> str:
    """``render_worker`` is pure, and a machine's worker rarely changes: remember it."""
    return render_worker(template, dict(facts))


def _exemptions(
    conn: Connection, pks: set[int], since: datetime
) -> dict[int, list[tuple[datetime, datetime, str]]]:
    """Approved, unrevoked exemptions of ``pks`` that end after ``since``."""
    out: dict[int, list[tuple[datetime, datetime, str]]] = defaultdict(list)
    in_force = (
        EXEMPTION.c.approved_at.is_not(None),
        EXEMPTION.c.revoked_at.is_(None),
        EXEMPTION.c.ends_at > since,
    )
    if conn.execute(select(EXEMPTION.c.id).where(*in_force).limit(1)).first() is None:
        return out  # the usual case: skip the per-machine lookup
    for row in conn.execute(
        select(
            EXEMPTION.c.machine_pk, EXEMPTION.c.starts_at, EXEMPTION.c.ends_at, EXEMPTION.c.reason
        ).where(
            EXEMPTION.c.machine_pk.in_(sorted(pks)),
            EXEMPTION.c.approved_at.is_not(None),
            EXEMPTION.c.revoked_at.is_(None),
            EXEMPTION.c.ends_at > since,
        )
    ):
        out[row.machine_pk].append((row.starts_at, row.ends_at, row.reason))
    return out


def _exempt(windows: Iterable[tuple[datetime, datetime, str]], at: datetime) -> str | None:
    for start, end, reason in windows:
        if start <= at < end:
            return f"exempt until {end.isoformat(timespec='seconds')}: {reason}"[:1024]
    return None


_INCIDENT_FIELDS = (
    "detected_at",
    "observed",
    "problems",
    "action",
    "action_at",
    "verified_at",
    "outcome",
    "cause",
    "attempts",
    "after_reboot",
    "agent_id",
    "closed_at",
)


def _open_incidents(conn: Connection, pks: set[int]) -> dict[int, IncidentRow]:
    out: dict[int, IncidentRow] = {}
    for row in conn.execute(
        select(INCIDENT)
        .where(INCIDENT.c.machine_pk.in_(sorted(pks)), INCIDENT.c.closed_at.is_(None))
        .order_by(INCIDENT.c.detected_at)
    ):
        out[row.machine_pk] = IncidentRow(  # the newest open one, should there be several
            row.machine_pk,
            row.detected_at,
            site_id=row.site_id,
            id=row.id,
            **{name: getattr(row, name) for name in _INCIDENT_FIELDS if name != "detected_at"},
        )
    return out


def _write(conn: Connection, plans: Iterable[MachinePlan]) -> None:
    """Changed intervals (closed, or confirmed by a newer poll), new intervals, new incidents
    and changed ones: one statement each."""
    closed: list[dict[str, Any]] = []
    confirmed: list[dict[str, Any]] = []
    new_intervals: list[dict[str, Any]] = []
    new_incidents: list[dict[str, Any]] = []
    changed: list[dict[str, Any]] = []
    for plan in plans:
        for iv in plan.intervals:
            if iv.id is None:
                new_intervals.append(
                    {
                        "machine_pk": iv.machine_pk,
                        "status": iv.status,
                        "cause": iv.cause,
                        "started_at": iv.started_at,
                        "ended_at": iv.ended_at,
                        "pool_set_version": iv.pool_set_version,
                        "worker": iv.worker,
                        "pools": None if iv.readback is None else readback_json(iv.readback),
                        "checked_at": iv.checked_at,
                    }
                )
            elif iv.ended_at is None:  # still open, confirmed by a newer poll
                confirmed.append({"iv": iv.id, "checked": iv.checked_at})
            else:
                closed.append({"iv": iv.id, "end": iv.ended_at, "checked": iv.checked_at})
        for inc in plan.incidents:
            values = {name: getattr(inc, name) for name in _INCIDENT_FIELDS}
            if inc.id is None:
                new_incidents.append(
                    {"machine_pk": inc.machine_pk, "site_id": inc.site_id, **values}
                )
            else:
                changed.append({"inc": inc.id, **{f"v_{k}": v for k, v in values.items()}})
    if closed:
        conn.execute(
            update(INTERVAL)
            .where(INTERVAL.c.id == bindparam("iv"))
            .values(
                ended_at=bindparam("end", type_=INTERVAL.c.ended_at.type),
                checked_at=bindparam("checked", type_=INTERVAL.c.checked_at.type),
            ),
            closed,
        )
    if confirmed:  # the usual case, every poll: leave the indexed ended_at alone
        conn.execute(
            update(INTERVAL)
            .where(INTERVAL.c.id == bindparam("iv"))
            .values(checked_at=bindparam("checked", type_=INTERVAL.c.checked_at.type)),
            confirmed,
        )
    if new_intervals:
        conn.execute(insert(INTERVAL), new_intervals)
    if new_incidents:
        conn.execute(insert(INCIDENT), new_incidents)
    if changed:
        conn.execute(
            update(INCIDENT)
            .where(INCIDENT.c.id == bindparam("inc"))
            .values(
                {
                    name: bindparam(f"v_{name}", type_=INCIDENT.c[name].type)
                    for name in _INCIDENT_FIELDS
                }
            ),
            changed,
        )


def _raise_repeat_offenders(
    conn: Connection,
    opened: dict[int, datetime],
    machines: dict[int, Any],
    agent_id: str | None,
    settings: Settings,
    now: datetime,
) -> None:
    """One ``repeat_offender`` event per streak of drifts (``compliance_repeat_*`` settings)."""
    rules = Rules.of(settings)
    history: dict[int, list[datetime]] = defaultdict(list)
    for pk, at in conn.execute(
        select(INCIDENT.c.machine_pk, INCIDENT.c.detected_at).where(
            INCIDENT.c.machine_pk.in_(sorted(opened)),
            INCIDENT.c.detected_at >= min(opened.values()) - STREAK_LOOKBACK,
        )
    ).tuples():
        history[pk].append(at)
    candidates: dict[int, tuple[int, datetime]] = {}
    for pk, times in history.items():
        newest = max(times)
        recent = [t for t in times if newest - t <= rules.repeat_window]
        start = streak_start(times, rules.repeat_window)
        if len(recent) >= rules.repeat_incidents and start is not None:
            candidates[pk] = (len(recent), start)
    if not candidates:
        return
    raised = dict(
        conn.execute(
            select(EVENT.c.machine_pk, func.max(EVENT.c.at))
            .where(EVENT.c.kind == REPEAT_OFFENDER, EVENT.c.machine_pk.in_(sorted(candidates)))
            .group_by(EVENT.c.machine_pk)
        )
        .tuples()
        .all()
    )
    rows = []
    for pk, (count, start) in candidates.items():
        last = raised.get(pk)
        if last is not None and _aware(last) >= start:
            continue  # already raised for this streak
        hours = rules.repeat_window.total_seconds() / 3600
        rows.append(
            {
                "at": now,
                "kind": REPEAT_OFFENDER,
                "severity": "critical",
                "machine_pk": pk,
                "agent_id": agent_id,
                "ip": machines[pk].current_ip,
                "detail": (
                    f"{machines[pk].machine_id} drifted off its approved pools {count} times "
                    f"within {hours:g} h (persistent malware or tampering?)"
                ),
                "data": {
                    "origin": "controller",
                    "incidents": count,
                    "window_h": hours,
                    "streak_start": start.isoformat(),
                },
                "resolved_at": None,
            }
        )
        log.warning("repeat offender: %s", rows[-1]["detail"])
    if rows:
        conn.execute(insert(EVENT), rows)


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value
