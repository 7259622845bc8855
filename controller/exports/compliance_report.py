"""The pool-compliance report for a period: per machine, per site, for the fleet.

Pure arithmetic (:func:`summarise_machine`, :func:`is_unremediated`) is kept apart from the
queries. Definitions, so that an inspector can redo the sums:

- A machine counts from when it was first seen (its first register record, if earlier; or
  the period start, if later) to its decommissioning, the period end or the moment the
  report is made, whichever comes first: its *hours in period*. No hour before a machine
  existed, after it left service or in the future is ever counted.
- Compliant / non-compliant / unknown / exempt hours are its ``compliance_interval`` rows
  clipped to those hours; time with no interval at all counts as **unknown**. An interval
  still open counts until ``stale_after`` past its newest confirming poll (the same rule as
  the controller's live status); after that its status is not known, so **unknown**.
- *Time in compliance, %* = compliant ÷ (hours in period − exempt), so an approved exemption
  neither helps nor hurts; empty when nothing is left to measure.
- A drift incident belongs to the period if it was detected in it, or detected before and
  neither remediated nor closed by its start. It is *unremediated* unless verified
  remediated before the period ended.
- A *repeat offender* had at least ``repeat_threshold`` (default 2) incidents in the period.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.engine import Connection
from sqlmodel import Session

from controller.exports.i18n import Lang, label
from controller.exports.register import _sites, site_named, state_of, versions_as_of
from controller.exports.table import Column, Table
from controller.tables import INCIDENT, INTERVAL, MACHINE, VERSION

STATUSES = ("compliant", "non_compliant", "unknown", "exempt")
DEFAULT_REPEAT_THRESHOLD = 3
"""The same count as the controller's live flag (``compliance_repeat_incidents``)."""

MACHINE_COLUMNS: tuple[Column, ...] = (
    Column("machine_id", "text", 11),
    Column("site", "text", 12),
    Column("model", "text", 14),
    Column("lifecycle_state", "state", 13),
    Column("observed_h", "float2", 9),
    Column("compliant_pct", "float2", 9),
    Column("compliant_h", "float2", 9),
    Column("non_compliant_h", "float2", 9),
    Column("unknown_h", "float2", 9),
    Column("exempt_h", "float2", 9),
    Column("incidents", "int", 8),
    Column("unremediated", "int", 9),
    Column("repeat_offender", "bool", 8),
)
INCIDENT_COLUMNS: tuple[Column, ...] = (
    Column("machine_id", "text", 11),
    Column("site", "text", 12),
    Column("detected_at", "datetime", 19),
    Column("action", "text", 8),
    Column("action_at", "datetime", 19),
    Column("remediated_at", "datetime", 19),
    Column("outcome", "outcome", 10),
    Column("cause", "text", 30),
    Column("problems", "list", 30),
    Column("after_reboot", "bool", 8),
)
SITE_COLUMNS: tuple[Column, ...] = (
    Column("site", "text", 16),
    Column("machines", "int", 8),
    Column("observed_h", "float2", 10),
    Column("compliant_pct", "float2", 9),
    Column("compliant_h", "float2", 10),
    Column("non_compliant_h", "float2", 10),
    Column("unknown_h", "float2", 10),
    Column("exempt_h", "float2", 10),
    Column("incidents", "int", 8),
    Column("unremediated", "int", 9),
    Column("repeat_offenders", "int", 9),
)


STALE_AFTER = timedelta(minutes=15)
"""The default of ``missing_after_minutes``: a status not confirmed for this long is unknown."""

Span = tuple[str, datetime, datetime | None, datetime | None]
"""An interval as the report reads it: status, started, ended (None: open), checked."""


@dataclass(frozen=True)
class ComplianceQuery:
    period: tuple[datetime, datetime]
    site: str | None = None
    repeat_threshold: int = DEFAULT_REPEAT_THRESHOLD
    now: datetime | None = None  # None: the moment the report is made
    stale_after: timedelta = STALE_AFTER


@dataclass
class MachineSummary:
    """Seconds per status within the machine's hours in the period."""

    observed_s: float
    seconds: dict[str, float] = field(default_factory=dict)

    def hours(self, status: str) -> float:
        return round(self.seconds.get(status, 0.0) / 3600.0, 2)

    @property
    def measurable_s(self) -> float:
        return self.observed_s - self.seconds.get("exempt", 0.0)

    @property
    def compliant_pct(self) -> float | None:
        if self.measurable_s <= 0:
            return None
        return round(100.0 * self.seconds.get("compliant", 0.0) / self.measurable_s, 2)


