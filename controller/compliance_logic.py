"""Compliance evidence decisions, without I/O: what one machine's new polls and the agent's
enforcement events do to its open interval and its open drift incident, and the arithmetic
of a compliance report (time-weighted shares, percentiles, repeat offenders).

The controller judges every poll itself with :func:`contract.compliance.assess_pools`; the
agent's events only add what a poll cannot show (when it wrote, how often, why it failed).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from contract import EnforcementEvent, EnforcementFacts, PoolReading
from contract.compliance import DEVFEE, PoolStatus, assess_pools
from contract.enforcement import FailureCause
from contract.policy import ApprovedPoolSet

OPEN = "open"
VERIFIED = "verified"
FAILED = "failed"
ACTION_NONE = "none"  # observe mode: detected and reported, never corrected
ACTION_WRITE = "write"
ACTION_REBOOT = "reboot"

# Events that carry an incident's facts (Event.data is an EnforcementFacts dump).
INCIDENT_EVENTS = frozenset(
    {
        EnforcementEvent.POOL_DRIFT,
        EnforcementEvent.POOL_WRITE,
        EnforcementEvent.POOL_VERIFIED,
        EnforcementEvent.POOL_WRITE_FAILED,
        EnforcementEvent.CANNOT_ENFORCE,
    }
)


ReadBack = tuple[tuple[str, str, str | None], ...]
"""The pools a poll read back, as judged: ``(url, user, kind)`` per slot, in slot order (what
changes from poll to poll, like a pool's alive status, is left out)."""


def readback_of(pools: Sequence[PoolReading]) -> ReadBack:
    return tuple((p.url, p.user, p.kind) for p in pools)


def readback_json(readback: ReadBack) -> list[dict[str, Any]]:
    """As stored on the interval (``compliance_interval.pools``)."""
    out: list[dict[str, Any]] = []
    for url, user, kind in readback:
        out.append({"url": url, "user": user, **({"kind": kind} if kind else {})})
    return out


def readback_from_json(value: Any) -> ReadBack | None:
    """The stored form back (None: an interval recorded before read-backs were kept)."""
    if value is None:
        return None
    return tuple(
        (str(p.get("url") or ""), str(p.get("user") or ""), p.get("kind") or None)
        for p in value
        if isinstance(p, dict)
    )


@dataclass(frozen=True)
class Verdict:
    """The controller's judgement of one poll of one machine."""

    at: datetime
    status: PoolStatus
    cause: str = ""
    problems: tuple[str, ...] = ()
    observed: tuple[dict[str, Any], ...] = ()
    pool_set_version: int | None = None
    readback: ReadBack = ()
    worker: str | None = None

    @property
    def key(self) -> tuple[str, str, int | None, str | None, ReadBack]:
        """What an interval is made of: a change in any of it starts a new one."""
        return (self.status.value, self.cause, self.pool_set_version, self.worker, self.readback)


def judge(
    at: datetime,
    *,
    reachable: bool,
    error: str | None,
    pools: Sequence[PoolReading],
    approved: ApprovedPoolSet,
    worker: str,
    exemption: str | None = None,
) -> Verdict:
    """Unreachable or no pools read → unknown; exempt → exempt; else compliant or not.

    The verdict carries what it was judged on (the pools read back and the expected worker),
    which the interval keeps and the exports show."""
    version = approved.version
    if not reachable:
        return Verdict(
            at, PoolStatus.UNKNOWN, error or "unreachable", pool_set_version=version, worker=worker
        )
    if not pools:
        return Verdict(
            at, PoolStatus.UNKNOWN, error or "no pools read", pool_set_version=version,
            worker=worker,
        )  # fmt: skip
    readback = readback_of(pools)
    if exemption is not None:
        return Verdict(
            at, PoolStatus.EXEMPT, exemption, pool_set_version=version, readback=readback,
            worker=worker,
        )  # fmt: skip
    if _plainly_compliant(approved, worker, pools):
        return Verdict(
            at, PoolStatus.COMPLIANT, pool_set_version=version, readback=readback, worker=worker
        )
    verdict = assess_pools(approved, worker, pools)
    if verdict.compliant:
        return Verdict(
            at, PoolStatus.COMPLIANT, pool_set_version=version, readback=readback, worker=worker
        )
    observed = tuple(p.model_dump(mode="json", exclude_none=True) for p in pools)
    return Verdict(
        at,
        PoolStatus.NON_COMPLIANT,
        "; ".join(verdict.problems)[:1024],
        problems=verdict.problems,
        observed=observed,
        pool_set_version=version,
        readback=readback,
        worker=worker,
    )


def _plainly_compliant(
    approved: ApprovedPoolSet, worker: str, pools: Sequence[PoolReading]
) -> bool:
    """The common case, checked cheaply: the miner reports exactly the approved URLs (same
    spelling), in order, each with the worker, and no fee pool. When this holds,
    :func:`assess_pools` finds no problem either; when it does not, ``assess_pools`` decides."""
    urls = approved.urls
    if len(pools) != len(urls):
        return False
    for reading, url in zip(pools, urls, strict=True):
        if (
            reading.url != url
            or reading.user.strip() != worker
            or reading.kind == DEVFEE
            or reading.user == "DevFee"
        ):
            return False
    return True


@dataclass(frozen=True)
class Signal:
    """One enforcement event of the agent about one machine."""

    kind: EnforcementEvent
    at: datetime  # when it happened: the facts' own time, else the event's
    facts: EnforcementFacts
    detail: str = ""
    agent_id: str | None = None


def signal_time(kind: EnforcementEvent, facts: EnforcementFacts, event_at: datetime) -> datetime:
    """The moment an event speaks of (detection, write, verification), else when it was sent."""
    own = {
        EnforcementEvent.POOL_DRIFT: facts.detected_at,
        EnforcementEvent.POOL_WRITE: facts.written_at,
        EnforcementEvent.POOL_VERIFIED: facts.verified_at,
    }.get(kind)
    return own or event_at


@dataclass
class IntervalRow:
    """A compliance interval; ``id`` None until inserted."""

    machine_pk: int
    status: str
    cause: str
    started_at: datetime
    ended_at: datetime | None = None
    pool_set_version: int | None = None
    id: int | None = None
    worker: str | None = None
    readback: ReadBack | None = None  # None: recorded before read-backs were kept
    checked_at: datetime | None = None  # the newest poll that confirmed it

    @property
    def key(self) -> tuple[str, str, int | None, str | None, ReadBack | None]:
        return (self.status, self.cause, self.pool_set_version, self.worker, self.readback)


@dataclass
class IncidentRow:
    """A drift incident; ``id`` None until inserted."""

    machine_pk: int
    detected_at: datetime
    site_id: int | None = None
    observed: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    action: str = ""
    action_at: datetime | None = None
    verified_at: datetime | None = None
    outcome: str = OPEN
    cause: str = ""
    attempts: int = 0
    after_reboot: bool = False
    agent_id: str | None = None
    closed_at: datetime | None = None
    id: int | None = None


@dataclass
class MachinePlan:
    """What to write for one machine: intervals and incidents that are new or changed."""

    intervals: list[IntervalRow] = field(default_factory=list)
    incidents: list[IncidentRow] = field(default_factory=list)

    @property
    def opened(self) -> list[IncidentRow]:
        return [i for i in self.incidents if i.id is None]


def plan_machine(
    machine_pk: int,
    interval: IntervalRow | None,
    incident: IncidentRow | None,
    verdicts: Iterable[Verdict],
    signals: Iterable[Signal],
    *,
    observe: bool,
    site_id: int | None = None,
    agent_id: str | None = None,
) -> MachinePlan:
    """Apply polls and events in time order (a poll before an event of the same instant).

    A poll not newer than the open interval's start or its newest confirming poll is ignored
    (batches replayed out of order cannot rewrite the past). A new interval starts when
    status, cause, pool set version, expected worker or the pools read back change; a poll
    that matches the open interval moves its ``checked_at``. A non-compliant poll opens an
    incident when none is open; a compliant poll closes the open one (verified, or failed if
    the agent gave up on it).
    """
    changed_intervals: dict[int, IntervalRow] = {}
    changed_incidents: dict[int, IncidentRow] = {}
    drift_hint: datetime | None = None  # a pool_drift event without pools, this batch
    verified_hint: datetime | None = None
    closed_now: IncidentRow | None = None  # closed by a poll of this batch

    def touch_interval(row: IntervalRow) -> None:
        changed_intervals[id(row)] = row

    def touch_incident(row: IncidentRow) -> None:
        changed_incidents[id(row)] = row

    items: list[tuple[datetime, int, Verdict | Signal]] = [(v.at, 0, v) for v in verdicts]
    items.extend((s.at, 1, s) for s in signals)
    items.sort(key=lambda item: (item[0], item[1]))
    for at, _, item in items:
        if isinstance(item, Verdict):
            if interval is not None and at <= (interval.checked_at or interval.started_at):
                continue
            if interval is None or item.key != interval.key:
                if interval is not None:
                    interval.ended_at = at
                    touch_interval(interval)
                interval = IntervalRow(
                    machine_pk,
                    item.status.value,
                    item.cause,
                    at,
                    None,
                    item.pool_set_version,
                    worker=item.worker,
                    readback=item.readback,
                    checked_at=at,
                )
            else:
                interval.checked_at = at
            touch_interval(interval)
            if item.status is PoolStatus.NON_COMPLIANT and incident is None:
                detected = min(at, drift_hint) if drift_hint else at
                incident = IncidentRow(
                    machine_pk,
                    detected,
                    site_id=site_id,
                    observed=list(item.observed),
                    problems=list(item.problems),
                    action=ACTION_NONE if observe else "",
                    agent_id=agent_id,
                )
                touch_incident(incident)
                drift_hint = verified_hint = None
            elif item.status is PoolStatus.COMPLIANT and incident is not None:
                verified = at
                if verified_hint is not None and incident.detected_at <= verified_hint < at:
                    verified = verified_hint
                incident.verified_at = verified
                incident.closed_at = at
                if incident.outcome != FAILED:
                    incident.outcome = VERIFIED
                touch_incident(incident)
                closed_now, incident, verified_hint = incident, None, None
            continue
        target = incident or closed_now
        kind = item.kind
        facts = item.facts
        if kind is EnforcementEvent.POOL_DRIFT:
            if target is not None and target.id is None and at < target.detected_at:
                target.detected_at = at  # the agent saw it before the poll that reached us
                touch_incident(target)
            elif target is None:
                drift_hint = at if drift_hint is None else min(drift_hint, at)
            continue
        if target is None:
            continue  # nothing open to attach it to: the polls decide what is an incident
        if item.agent_id:
            target.agent_id = item.agent_id
        target.attempts = max(target.attempts, facts.attempts)
        target.after_reboot = target.after_reboot or facts.after_reboot
        if kind in (EnforcementEvent.POOL_WRITE, EnforcementEvent.POOL_VERIFIED):
            written = facts.written_at or (at if kind is EnforcementEvent.POOL_WRITE else None)
            if target.action in ("", ACTION_NONE) or facts.after_reboot:
                target.action = ACTION_REBOOT if target.after_reboot else ACTION_WRITE
            if written is not None and (target.action_at is None or written < target.action_at):
                target.action_at = written
        if kind is EnforcementEvent.POOL_VERIFIED:
            if target is incident:
                verified_hint = at
            elif target.verified_at is not None and target.detected_at <= at < target.verified_at:
                target.verified_at = at
        elif kind is EnforcementEvent.POOL_WRITE_FAILED:
            cause = facts.cause
            target.cause = (cause.value if cause else item.detail or "write failed")[:1024]
            if cause is FailureCause.PENDING_REBOOT:
                target.action = ACTION_REBOOT
                target.after_reboot = True
            elif target is incident:
                target.outcome = FAILED
        elif kind is EnforcementEvent.CANNOT_ENFORCE:
            target.cause = f"cannot_enforce: {item.detail or 'capability missing'}"[:1024]
            if target is incident:
                target.outcome = FAILED
        touch_incident(target)
    return MachinePlan(list(changed_intervals.values()), list(changed_incidents.values()))


# --- report arithmetic -------------------------------------------------------------------------


def clipped_seconds(start: datetime, end: datetime, lo: datetime, hi: datetime) -> float:
    """Seconds of [start, end) inside [lo, hi)."""
    return max(0.0, (min(end, hi) - max(start, lo)).total_seconds())


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def most_in_window(times: Sequence[datetime], window: timedelta) -> int:
    """The most incidents that fall within any ``window`` (sliding, inclusive of both ends)."""
    ordered = sorted(times)
    best = 0
    first = 0
    for last, at in enumerate(ordered):
        while at - ordered[first] > window:
            first += 1
        best = max(best, last - first + 1)
    return best


def is_repeat_offender(times: Sequence[datetime], threshold: int, window: timedelta) -> bool:
    return most_in_window(times, window) >= threshold


def streak_start(times: Sequence[datetime], window: timedelta) -> datetime | None:
    """The first incident of the streak that ends with the newest one: walking back, a streak
    continues while consecutive incidents are less than ``window`` apart."""
    ordered = sorted(times)
    if not ordered:
        return None
    start = len(ordered) - 1
    while start > 0 and ordered[start] - ordered[start - 1] < window:
        start -= 1
    return ordered[start]
