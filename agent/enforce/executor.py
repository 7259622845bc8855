"""Carry out one cycle's pool decisions: write, read back, verify, report — never assume.

For every polled miner :func:`~agent.enforce.decide.decide` says what should happen; this
module does it (in ``enforce`` mode) and turns it into evidence:

- a miner off its approved pools opens an *incident*: one ``pool_drift`` event, however many
  cycles it lasts; a later re-drift (malware reverting the pools) is a new incident;
- a write (``pool_write``) is read back with ``driver.poll()`` up to
  ``rollout.verify_attempts`` times (waiting ``verify_delays_s`` between reads) and judged with
  :func:`contract.compliance.assess_pools`; passwords are never compared (firmware masks them);
- verified -> ``pool_verified``; otherwise ``pool_write_failed`` with the cause: the miner
  refused our login (``auth_failed``), did not answer (``unreachable``), answered with an error
  (``refused``), still reports an unapproved extra pool (``hidden_pool``), or read back
  unchanged: then it is rebooted and reported ``pending_reboot``; a later cycle reports
  ``pool_verified`` with ``after_reboot`` or, still unchanged, ``write_ignored``. A read-back
  that gets no answer (firmware restarting to apply the pools) is simply retried; only when
  the miner stops answering for the rest of the window is the write ``unreachable`` (never
  rebooted then: it is judged on the next cycle it answers);
- after ``write_ignored``, ``hidden_pool``, ``auth_failed`` or ``refused`` the machine is not
  rewritten for a while, doubling with each such failure in a row (:func:`retry_in_cycles`: 1,
  2, 4 … cycles, at most ``retry_max_cycles``), so a firmware that ignores writes is not
  hammered every cycle; ``unreachable`` is retried on the next cycle it answers;
- the first writes under a new policy (or pool set) version are a canary: ``canary_size``
  machines (lowest IPs first); the rest follow in waves (:func:`wave_sizes`: 4, 8, 16 …
  times the canary); after the canary and after every wave, if more than
  ``max_failure_rate`` of the writes so far failed, the rollout of that version halts
  (``rollout_halted``) and no further write is attempted under it;
- a machine hashing while unregistered is put to sleep when the policy quarantines
  (``quarantined``) and woken when it is registered (``released``); which machines this agent
  slept is kept on disk (:mod:`agent.enforce.quarantine`), so a restart still wakes them.

Every read-back is added to the cycle's report as an observation, so the controller sees the
corrected state with its own timestamp. Writes are bounded per segment by
``rollout.writes_per_segment``. Observe mode and dry runs decide the same, write nothing.

Every write (pools, reboot, sleep, wake) is an action of :mod:`agent.actions`: journaled
(planned -> dispatched -> done/failed), gated per segment (concurrency, waves), under a
deadline, logged with the miner's IP, serial and machine id. A machine with an action running,
or one left unresolved by a previous run, is not decided on (``action in flight``); nor is an
observation taken before that machine's last action ended (``stale``), so a pass that runs
behind the polls never rewrites what it has just written. After a restart :meth:`Enforcer.recover`
reads back what the previous run had dispatched and reports it (``pool_verified`` or
``pool_write_failed``; a sleep or wake it confirms updates the quarantine record).

Memory (open incidents, pending reboots, backoff, the rollout's state) lives in this object,
keyed by IP: an agent restart forgets it, which costs at most a new canary; the journal keeps a
restarted agent from repeating a write blindly. The quarantine record is kept on disk too:
forgetting it would leave a claimed machine asleep.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Protocol, TypeVar

from agent.actions import Action, ActionKind, ActionResult, ActionRunner, Journal
from agent.actions.journal import JournalEntry
from agent.actions.kinds import miner_names
from agent.backoff import doubling_cycles
from agent.coordinator import Report, segment_of
from agent.drivers.base import MinerDriver, PollSnapshot, utcnow
from agent.enforce.decide import (
    CannotEnforce,
    Compliant,
    Decision,
    Exempt,
    MachineIndex,
    MinerView,
    Quarantine,
    Quarantined,
    Release,
    Unknown,
    WritePools,
    decide,
    only_extra_pools,
    writable_set,
)
from agent.enforce.quarantine import QuarantineRecord, quarantine_path
from agent.errors import DriverError
from contract.compliance import assess_pools
from contract.enforcement import EnforcementEvent, EnforcementFacts, FailureCause
from contract.policy import ApprovedPoolSet, EnforcementMode, PolicyBundle, PolicyContent
from contract.reports import Event, EventSeverity, Observation, PoolReading

log = logging.getLogger(__name__)

MAX_FACT_ITEMS = 16
WAVE_FACTOR = 4
"""The first wave after the canary is this many canaries; each later wave doubles."""

T = TypeVar("T")

LOGGED_HERE = frozenset(
    {EnforcementEvent.POOL_VERIFIED, EnforcementEvent.QUARANTINED, EnforcementEvent.RELEASED}
)
"""Outcomes logged as their event is made (drift, writes and failures are logged where they
happen: :meth:`_Context._open`, the action runner, :meth:`_Context.fail`)."""


class DriverSource(Protocol):
    """Where drivers come from (the agent's :class:`~agent.drivers.factory.DriverFactory`)."""

    @property
    def drivers(self) -> Mapping[str, MinerDriver]: ...

    def driver_for(self, ip: str) -> Awaitable[MinerDriver]: ...


@dataclass(frozen=True)
class EnforcerSettings:
    verify_delays_s: tuple[float, ...] = (0.5, 1.0, 2.0)
    """Waits before the 2nd, 3rd … read-back (the last one repeats)."""
    retry_max_cycles: int = 64
    """The longest a machine is left alone after writes failed for a cause that retrying at
    once would not fix (ignored, hidden pool, refused login, firmware error): the wait doubles
    from 1 cycle with each such failure in a row, up to this (about an hour at 60 s cycles)."""


def retry_in_cycles(failures: int, cap: int) -> int:
    """Cycles to wait before rewriting a machine after ``failures`` failed writes in a row:
    1, 2, 4, 8 … never more than ``cap`` (and at least 1)."""
    return doubling_cycles(failures, cap)


def wave_sizes(total: int, canary_size: int) -> list[int]:
    """How a rollout of ``total`` writes is cut: the canary, then waves of 4, 8, 16 … times
    the canary (the failure rate is checked after each), the last one what is left."""
    sizes: list[int] = []
    size = max(1, canary_size)
    left = total
    while left > 0:
        sizes.append(min(size, left))
        left -= sizes[-1]
        size = max(1, canary_size) * WAVE_FACTOR if len(sizes) == 1 else size * 2
    return sizes


def waves_of(items: Sequence[T], canary_size: int) -> Iterator[Sequence[T]]:
    start = 0
    for size in wave_sizes(len(items), canary_size):
        yield items[start : start + size]
        start += size


class RolloutState(StrEnum):
    DONE = "done"
    HALTED = "halted"


@dataclass
class Incident:
    """One stretch of a machine being off its approved pools."""

    detected_at: datetime
    problems: tuple[str, ...] = ()
    written_at: datetime | None = None
    writes: int = 0
    readbacks: int = 0
    pending_reboot: bool = False
    failed: FailureCause | None = None
    retry_cycle: int = 0
    failures: int = 0
    """Writes in a row that failed for a cause that backs off (reset when it is verified)."""


@dataclass
class Memory:
    """What the executor remembers about one machine between cycles."""

    incident: Incident | None = None
    cannot: str | None = None
    acted_at: datetime | None = None
    """When this machine's last action ended: an observation older than that is stale."""


@dataclass
class MachineOutcome:
    """One machine's line in a pass: what was decided and what came of it."""

    ip: str
    machine_id: str | None
    decision: str
    action: str
    detail: str = ""
    canary: bool = False


@dataclass
class EnforcementResult:
    """One pass: the report items (events, read-back observations), per-machine outcomes and
    the counts the status file shows."""

    report: Report = field(default_factory=Report)
    outcomes: list[MachineOutcome] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    policy_version: int | None = None
    mode: str | None = None
    halted: bool = False

    def summary(self) -> dict[str, Any]:
        keys = (
            "compliant",
            "drift",
            "written",
            "verified",
            "cannot_enforce",
            "exempt",
            "unknown",
            "quarantined",
            "released",
            "backing_off",
            "in_flight",
            "stale",
        )
        data: dict[str, Any] = {k: self.counts.get(k, 0) for k in keys}
        data["failed"] = dict(sorted(self.failed.items()))
        data["policy_version"] = self.policy_version
        data["mode"] = self.mode
        data["rollout_halted"] = self.halted
        return data


def capabilities_of(driver: MinerDriver | None) -> tuple[bool, str | None, int | None, bool]:
    """(can_set_pools, why not, pool slots, can_sleep) from the driver's firmware profile."""
    profile = None if driver is None else driver.profile
    family = "this firmware" if driver is None else driver.family
    if profile is None:
        return False, f"no firmware profile for {family}: pool writes are not known", None, False
    caps = profile.capabilities
    why = None if caps.can_set_pools else f"{family} firmware cannot set pools (can_set_pools)"
    return caps.can_set_pools, why, caps.pool_slots, caps.can_sleep


def cause_of(error: DriverError) -> FailureCause:
    """A write's exception -> the cause reported for it."""
    return cause_of_kind(error.kind)


def cause_of_kind(kind: str | None) -> FailureCause:
    """An action's failure cause (a driver error kind, ``deadline`` …) -> the reported cause."""
    if kind == "auth_failed":
        return FailureCause.AUTH_FAILED
    if kind in ("unreachable", "timeout", "deadline", "not_applied", "interrupted"):
        return FailureCause.UNREACHABLE
    return FailureCause.REFUSED


def action_failure(result: ActionResult) -> tuple[FailureCause, str]:
    """A failed action -> (cause, detail) as the events report them."""
    error = result.error
    if isinstance(error, DriverError):
        return cause_of(error), f"{error.kind}: {error.reason}"
    return cause_of_kind(result.cause), f"{result.cause}: {result.detail}"


def readings_of(snapshot: PollSnapshot) -> tuple[PoolReading, ...]:
    return tuple(p.to_reading() for p in snapshot.pools)


class Enforcer:
    """Runs enforcement passes for one agent; keeps the memory between them.

    With a ``data_dir`` the quarantine record is kept in it (see
    :mod:`agent.enforce.quarantine`); without, only in memory.
    """

    def __init__(
        self,
        drivers: DriverSource,
        segments: Sequence[IPv4Network] = (),
        settings: EnforcerSettings | None = None,
        *,
        data_dir: Path | None = None,
        actions: ActionRunner | None = None,
    ) -> None:
        self.drivers = drivers
        self.segments = tuple(segments)
        self.settings = settings or EnforcerSettings()
        self.actions = actions or ActionRunner(Journal(), self.segments)
        self.memory: dict[str, Memory] = {}
        self.quarantine = QuarantineRecord(
            quarantine_path(data_dir) if data_dir is not None else None
        )
        self.rollouts: dict[tuple[int, int | None], RolloutState] = {}
        self.passes = 0
        self._limits: dict[tuple[IPv4Network | None, int], asyncio.Semaphore] = {}
        self._index: tuple[int, MachineIndex] | None = None
        self.last: EnforcementResult | None = None

    # --- views ----------------------------------------------------------------------------------

    def view_of(self, observation: Observation) -> MinerView:
        """A poll's observation, the kept driver's capabilities and our memory -> MinerView."""
        ip = str(observation.ip)
        driver = self.drivers.drivers.get(ip)
        read = observation.error is None and observation.reachable and driver is not None
        can_set, why, slots, can_sleep = capabilities_of(driver)
        return MinerView(
            ip=ip,
            serial=observation.serial,
            mac=observation.mac,
            family=None if driver is None else driver.family,
            reachable=observation.reachable,
            pools=tuple(observation.pools) if read else None,
            is_mining=observation.is_mining,
            can_set_pools=can_set,
            cannot_set_pools_reason=why,
            pool_slots=slots,
            can_sleep=can_sleep,
            quarantined=self.quarantine.holds(ip, observation.serial, observation.mac),
        )

    def machine_index(self, bundle: PolicyBundle) -> MachineIndex:
        if self._index is None or self._index[0] != bundle.version:
            self._index = (bundle.version, MachineIndex.of(bundle.content.machines))
        return self._index[1]

    # --- a pass ---------------------------------------------------------------------------------

    async def run(
        self,
        bundle: PolicyBundle | None,
        observations: Sequence[Observation],
        *,
        now: datetime | None = None,
        dry_run: bool = False,
        new_cycle: bool = True,
        sink: Callable[[Report], Awaitable[object]] | None = None,
    ) -> EnforcementResult:
        """Decide for every observation and, in enforce mode (not a dry run), act.
        ``new_cycle``: the observations include a full poll's; backoffs count these passes
        only (a pass triggered by the drift check alone does not shorten them). ``sink``: store
        the pass's events and read-backs as they happen (the decisions' events before the first
        write, each machine's once its write has ended), so that a pass cut off by a kill has
        already reported every write that ended; what the sink took is not in the result's
        ``report``."""
        if new_cycle or self.passes == 0:
            self.passes += 1
        now = now or utcnow()
        policy = bundle.content if bundle is not None else None
        index = self.machine_index(bundle) if bundle is not None else None
        act = policy is not None and policy.mode is EnforcementMode.ENFORCE and not dry_run
        self.quarantine.reload()
        ctx = _Context(self, bundle, policy, act, dry_run, sink)
        result = ctx.result
        result.policy_version = bundle.version if bundle is not None else None
        result.mode = str(policy.mode) if policy is not None else None
        for observation in sorted(observations, key=lambda o: o.ip):
            view = self.view_of(observation)
            decision = decide(policy, view, now, index=index)
            ctx.handle(observation, view, decision)
        await ctx.flush()
        await ctx.act_on_sleep_and_wake()
        await ctx.flush()
        await ctx.write_all()
        await ctx.flush()
        ctx.finish()
        self.last = result
        return result

    # --- after a restart --------------------------------------------------------------------

    async def recover(self) -> Report:
        """Read back what a previous run dispatched and never saw end (and what is still in
        doubt since); report each resolved action's outcome as the enforcement event it would
        have produced. Machines still in doubt are left alone by the passes meanwhile."""
        verifiers = {
            ActionKind.SET_POOLS: self._verify_pools,
            ActionKind.SLEEP: self._verify_mode,
            ActionKind.WAKE: self._verify_mode,
        }
        results = await self.actions.recover(verifiers)
        report = Report()
        quarantine_changed = False
        if any(r.action.kind in (ActionKind.SLEEP, ActionKind.WAKE) for r in results):
            self.quarantine.reload()
        for result in results:
            event, changed = self._recovered(result)
            quarantine_changed |= changed
            if event is not None:
                report.events.append(event)
        if quarantine_changed:
            self.quarantine.save()
        return report

    async def _verify_pools(self, entry: JournalEntry) -> bool | None:
        payload = entry.action.payload
        driver = await self.drivers.driver_for(entry.action.ip)
        pool_set = ApprovedPoolSet.model_validate(payload["pool_set"])
        return await _Context._took(driver, pool_set, str(payload["worker"]))

    async def _verify_mode(self, entry: JournalEntry) -> bool | None:
        snapshot = await (await self.drivers.driver_for(entry.action.ip)).poll()
        if snapshot.error is not None or not snapshot.reachable or snapshot.is_mining is None:
            return None
        if entry.action.kind is ActionKind.SLEEP:
            return not snapshot.is_mining
        return True if snapshot.is_mining else None  # waking: not hashing yet is no answer

    def _recovered(self, result: ActionResult) -> tuple[Event | None, bool]:
        """One resolved action -> its event, and whether the quarantine record changed."""
        action, payload, now = result.action, result.action.payload, utcnow()
        ip = action.ip
        facts = EnforcementFacts(
            machine_id=action.machine_id,
            policy_version=payload.get("policy_version"),
            pool_set_version=payload.get("pool_set_version"),
            detected_at=payload.get("detected_at"),
            written_at=payload.get("written_at"),
            problems=list(payload.get("problems", ()))[:MAX_FACT_ITEMS],
            attempts=1,
        )
        kind: EnforcementEvent | None = None
        severity = EventSeverity.WARNING
        changed = False
        where = "after an agent restart"
        if action.kind is ActionKind.SET_POOLS and result.ok:
            kind, severity = EnforcementEvent.POOL_VERIFIED, EventSeverity.INFO
            facts = facts.model_copy(update={"verified_at": now})
            detail = f"read back on the approved pools {where} (written before it stopped)"
        elif action.kind is ActionKind.SET_POOLS:
            kind = EnforcementEvent.POOL_WRITE_FAILED
            facts = facts.model_copy(update={"cause": FailureCause.UNREACHABLE})
            detail = (
                f"pool write not verified (unreachable): interrupted by an agent restart; "
                f"{result.detail}; decided again from the next poll"
            )
        elif action.kind is ActionKind.REBOOT:
            kind = EnforcementEvent.POOL_WRITE_FAILED
            facts = facts.model_copy(update={"cause": FailureCause.PENDING_REBOOT})
            detail = (
                "pool write not verified (pending_reboot): read back unchanged; the reboot to "
                f"apply it was interrupted by an agent restart ({result.detail}); "
                "checked again next cycle"
            )
        elif result.ok and action.kind is ActionKind.SLEEP:
            kind = EnforcementEvent.QUARANTINED
            mac = payload.get("mac")
            self.quarantine.add(ip, action.serial, mac, action.machine_id, now)
            changed = True
            detail = f"hashing while unregistered: put to sleep ({where})"
        elif result.ok and action.kind is ActionKind.WAKE:
            kind, severity = EnforcementEvent.RELEASED, EventSeverity.INFO
            self.quarantine.remove(ip, action.serial, payload.get("mac"))
            changed = True
            detail = f"registered: woken ({where})"
        else:
            kind = EnforcementEvent.CANNOT_ENFORCE
            detail = f"{action.kind.value} interrupted by an agent restart: {result.detail}"
        log.info("%s on %s: %s", kind.value, action.names(), detail)
        event = Event(
            kind=kind.value,
            at=now,
            severity=severity,
            ip=IPv4Address(ip),
            detail=detail[:4096],
            data=facts.model_dump(mode="json"),
        )
        return event, changed

    def limit(self, ip: str, size: int) -> asyncio.Semaphore:
        """The per-segment bound on writes (``size`` comes from the policy in force)."""
        key = (segment_of(ip, self.segments) if self.segments else None, size)
        limit = self._limits.get(key)
        if limit is None:
            limit = self._limits[key] = asyncio.Semaphore(size)
        return limit


@dataclass
class _Write:
    observation: Observation
    decision: WritePools
    memory: Memory
    canary: bool = False


@dataclass
class _Done:
    """What one machine's action produced, merged into the report in IP order."""

    ip: str
    events: list[Event] = field(default_factory=list)
    observation: Observation | None = None
    verified: bool = False
    outcome: MachineOutcome | None = None


class _Context:
    """One pass's working state (so that :class:`Enforcer` keeps only the memory)."""

    def __init__(
        self,
        enforcer: Enforcer,
        bundle: PolicyBundle | None,
        policy: PolicyContent | None,
        act: bool,
        dry_run: bool,
        sink: Callable[[Report], Awaitable[object]] | None = None,
    ) -> None:
        self.enforcer = enforcer
        self.sink = sink
        self.settings = enforcer.settings
        self.bundle = bundle
        self.policy = policy
        self.act = act
        self.dry_run = dry_run
        self.result = EnforcementResult()
        self.events: dict[str, list[Event]] = {}
        self.readbacks: dict[str, Observation] = {}
        self.outcomes: dict[str, MachineOutcome] = {}
        self.writes: list[_Write] = []
        self.would_write: list[str] = []
        self.sleep_wake: list[tuple[Observation, Quarantine | Release, Memory]] = []
        self.serials: dict[str, str | None] = {}
        self.cycle = enforcer.passes
        self.key = (
            (bundle.version, policy.pool_set.version if policy.pool_set else None)
            if bundle is not None and policy is not None
            else None
        )

    # --- events ---------------------------------------------------------------------------------

    async def flush(self, ips: Iterable[str] | None = None) -> None:
        """Hand the events and read-backs of ``ips`` (None: everyone) to the sink, in IP order
        (each machine's in the order they happened). Without a sink they stay for the result."""
        if self.sink is None:
            return
        chosen = sorted(
            set(self.events) | set(self.readbacks) if ips is None else set(ips), key=IPv4Address
        )
        out = Report()
        for ip in chosen:
            out.events.extend(self.events.pop(ip, ()))
            readback = self.readbacks.pop(ip, None)
            if readback is not None:
                out.observations.append(readback)
        if len(out):
            await self.sink(out)

    def facts(self, machine_id: str | None, **values: Any) -> dict[str, Any]:
        pool_set = self.policy.pool_set if self.policy is not None else None
        values["problems"] = list(values.get("problems", ()))[:MAX_FACT_ITEMS]
        values["observed"] = list(values.get("observed", ()))[:MAX_FACT_ITEMS]
        return EnforcementFacts(
            machine_id=machine_id,
            policy_version=self.bundle.version if self.bundle is not None else None,
            pool_set_version=pool_set.version if pool_set is not None else None,
            dry_run=self.dry_run,
            **values,
        ).model_dump(mode="json")

    def emit(
        self,
        ip: str,
        kind: EnforcementEvent,
        detail: str,
        severity: EventSeverity,
        machine_id: str | None,
        at: datetime | None = None,
        **facts: Any,
    ) -> Event:
        event = Event(
            kind=kind.value,
            at=at or utcnow(),
            severity=severity,
            ip=IPv4Address(ip),
            detail=detail[:4096],
            data=self.facts(machine_id, **facts),
        )
        self.events.setdefault(ip, []).append(event)
        if kind in LOGGED_HERE:
            log.info("%s on %s: %s", kind.value, self.names(ip, machine_id), detail)
        return event

    def names(self, ip: str, machine_id: str | None) -> str:
        """The miner as a log line names it (IP, serial from the last poll, machine id)."""
        return miner_names(ip, self.serials.get(ip), machine_id)

    def outcome(
        self, ip: str, machine_id: str | None, decision: Decision, action: str, detail: str = ""
    ) -> None:
        self.outcomes[ip] = MachineOutcome(
            ip, machine_id, type(decision).__name__, action, detail[:300]
        )

    def fail(
        self,
        ip: str,
        write: _Write | None,
        memory: Memory,
        cause: FailureCause,
        detail: str,
        *,
        retry_in: int | None,
        severity: EventSeverity = EventSeverity.WARNING,
        observed: Sequence[PoolReading] = (),
        logged: bool = False,
    ) -> None:
        """Report a write that is not verified. ``retry_in``: cycles until it may be rewritten;
        None backs off (:func:`retry_in_cycles`, counting this failure). ``logged``: the action
        runner has already logged this failure."""
        incident = memory.incident
        assert incident is not None
        machine_id = write.decision.machine.machine_id if write is not None else None
        if retry_in is None:
            incident.failures += 1
            retry_in = retry_in_cycles(incident.failures, self.settings.retry_max_cycles)
            detail += f"; next write in {retry_in} cycle(s)"
        self.emit(
            ip,
            EnforcementEvent.POOL_WRITE_FAILED,
            f"pool write not verified ({cause.value}): {detail}",
            severity,
            machine_id,
            detected_at=incident.detected_at,
            written_at=incident.written_at,
            attempts=incident.readbacks,
            cause=cause,
            problems=incident.problems,
            observed=observed,
        )
        incident.failed = cause
        incident.retry_cycle = self.cycle + retry_in
        self.result.failed[cause.value] += 1
        if not logged:
            log.warning(
                "pool write to %s not verified (%s): %s",
                self.names(ip, machine_id),
                cause.value,
                detail,
            )

    # --- decisions ------------------------------------------------------------------------------

    def handle(self, observation: Observation, view: MinerView, decision: Decision) -> None:
        ip = str(observation.ip)
        self.serials[ip] = observation.serial
        memory = self.enforcer.memory.setdefault(ip, Memory())
        machine_id = decision.machine.machine_id if decision.machine is not None else None
        counts = self.result.counts
        if self.enforcer.actions.busy(ip):
            counts["in_flight"] += 1
            self.outcome(ip, machine_id, decision, "action in flight")
            return
        if memory.acted_at is not None and observation.observed_at < memory.acted_at:
            counts["stale"] += 1
            self.outcome(ip, machine_id, decision, "stale", "observed before its last action ended")
            return
        if isinstance(decision, Compliant):
            self._compliant(observation, decision, memory)
        elif isinstance(decision, Exempt):
            counts["exempt"] += 1
            memory.incident, memory.cannot = None, None
            self.outcome(
                ip,
                machine_id,
                decision,
                "exempt",
                f"until {decision.until:%Y-%m-%d %H:%M}Z: {decision.reason}",
            )
        elif isinstance(decision, Unknown):
            counts["unknown"] += 1
            self.outcome(ip, machine_id, decision, "unknown", decision.reason)
        elif isinstance(decision, Quarantined):
            counts["quarantined"] += 1
            self.outcome(ip, machine_id, decision, "asleep (quarantined)")
        elif isinstance(decision, CannotEnforce):
            self._cannot(observation, decision, memory)
        elif isinstance(decision, WritePools):
            self._drift(observation, decision, memory)
        elif isinstance(decision, Quarantine | Release):
            verb = "sleep" if isinstance(decision, Quarantine) else "wake"
            if self.act:
                self.sleep_wake.append((observation, decision, memory))
            else:
                counts["quarantined" if verb == "sleep" else "released"] += 1
                self.outcome(ip, machine_id, decision, f"would {verb}")

    def _compliant(self, observation: Observation, decision: Compliant, memory: Memory) -> None:
        ip = str(observation.ip)
        incident = memory.incident
        machine_id = decision.machine.machine_id
        if incident is not None and incident.written_at is not None and incident.failed is not None:
            after_reboot = incident.pending_reboot
            self.emit(
                ip,
                EnforcementEvent.POOL_VERIFIED,
                "on the approved pools"
                + (" after the reboot" if after_reboot else " (read on a later cycle)"),
                EventSeverity.INFO,
                machine_id,
                at=observation.observed_at,
                detected_at=incident.detected_at,
                written_at=incident.written_at,
                verified_at=observation.observed_at,
                attempts=incident.readbacks + 1,
                after_reboot=after_reboot,
                observed=observation.pools,
            )
            self.result.counts["verified"] += 1
            self.outcome(
                ip, machine_id, decision, "verified", "after reboot" if after_reboot else ""
            )
        else:
            self.outcome(ip, machine_id, decision, "compliant")
        self.result.counts["compliant"] += 1
        memory.incident, memory.cannot = None, None

    def _open(
        self, observation: Observation, machine_id: str, problems: tuple[str, ...], memory: Memory
    ) -> Incident:
        """The incident in progress, or a new one (with its one ``pool_drift`` event)."""
        if memory.incident is not None:
            return memory.incident
        incident = Incident(detected_at=observation.observed_at, problems=problems)
        memory.incident = incident
        log.warning(
            "pool drift on %s: %s", self.names(str(observation.ip), machine_id), "; ".join(problems)
        )
        self.emit(
            str(observation.ip),
            EnforcementEvent.POOL_DRIFT,
            "off the approved pools: " + "; ".join(problems),
            EventSeverity.WARNING,
            machine_id,
            at=observation.observed_at,
            detected_at=observation.observed_at,
            problems=problems,
            observed=observation.pools,
        )
        return incident

    def _cannot(self, observation: Observation, decision: CannotEnforce, memory: Memory) -> None:
        ip = str(observation.ip)
        machine_id = decision.machine.machine_id
        if decision.problems:
            self._open(observation, machine_id, decision.problems, memory)
        if memory.cannot != decision.reason:
            self.emit(
                ip,
                EnforcementEvent.CANNOT_ENFORCE,
                decision.reason,
                EventSeverity.WARNING,
                machine_id,
                at=observation.observed_at,
                problems=decision.problems,
                observed=observation.pools,
            )
            memory.cannot = decision.reason
        self.result.counts["cannot_enforce"] += 1
        self.outcome(ip, machine_id, decision, "cannot enforce", decision.reason)

    def _drift(self, observation: Observation, decision: WritePools, memory: Memory) -> None:
        ip = str(observation.ip)
        machine_id = decision.machine.machine_id
        incident = self._open(observation, machine_id, decision.problems, memory)
        incident.problems = decision.problems
        memory.cannot = None
        counts = self.result.counts
        if incident.pending_reboot:
            incident.pending_reboot = False
            self.fail(
                ip,
                _Write(observation, decision, memory),
                memory,
                FailureCause.IGNORED,
                "the write was acknowledged, but the pools are unchanged even after a reboot",
                retry_in=None,
                severity=EventSeverity.CRITICAL,
                observed=observation.pools,
            )
            self.outcome(ip, machine_id, decision, "failed: write_ignored")
            return
        if not self.act:
            counts["drift"] += 1
            self.would_write.append(ip)
            targets = ", ".join(t.url for t in decision.targets)
            verb = "would write" if self.dry_run else "drift (observe)"
            self.outcome(
                ip,
                machine_id,
                decision,
                verb,
                f"{targets} as {decision.worker}: " + "; ".join(decision.problems),
            )
            return
        if incident.retry_cycle > self.cycle:
            counts["backing_off"] += 1
            self.outcome(
                ip,
                machine_id,
                decision,
                "backing off",
                f"after {incident.failed}; next write in "
                f"{incident.retry_cycle - self.cycle} cycle(s)",
            )
            return
        if self.key is not None and self.enforcer.rollouts.get(self.key) is RolloutState.HALTED:
            if incident.failed is not FailureCause.HALTED:
                self.fail(
                    ip,
                    _Write(observation, decision, memory),
                    memory,
                    FailureCause.HALTED,
                    f"not attempted: the rollout of policy version {self.key[0]} halted "
                    "(too many of its writes failed)",
                    retry_in=0,
                    observed=observation.pools,
                )
            self.outcome(ip, machine_id, decision, "not attempted: rollout halted")
            return
        self.writes.append(_Write(observation, decision, memory))

    # --- actions --------------------------------------------------------------------------------

    async def act_on_sleep_and_wake(self) -> None:
        """Sleep and wake, then store the quarantine record if it changed (so that a restart,
        or the daemon after a one-shot run, still knows whom to wake)."""
        if not self.sleep_wake:
            return
        size = self.policy.rollout.writes_per_segment if self.policy is not None else 8
        self.enforcer.quarantine.reload()  # a one-shot run may have changed it meanwhile
        done = await asyncio.gather(
            *(self._sleep_or_wake(o, d, m, size) for o, d, m in self.sleep_wake)
        )
        if any(done):
            self.enforcer.quarantine.save()

    async def _sleep_or_wake(
        self, observation: Observation, decision: Quarantine | Release, memory: Memory, size: int
    ) -> bool:
        """Whether the miner took it (and the quarantine record changed)."""
        ip = str(observation.ip)
        machine_id = decision.machine.machine_id
        sleeping = isinstance(decision, Quarantine)
        action = Action(
            ActionKind.SLEEP if sleeping else ActionKind.WAKE,
            ip,
            serial=observation.serial,
            machine_id=machine_id,
            payload={"mac": observation.mac, "policy_version": self.key[0] if self.key else None},
        )
        async with self.enforcer.limit(ip, size):
            try:
                driver = await self.enforcer.drivers.driver_for(ip)
                result = await self.enforcer.actions.run(
                    action, lambda: driver.sleep() if sleeping else driver.wake()
                )
            except DriverError as exc:
                result = ActionResult(action, False, exc.kind, exc.reason, 0, exc)
            memory.acted_at = utcnow()
            if not result.ok:
                _, why = action_failure(result)
                reason = f"{'sleep' if sleeping else 'wake'} failed: {why}"
                if memory.cannot != reason:
                    self.emit(
                        ip,
                        EnforcementEvent.CANNOT_ENFORCE,
                        reason,
                        EventSeverity.WARNING,
                        machine_id,
                    )
                    memory.cannot = reason
                self.result.counts["cannot_enforce"] += 1
                self.outcome(ip, machine_id, decision, "failed", reason)
                return False
        memory.cannot = None
        record = self.enforcer.quarantine
        if sleeping:
            record.add(ip, observation.serial, observation.mac, machine_id, utcnow())
            self.emit(
                ip,
                EnforcementEvent.QUARANTINED,
                "hashing while unregistered: put to sleep until it is claimed",
                EventSeverity.WARNING,
                machine_id,
                detected_at=observation.observed_at,
            )
            self.result.counts["quarantined"] += 1
            self.outcome(ip, machine_id, decision, "put to sleep")
        else:
            record.remove(ip, observation.serial, observation.mac)
            self.emit(
                ip, EnforcementEvent.RELEASED, "registered: woken", EventSeverity.INFO, machine_id
            )
            self.result.counts["released"] += 1
            self.outcome(ip, machine_id, decision, "woken")
        return True

    async def write_all(self) -> None:
        """Write the machines that need it. Under a new version: the canary first, then the
        rest in growing waves, halting as soon as too many of the writes so far failed."""
        if self.policy is None or self.key is None or not self.act:
            return
        rollout = self.policy.rollout
        rollouts = self.enforcer.rollouts
        writes = sorted(self.writes, key=lambda w: IPv4Address(str(w.observation.ip)))
        if self.key in rollouts:
            await self._write(writes, rollout.writes_per_segment, rollout.verify_attempts)
            return
        rollouts.clear()
        attempted = failed = 0
        for number, wave in enumerate(waves_of(writes, rollout.canary_size)):
            for write in wave:
                write.canary = number == 0
            verified = await self._write(wave, rollout.writes_per_segment, rollout.verify_attempts)
            attempted += len(wave)
            failed += len(wave) - verified
            if failed / attempted > rollout.max_failure_rate:
                self._halt(number, attempted, failed, writes[:attempted], writes[attempted:])
                return
        rollouts[self.key] = RolloutState.DONE

    def _halt(
        self,
        wave: int,
        attempted: int,
        failed: int,
        written: Sequence[_Write],
        rest: Sequence[_Write],
    ) -> None:
        """Stop the rollout of this version: one critical event, every machine not yet written
        told why, and no further write under this version."""
        assert self.policy is not None and self.key is not None
        rollout = self.policy.rollout
        self.enforcer.rollouts[self.key] = RolloutState.HALTED
        self.result.halted = True
        where = "its canary" if wave == 0 else f"wave {wave} after the canary"
        failures = [
            f"{w.observation.ip}: {w.memory.incident.failed}"
            for w in written
            if w.memory.incident is not None and w.memory.incident.failed
        ]
        halted = self.emit(
            str(written[0].observation.ip),
            EnforcementEvent.ROLLOUT_HALTED,
            f"policy version {self.key[0]}: {failed} of {attempted} write(s) failed by "
            f"{where} (more than {rollout.max_failure_rate:.0%}); {len(rest)} machine(s) not "
            "attempted, no further writes under this version",
            EventSeverity.CRITICAL,
            None,
            problems=failures[-MAX_FACT_ITEMS:],
            rollout_attempted=attempted,
            rollout_failed=failed,
        )
        log.critical("%s", halted.detail)
        for write in rest:
            ip = str(write.observation.ip)
            self.fail(
                ip,
                write,
                write.memory,
                FailureCause.HALTED,
                f"not attempted: the rollout of policy version {self.key[0]} halted after "
                f"{failed} of {attempted} write(s) failed",
                retry_in=0,
                observed=write.observation.pools,
            )
            self.outcome(
                ip,
                write.decision.machine.machine_id,
                write.decision,
                "not attempted: rollout halted",
            )

    def _mark_canary(self) -> None:
        """Dry run: flag the machines that would be the canary of a new version."""
        if self.policy is None or self.key in self.enforcer.rollouts:
            return
        canary = sorted(self.would_write, key=IPv4Address)[: self.policy.rollout.canary_size]
        for ip in canary:
            if ip in self.outcomes:
                self.outcomes[ip].canary = True

    async def _write(self, writes: Sequence[_Write], size: int, attempts: int) -> int:
        done = await asyncio.gather(*(self._write_one(w, size, attempts) for w in writes))
        return sum(1 for ok in done if ok)

    async def _write_one(self, write: _Write, size: int, attempts: int) -> bool:
        try:
            async with self.enforcer.limit(str(write.observation.ip), size):
                try:
                    return await self._write_and_verify(write, attempts)
                finally:
                    write.memory.acted_at = utcnow()
                    await self.flush([str(write.observation.ip)])
        except Exception as exc:  # a driver bug must not end the pass for everyone else
            log.exception("enforcement write to %s failed unexpectedly", write.observation.ip)
            ip = str(write.observation.ip)
            if write.memory.incident is not None:
                self.fail(
                    ip,
                    write,
                    write.memory,
                    FailureCause.REFUSED,
                    f"internal error: {exc!r}"[:300],
                    retry_in=None,
                )
            return False

    async def _write_and_verify(self, write: _Write, attempts: int) -> bool:
        observation, decision, memory = write.observation, write.decision, write.memory
        ip = str(observation.ip)
        machine_id = decision.machine.machine_id
        incident = memory.incident
        assert incident is not None and self.policy is not None and self.policy.pool_set is not None
        pool_set = writable_set(self.policy.pool_set)
        label = "canary write" if write.canary else "write"
        self.result.counts["written"] += 1
        incident.written_at = written_at = utcnow()
        incident.writes += 1
        incident.failed = None
        incident.readbacks = 0
        targets = [t.url for t in decision.targets]
        self.emit(
            ip,
            EnforcementEvent.POOL_WRITE,
            f"wrote {', '.join(targets)} as {decision.worker}"
            + (" (canary)" if write.canary else ""),
            EventSeverity.INFO,
            machine_id,
            at=written_at,
            detected_at=incident.detected_at,
            written_at=written_at,
            problems=decision.problems,
            observed=observation.pools,
        )
        action = Action(
            ActionKind.SET_POOLS,
            ip,
            serial=observation.serial,
            machine_id=machine_id,
            payload={
                "targets": [{"url": t.url, "user": t.user} for t in decision.targets],
                "worker": decision.worker,
                "pool_set": pool_set.model_dump(mode="json"),
                "policy_version": self.key[0] if self.key else None,
                "pool_set_version": self.key[1] if self.key else None,
                "detected_at": incident.detected_at.isoformat(),
                "written_at": written_at.isoformat(),
                "problems": list(decision.problems)[:MAX_FACT_ITEMS],
                "canary": write.canary,
            },
        )
        try:
            driver = await self.enforcer.drivers.driver_for(ip)
            result = await self.enforcer.actions.run(
                action,
                lambda: driver.set_pools(decision.targets),
                verify=lambda: self._took(driver, pool_set, decision.worker),
            )
        except DriverError as exc:
            result = ActionResult(action, False, exc.kind, exc.reason, 0, exc)
        if not result.ok:
            cause, why = action_failure(result)
            self.fail(
                ip,
                write,
                memory,
                cause,
                why,
                retry_in=1 if cause is FailureCause.UNREACHABLE else None,
                logged=True,
            )
            self.outcome(ip, machine_id, decision, f"failed: {cause.value}", result.detail)
            return False
        snapshot: PollSnapshot | None = None
        read: PollSnapshot | None = None
        hidden = False
        delays = self.settings.verify_delays_s or (0.0,)
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                await asyncio.sleep(delays[min(attempt - 2, len(delays) - 1)])
            snapshot = await driver.poll()
            incident.readbacks = attempt
            if snapshot.error is not None or not snapshot.reachable:
                continue
            read = snapshot
            readings = readings_of(snapshot)
            if assess_pools(pool_set, decision.worker, readings).compliant:
                self.readbacks[ip] = self._observation(snapshot, observation)
                self.emit(
                    ip,
                    EnforcementEvent.POOL_VERIFIED,
                    f"read back on the approved pools ({label}, {attempt} read(s))",
                    EventSeverity.INFO,
                    machine_id,
                    at=snapshot.observed_at,
                    detected_at=incident.detected_at,
                    written_at=written_at,
                    verified_at=snapshot.observed_at,
                    attempts=attempt,
                    observed=readings,
                )
                self.result.counts["verified"] += 1
                self.outcome(ip, machine_id, decision, "verified", label)
                memory.incident = None
                return True
            if only_extra_pools(pool_set, decision.worker, readings):
                hidden = True
                break
        if snapshot is not None:
            self.readbacks[ip] = self._observation(snapshot, observation)
        went_dark = snapshot is not None and (snapshot.error is not None or not snapshot.reachable)
        if read is None or (went_dark and not hidden):
            # Firmware often restarts its mining process (or the whole controller) to apply
            # pools: silence is not "ignored", and rebooting it now would only interrupt that.
            detail = (
                f"no answer to {incident.readbacks} read-back(s) after the write"
                if read is None
                else f"stopped answering during the read-backs ({incident.readbacks} read(s); "
                "restarting to apply?)"
            )
            self.fail(
                ip,
                write,
                memory,
                FailureCause.UNREACHABLE,
                detail + "; judged again on the next cycle it answers",
                retry_in=1,
            )
            self.outcome(ip, machine_id, decision, "failed: unreachable", "no read-back")
            return False
        readings = readings_of(read)
        if hidden:
            self.fail(
                ip,
                write,
                memory,
                FailureCause.HIDDEN_POOL,
                "the approved pools are in place, but the miner still reports an unapproved "
                "extra pool",
                retry_in=None,
                severity=EventSeverity.CRITICAL,
                observed=readings,
            )
            self.outcome(ip, machine_id, decision, "failed: hidden_pool")
            return False
        reboot = await self.enforcer.actions.run(
            Action(
                ActionKind.REBOOT,
                ip,
                serial=observation.serial,
                machine_id=machine_id,
                payload={"why": "pool write read back unchanged", "pool_write": action.id},
            ),
            driver.reboot,
        )
        if not reboot.ok:
            _, why = action_failure(reboot)
            self.fail(
                ip,
                write,
                memory,
                FailureCause.IGNORED,
                f"acknowledged but read back unchanged after {incident.readbacks} read(s); "
                f"the reboot to apply it failed ({why})",
                retry_in=None,
                severity=EventSeverity.CRITICAL,
                observed=readings,
            )
            self.outcome(ip, machine_id, decision, "failed: write_ignored", "reboot failed")
            return False
        self.fail(
            ip,
            write,
            memory,
            FailureCause.PENDING_REBOOT,
            f"acknowledged but read back unchanged after {incident.readbacks} read(s); rebooted "
            "so that it applies; checked again next cycle",
            retry_in=0,
            observed=readings,
        )
        incident.pending_reboot = True
        self.outcome(ip, machine_id, decision, "failed: pending_reboot", "rebooted")
        return False

    @staticmethod
    async def _took(driver: MinerDriver, pool_set: ApprovedPoolSet, worker: str) -> bool | None:
        """Read back whether a pool write landed (None: no answer)."""
        snapshot = await driver.poll()
        if snapshot.error is not None or not snapshot.reachable:
            return None
        return assess_pools(pool_set, worker, readings_of(snapshot)).compliant

    @staticmethod
    def _observation(snapshot: PollSnapshot, polled: Observation) -> Observation:
        return snapshot.to_observation().model_copy(
            update={"mac": polled.mac, "serial": polled.serial}
        )

    def finish(self) -> None:
        """Merge per-machine events, read-backs and outcomes into the result, in IP order."""
        if self.dry_run:
            self._mark_canary()
        result = self.result
        for ip in sorted(self.events, key=IPv4Address):
            result.report.events.extend(self.events[ip])
        for ip in sorted(self.readbacks, key=IPv4Address):
            result.report.observations.append(self.readbacks[ip])
        result.outcomes = [self.outcomes[ip] for ip in sorted(self.outcomes, key=IPv4Address)]