def machine_window(
    period: tuple[datetime, datetime],
    now: datetime,
    first_seen: datetime | None,
    decommissioned: datetime | None,
) -> tuple[datetime, datetime] | None:
    """The part of ``period`` a machine existed and in service, up to ``now``; None when
    there is none (the machine is then left out of the report)."""
    lo = max(period[0], first_seen) if first_seen is not None else period[0]
    hi = min(period[1], now)
    if decommissioned is not None:
        hi = min(hi, decommissioned)
    return (lo, hi) if hi > lo else None


def summarise_machine(
    window: tuple[datetime, datetime],
    intervals: Iterable[Span] | Iterable[tuple[str, datetime, datetime | None]],
    stale_after: timedelta | None = None,
) -> MachineSummary:
    """Clip ``(status, started, ended or None[, checked])`` intervals to ``window``; an open
    one counts until ``stale_after`` past its newest confirming poll; uncovered = unknown."""
    start, end = window
    observed = max(0.0, (end - start).total_seconds())
    seconds: dict[str, float] = dict.fromkeys(STATUSES, 0.0)
    for status, started, ended, *rest in intervals:
        checked = rest[0] if rest else None
        if ended is None and checked is not None and stale_after is not None:
            ended = max(started, checked + stale_after)
        lo = max(start, started)
        hi = min(end, ended) if ended is not None else end
        if hi > lo:
            key = status if status in seconds else "unknown"
            seconds[key] += (hi - lo).total_seconds()
    covered = sum(seconds.values())
    seconds["unknown"] += max(0.0, observed - covered)
    return MachineSummary(observed_s=observed, seconds=seconds)


def is_unremediated(outcome: str, verified_at: datetime | None, end: datetime) -> bool:
    """Not verified remediated before ``end``."""
    return not (outcome == "verified" and verified_at is not None and verified_at < end)


@dataclass
class ComplianceReport:
    machines: Table
    incidents: Table
    sites: Table
    totals: list[tuple[str, Any]]


def build_compliance(session: Session, query: ComplianceQuery, lang: Lang) -> ComplianceReport:
    """All three tables and the fleet totals for ``query.period``."""
    start, end = query.period
    now = query.now or datetime.now(UTC)
    conn = session.connection()
    sites = _sites(session)
    site_id = site_named(sites, query.site).id if query.site is not None else None
    machines = _machines(conn, end, site_id)
    first_seen = _first_seen(conn, end)
    intervals = _intervals(conn, start, end)
    incidents = _incidents(conn, start, min(end, now))

    machine_rows: list[tuple[Any, ...]] = []
    incident_rows: list[tuple[Any, ...]] = []
    per_site: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for pk, m in machines.items():
        window = machine_window(
            query.period, now, first_seen.get(pk), _aware(m["decommissioned_at"])
        )
        if window is None:
            continue  # not seen yet, or out of service, for the whole period
        summary = summarise_machine(window, intervals.get(pk, ()), query.stale_after)
        site = sites.get(m["site_id"]) if m["site_id"] is not None else None
        site_name = site.name if site else ""
        own = incidents.get(pk, [])
        unremediated = sum(1 for i in own if is_unremediated(i["outcome"], i["verified_at"], end))
        repeat = len(own) >= query.repeat_threshold
        machine_rows.append(
            (
                m["machine_id"],
                site_name or None,
                m["model"],
                state_of(m["lifecycle_state"]).value,
                round(summary.observed_s / 3600.0, 2),
                summary.compliant_pct,
                summary.hours("compliant"),
                summary.hours("non_compliant"),
                summary.hours("unknown"),
                summary.hours("exempt"),
                len(own),
                unremediated,
                repeat,
            )
        )
        for incident in own:
            verified = incident["verified_at"] if incident["outcome"] == "verified" else None
            incident_rows.append(
                (
                    m["machine_id"],
                    site_name or None,
                    incident["detected_at"],
                    incident["action"] or None,
                    incident["action_at"],
                    verified,
                    incident["outcome"],
                    incident["cause"] or None,
                    list(incident["problems"] or []),
                    bool(incident["after_reboot"]),
                )
            )
        for bucket in (per_site[site_name], per_site["\0fleet"]):
            bucket["machines"] += 1
            bucket["observed"] += summary.observed_s
            for status in STATUSES:
                bucket[status] += summary.seconds.get(status, 0.0)
            bucket["incidents"] += len(own)
            bucket["unremediated"] += unremediated
            bucket["repeat"] += int(repeat)

    machine_rows.sort(key=lambda r: (r[1] or "", r[0]))
    incident_rows.sort(key=lambda r: (r[2], r[0]))
    fleet = per_site.pop("\0fleet", None) or defaultdict(float)
    site_rows = [_site_row(name or None, per_site[name]) for name in sorted(per_site)]
    site_rows.append(_site_row(label("total.fleet", lang), fleet))
    fleet_row = site_rows[-1]
    non_compliant = sum(1 for r in machine_rows if r[7] > 0)
    totals: list[tuple[str, Any]] = [
        ("total.machines", len(machine_rows)),
        ("total.compliant_pct", "" if fleet_row[3] is None else f"{fleet_row[3]:.2f}"),
        ("total.non_compliant", non_compliant),
        ("total.incidents", len(incident_rows)),
        ("total.unremediated", int(fleet["unremediated"])),
        ("total.repeat_offenders", int(fleet["repeat"])),
    ]
    return ComplianceReport(
        machines=Table("compliance_machines", "sheet.machines", MACHINE_COLUMNS, machine_rows),
        incidents=Table("compliance_incidents", "sheet.incidents", INCIDENT_COLUMNS, incident_rows),
        sites=Table("compliance_sites", "sheet.sites", SITE_COLUMNS, site_rows),
        totals=totals,
    )


