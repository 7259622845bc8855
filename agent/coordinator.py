"""The poll coordinator's decisions: who to poll this cycle, who backs off, whose identity to
re-read, which miners appeared or vanished, and how a cycle's reports are cut into batches.

Everything here is pure: no sockets, no clocks (``now`` and the cycle number are passed in), no
asyncio. The daemon (:mod:`agent.daemon`) does the I/O around it, Home Assistant coordinator
style: it asks :meth:`PollCoordinator.plan` what to do, does it, and feeds each miner's
:class:`Outcome` back through :meth:`PollCoordinator.record`, which returns the events worth
reporting. Like HA's coordinator, a miner that starts failing is announced once
(``miner_unavailable``) and once again when it recovers (``miner_recovered``), not every cycle.

Backoff: after ``n`` consecutive failures the next attempt is ``min(2**(n-1), cap)`` cycles
later (1, 2, 4, 8 … cycles), so a dead or blackholed miner costs one timeout every few cycles
instead of every cycle. In the cycles it skips it is still reported, with its last reason.

Identity (serial, MAC, board serials) is re-read on the slow cadence (``identity_interval_s``,
spread over cycles by a per-cycle cap so a farm discovered in one scan is not re-read in one
cycle), and at once when the MAC or model seen elsewhere differs from the one on record, or when
a miner comes back after failing (it may have been swapped meanwhile). After
``reidentify_after_failures`` failures in a row the driver is rebuilt from scratch: the address
may now hold a different miner or firmware that the kept driver cannot speak to.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from ipaddress import IPv4Address, IPv4Network

from agent.backoff import doubling_cycles
from agent.drivers.base import Identity, normalise_mac
from contract.reports import Event, EventSeverity, IdentityRecord, Observation, ReportBatch

IDENTITY_FIELDS = ("make", "model", "firmware", "mac", "serial")
REBUILD_FIELDS = frozenset({"make", "model", "firmware"})
"""A change in one of these means the kept driver (and its pyasic class) may be the wrong one."""


@dataclass(frozen=True, slots=True)
class CoordinatorSettings:
    """Cadences and limits of the decisions (the config's ``[polling]`` section feeds these)."""

    poll_interval_s: float = 60.0
    identity_interval_s: float = 900.0
    max_backoff_cycles: int = 8
    reidentify_after_failures: int = 3
    gone_after_missed_scans: int = 2
    min_identity_reads_per_cycle: int = 8


@dataclass
class MinerRecord:
    """What the coordinator remembers about one address (mutable; owned by the coordinator)."""

    ip: str
    identity: Identity | None = None
    identity_at: datetime | None = None
    failures: int = 0
    next_cycle: int = 0
    last_error: str | None = None
    last_reachable: bool = False
    identity_error: str | None = None
    reidentify: bool = False
    rebuild: bool = False
    missed_scans: int = 0

    @property
    def identified(self) -> bool:
        return self.identity is not None


@dataclass(frozen=True, slots=True)
class Task:
    """One miner's work this cycle. ``rebuild``: drop the kept driver and identify from scratch
    (then poll); otherwise poll, then re-read identity if ``read_identity``."""

    ip: str
    rebuild: bool = False
    read_identity: bool = False


@dataclass(frozen=True, slots=True)
class Skip:
    """A miner backing off this cycle; ``observation`` reports it (None: never identified)."""

    ip: str
    failures: int
    next_cycle: int
    observation: Observation | None


@dataclass(frozen=True, slots=True)
class CyclePlan:
    cycle: int
    tasks: tuple[Task, ...]
    skipped: tuple[Skip, ...]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the I/O did for one :class:`Task`.

    ``polled`` is None when no poll was attempted (identification failed first); ``error`` is
    the one-line reason of whatever failed. ``mac_hint``/``model_hint`` are a MAC or model seen
    outside an identity read (a hot reply that carries them), used to notice a swap early.
    """

    ip: str
    polled: bool | None = None
    reachable: bool = False
    error: str | None = None
    identity: Identity | None = None
    identity_error: str | None = None
    mac_hint: str | None = None
    model_hint: str | None = None


@dataclass(frozen=True, slots=True)
class ScanDecision:
    """What a discovery scan changed: new miners, ones that stopped answering, ones dropped."""

    added: tuple[str, ...]
    unidentified: tuple[str, ...]
    gone: tuple[str, ...]
    dropped: tuple[str, ...]
    events: tuple[Event, ...]


def backoff_cycles(failures: int, cap: int) -> int:
    """Cycles until the next attempt after ``failures`` consecutive failures: 1, 2, 4 … cap."""
    return doubling_cycles(failures, cap)


def segment_of(ip: str, segments: Sequence[IPv4Network]) -> IPv4Network | None:
    """The configured segment holding ``ip`` (None: outside every segment)."""
    address = IPv4Address(ip)
    for segment in segments:
        if address in segment:
            return segment
    return None


def identity_changes(before: Identity | None, after: Identity) -> tuple[str, ...]:
    """Which identity fields differ (MACs compared normalised; an unreadable value is no news)."""
    if before is None:
        return ()
    changed = []
    for name in IDENTITY_FIELDS:
        old, new = getattr(before, name), getattr(after, name)
        if name == "mac":
            old, new = normalise_mac(old), normalise_mac(new)
        if old is not None and new is not None and old != new:
            changed.append(name)
    return tuple(changed)


def _event(kind: str, now: datetime, ip: str | None, detail: str, severity: EventSeverity) -> Event:
    return Event(
        kind=kind,
        at=now,
        severity=severity,
        ip=None if ip is None else IPv4Address(ip),
        detail=detail[:4096],
    )


def _error_kind(error: str | None) -> str:
    return (error or "").split(":", 1)[0]


class PollCoordinator:
    """The fleet's scheduling state and the pure decisions over it."""

    def __init__(self, settings: CoordinatorSettings | None = None) -> None:
        self.settings = settings or CoordinatorSettings()
        self._records: dict[str, MinerRecord] = {}

    # --- inventory ------------------------------------------------------------------------------

    @property
    def ips(self) -> frozenset[str]:
        return frozenset(self._records)

    def record_of(self, ip: str) -> MinerRecord | None:
        return self._records.get(ip)

    def records(self) -> list[MinerRecord]:
        return [self._records[ip] for ip in sorted(self._records, key=IPv4Address)]

    def add(
        self, ip: str, identity: Identity | None, now: datetime, error: str | None = None
    ) -> None:
        """A miner identified by discovery (or, with ``identity`` None, one that answered but
        could not be identified: identification is then retried by the polls, with backoff)."""
        record = self._records.setdefault(ip, MinerRecord(ip=ip))
        record.missed_scans = 0
        if identity is not None:
            record.identity, record.identity_at = identity, now
            record.failures, record.last_error, record.last_reachable = 0, None, True
            record.reidentify = record.rebuild = False
        else:
            record.failures = max(record.failures, 1)
            record.last_error = error
            record.next_cycle = 0  # the next cycle retries at once, then backs off

    def forget(self, ip: str) -> None:
        self._records.pop(ip, None)

    def apply_scan(
        self,
        scanned: Sequence[IPv4Network],
        responded: Collection[str],
        found: dict[str, Identity],
        failed: dict[str, str],
        now: datetime,
    ) -> ScanDecision:
        """Fold one discovery scan in: add what it identified, count misses for known miners
        that did not answer the probe (``miner_gone`` at the first miss, dropped after
        ``gone_after_missed_scans``), and report what could not be identified."""
        answered = set(responded)
        events: list[Event] = []
        added = tuple(sorted((ip for ip in found if ip not in self._records), key=IPv4Address))
        for ip, identity in found.items():
            self.add(ip, identity, now)
        unidentified: list[str] = []
        for ip, reason in sorted(failed.items(), key=lambda item: IPv4Address(item[0])):
            if ip in self._records and self._records[ip].identified:
                continue  # known and answering: the polls decide how it is doing
            if ip not in self._records:
                events.append(
                    _event(
                        "identify_failed",
                        now,
                        ip,
                        f"answers on the network but could not be identified: {reason}",
                        EventSeverity.WARNING,
                    )
                )
                unidentified.append(ip)
            self.add(ip, None, now, error=reason)
        gone: list[str] = []
        dropped: list[str] = []
        for ip in sorted(self._records, key=IPv4Address):
            record = self._records[ip]
            if ip in answered or ip in found:
                record.missed_scans = 0
                continue
            if not any(IPv4Address(ip) in net for net in scanned):
                continue
            record.missed_scans += 1
            if record.missed_scans >= self.settings.gone_after_missed_scans:
                dropped.append(ip)
                events.append(
                    _event(
                        "miner_dropped",
                        now,
                        ip,
                        f"no answer on ports 4028/80 in {record.missed_scans} scans in a row; "
                        "no longer polled until a scan finds it again",
                        EventSeverity.WARNING,
                    )
                )
            elif record.missed_scans == 1:
                gone.append(ip)
                events.append(
                    _event(
                        "miner_gone",
                        now,
                        ip,
                        "no answer on ports 4028/80 during discovery"
                        + (f" (last poll: {record.last_error})" if record.last_error else ""),
                        EventSeverity.WARNING,
                    )
                )
        for ip in dropped:
            self.forget(ip)
        return ScanDecision(
            added=added,
            unidentified=tuple(unidentified),
            gone=tuple(gone),
            dropped=tuple(dropped),
            events=tuple(events),
        )

    # --- the cycle ------------------------------------------------------------------------------

    def identity_reads_per_cycle(self) -> int:
        """Enough to re-read everyone about twice per identity interval, never fewer than the
        floor: due reads beyond it wait a cycle, which spreads a farm discovered at once."""
        s = self.settings
        cycles = max(1.0, s.identity_interval_s / s.poll_interval_s)
        return max(s.min_identity_reads_per_cycle, math.ceil(2 * len(self._records) / cycles))

    def identity_due(self, record: MinerRecord, now: datetime) -> bool:
        if record.identity_at is None:
            return True
        return (now - record.identity_at).total_seconds() >= self.settings.identity_interval_s

    def plan(self, cycle: int, now: datetime) -> CyclePlan:
        """Who to poll, who to skip (backing off, still reported) and whose identity to read."""
        tasks: list[Task] = []
        skipped: list[Skip] = []
        due: list[MinerRecord] = []
        for record in self.records():
            if record.next_cycle > cycle:
                skipped.append(
                    Skip(
                        ip=record.ip,
                        failures=record.failures,
                        next_cycle=record.next_cycle,
                        observation=self.skip_observation(record, cycle, now),
                    )
                )
            elif not record.identified or record.rebuild:
                tasks.append(Task(record.ip, rebuild=True))
            elif record.reidentify:
                tasks.append(Task(record.ip, read_identity=True))
            elif self.identity_due(record, now):
                due.append(record)
            else:
                tasks.append(Task(record.ip))
        budget = self.identity_reads_per_cycle()
        oldest_first = sorted(due, key=lambda r: (r.identity_at or now, IPv4Address(r.ip)))
        for n, record in enumerate(oldest_first):
            tasks.append(Task(record.ip, read_identity=n < budget))
        tasks.sort(key=lambda t: IPv4Address(t.ip))
        return CyclePlan(cycle=cycle, tasks=tuple(tasks), skipped=tuple(skipped))

    def skip_observation(
        self, record: MinerRecord, cycle: int, now: datetime
    ) -> Observation | None:
        """A backing-off miner's report for a cycle it is not polled in (its last reason)."""
        if record.identity is None:
            return None  # the controller places observations by identity: nothing to attach to
        waits = record.next_cycle - cycle
        reason = (
            f"{record.last_error or 'failed'} (backing off after {record.failures} failure"
            f"{'s' if record.failures != 1 else ''}; next poll in {waits} cycle"
            f"{'s' if waits != 1 else ''})"
        )
        return Observation(
            ip=IPv4Address(record.ip),
            observed_at=now,
            reachable=record.last_reachable,
            error=reason[:1024],
            mac=record.identity.mac,
            serial=record.identity.serial,
        )

    def record(self, outcome: Outcome, cycle: int, now: datetime) -> list[Event]:
        """Fold one miner's outcome in; return the events worth reporting (transitions only)."""
        record = self._records.get(outcome.ip)
        if record is None:
            return []  # dropped by a scan while its poll was in flight
        events: list[Event] = []
        s = self.settings
        was_identified = record.identified
        if outcome.identity is not None:
            events.extend(self._new_identity(record, outcome.identity, now))
        elif outcome.identity_error is not None and outcome.polled is True:
            events.extend(self._identity_unreadable(record, outcome.identity_error, now))
        if outcome.polled is True:
            self._hints(record, outcome)
        if outcome.polled is not True:
            error = outcome.error or outcome.identity_error or "failed"
            first = record.failures == 0
            record.failures += 1
            record.next_cycle = cycle + backoff_cycles(record.failures, s.max_backoff_cycles)
            changed_kind = _error_kind(error) != _error_kind(record.last_error)
            record.last_error = error
            record.last_reachable = outcome.reachable
            if record.failures >= s.reidentify_after_failures and record.identified:
                record.rebuild = True
            if record.identity is None and (first or changed_kind):
                events.append(
                    _event(
                        "identify_failed",
                        now,
                        record.ip,
                        f"could not be identified: {error}",
                        EventSeverity.WARNING,
                    )
                )
            elif record.identity is not None and (first or changed_kind):
                events.append(
                    _event("miner_unavailable", now, record.ip, error, EventSeverity.WARNING)
                )
        else:
            if record.failures and was_identified and record.last_error:
                events.append(
                    _event(
                        "miner_recovered",
                        now,
                        record.ip,
                        f"answering again after {record.failures} failed attempt"
                        f"{'s' if record.failures != 1 else ''} ({record.last_error})",
                        EventSeverity.INFO,
                    )
                )
                if outcome.identity is None:
                    record.reidentify = True  # it may have been swapped while it was away
            if outcome.identity is None:
                record.rebuild = False  # the kept driver speaks to it after all
            record.failures = 0
            record.next_cycle = cycle + 1
            record.last_error = None
            record.last_reachable = True
        return events

    def _new_identity(self, record: MinerRecord, identity: Identity, now: datetime) -> list[Event]:
        changed = identity_changes(record.identity, identity)
        events = []
        if changed:
            before = record.identity
            assert before is not None
            detail = ", ".join(
                f"{name} {getattr(before, name)} -> {getattr(identity, name)}" for name in changed
            )
            events.append(_event("identity_changed", now, record.ip, detail, EventSeverity.WARNING))
        record.identity = identity
        record.identity_at = now
        record.identity_error = None
        record.reidentify = False
        record.rebuild = bool(REBUILD_FIELDS.intersection(changed))
        return events

    def _identity_unreadable(self, record: MinerRecord, error: str, now: datetime) -> list[Event]:
        """The miner polls fine but its identity cannot be read (a changed web password, say):
        keep the identity on record, say so once, and retry after the longest backoff rather
        than every cycle."""
        s = self.settings
        retry_in = min(s.identity_interval_s, s.max_backoff_cycles * s.poll_interval_s)
        record.identity_at = now - timedelta(seconds=s.identity_interval_s - retry_in)
        record.reidentify = False
        if record.identity_error is not None and _error_kind(error) == _error_kind(
            record.identity_error
        ):
            return []
        record.identity_error = error
        return [_event("identity_unreadable", now, record.ip, error, EventSeverity.WARNING)]

    def _hints(self, record: MinerRecord, outcome: Outcome) -> None:
        """A MAC or model seen in a hot reply that differs from the record: re-read identity."""
        identity = record.identity
        if identity is None:
            return
        mac = normalise_mac(outcome.mac_hint)
        if mac is not None and identity.mac is not None and mac != normalise_mac(identity.mac):
            record.reidentify = True
        if outcome.model_hint and identity.model and outcome.model_hint != identity.model:
            record.reidentify = True


# --- reports --------------------------------------------------------------------------------------


@dataclass
class Report:
    """One cycle's (or one scan's) items, in the order the controller needs them: identities
    first (an observation is placed by the identity already on record), then observations,
    then events (placed by the address they name)."""

    identities: list[IdentityRecord] = field(default_factory=list)
    observations: list[Observation] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.identities) + len(self.observations) + len(self.events)

    def extend(self, other: Report) -> None:
        self.identities.extend(other.identities)
        self.observations.extend(other.observations)
        self.events.extend(other.events)


def pack(report: Report, batch_size: int, now: datetime) -> list[ReportBatch]:
    """Cut ``report`` into batches of at most ``batch_size`` items, keeping the order (the
    outbox assigns the sequence numbers; ``sequence`` here is a placeholder)."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    items: Iterable[tuple[str, IdentityRecord | Observation | Event]] = [
        *(("identities", i) for i in report.identities),
        *(("observations", o) for o in report.observations),
        *(("events", e) for e in report.events),
    ]
    batches: list[ReportBatch] = []
    chunk: dict[str, list[object]] = {"identities": [], "observations": [], "events": []}
    count = 0

    def seal() -> None:
        batches.append(
            ReportBatch(
                batch_id=uuid.uuid4(),
                agent_clock=now,
                sequence=0,
                identities=chunk["identities"],  # type: ignore[arg-type]
                observations=chunk["observations"],  # type: ignore[arg-type]
                events=chunk["events"],  # type: ignore[arg-type]
            )
        )

    for kind, item in items:
        chunk[kind].append(item)
        count += 1
        if count == batch_size:
            seal()
            chunk = {"identities": [], "observations": [], "events": []}
            count = 0
    if count:
        seal()
    return batches