def _site_row(name: str | None, b: dict[str, float]) -> tuple[Any, ...]:
    measurable = b["observed"] - b["exempt"]
    pct = round(100.0 * b["compliant"] / measurable, 2) if measurable > 0 else None
    return (
        name,
        int(b["machines"]),
        round(b["observed"] / 3600.0, 2),
        pct,
        round(b["compliant"] / 3600.0, 2),
        round(b["non_compliant"] / 3600.0, 2),
        round(b["unknown"] / 3600.0, 2),
        round(b["exempt"] / 3600.0, 2),
        int(b["incidents"]),
        int(b["unremediated"]),
        int(b["repeat"]),
    )


# --- queries -----------------------------------------------------------------------------------


def _machines(conn: Connection, end: datetime, site_id: int | None) -> dict[int, dict[str, Any]]:
    """Every machine on the register before ``end``, as it stood at ``end``."""
    current = versions_as_of(conn, end)
    conditions = [current.c.rn == 1]
    if site_id is not None:
        conditions.append(current.c.site_id == site_id)
    stmt = select(
        current.c.machine_pk,
        current.c.machine_id,
        current.c.site_id,
        current.c.model,
        current.c.lifecycle_state,
        current.c.decommissioned_at,
    ).where(*conditions)
    return {row["machine_pk"]: dict(row) for row in conn.execute(stmt).mappings()}


def _first_seen(conn: Connection, end: datetime) -> dict[int, datetime]:
    """Per machine: when it was first seen, or its first register record if that is earlier
    (a machine imported before an agent saw it)."""
    first_version = (
        select(VERSION.c.machine_pk, func.min(VERSION.c.valid_from).label("at"))
        .where(VERSION.c.valid_from <= end)
        .group_by(VERSION.c.machine_pk)
    )
    out: dict[int, datetime] = {}
    for pk, at in conn.execute(first_version):
        if (first := _aware(at)) is not None:
            out[pk] = first
    for pk, at in conn.execute(select(MACHINE.c.id, MACHINE.c.first_seen)):
        seen = _aware(at)
        if pk in out and seen is not None and seen < out[pk]:
            out[pk] = seen
    return out


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _intervals(conn: Connection, start: datetime, end: datetime) -> dict[int, list[Span]]:
    stmt = select(
        INTERVAL.c.machine_pk,
        INTERVAL.c.status,
        INTERVAL.c.started_at,
        INTERVAL.c.ended_at,
        INTERVAL.c.checked_at,
    ).where(
        INTERVAL.c.started_at < end,
        or_(INTERVAL.c.ended_at.is_(None), INTERVAL.c.ended_at > start),
    )
    out: dict[int, list[Span]] = defaultdict(list)
    for pk, status, started, ended, checked in conn.execute(stmt):
        out[pk].append((status, started, ended, checked))
    return out


def _incidents(conn: Connection, start: datetime, end: datetime) -> dict[int, list[dict[str, Any]]]:
    """Incidents detected in the period, or before it and not remediated by its start."""
    stmt = (
        select(INCIDENT)
        .where(
            INCIDENT.c.detected_at < end,
            or_(
                INCIDENT.c.detected_at >= start,
                and_(
                    or_(INCIDENT.c.verified_at.is_(None), INCIDENT.c.verified_at >= start),
                    or_(INCIDENT.c.closed_at.is_(None), INCIDENT.c.closed_at >= start),
                ),
            ),
        )
        .order_by(INCIDENT.c.detected_at, INCIDENT.c.id)
    )
    out: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in conn.execute(stmt).mappings():
        out[row["machine_pk"]].append(dict(row))
    return out
