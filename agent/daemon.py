"""The agent daemon: discovery, poll cycles and the outbox drain, on a schedule.

:class:`FleetAgent` is the work without the clock: one discovery scan, one poll cycle, storing a
cycle's reports in the outbox. It asks :class:`~agent.coordinator.PollCoordinator` what to do,
does the I/O through the drivers, and hands the results back. Tests drive it directly.

:class:`Daemon` puts it on APScheduler 3's ``AsyncIOScheduler``: discovery right away and then
every ``discovery_interval_s``; the poll cycle every ``poll_interval_s`` from the moment the
first scan has finished (identity re-reads ride in the cycles, as the coordinator decides);
the pools-only drift check every ``pools_check_interval_s`` beside it; the status file every
few seconds.

Reads and writes are apart: a poll cycle stores its observations and *offers* them to
enforcement; it never waits on a write. Writes (pools, reboot, sleep/wake, power) are actions
(:mod:`agent.actions`) worked by the action worker (:meth:`FleetAgent.work_actions`, a
long-lived task): it first resolves what a previous run left dispatched (read back, reported),
then runs one enforcement pass over the newest observations whenever some were offered. A pass
that takes minutes (a segment being rewritten) delays the next pass, never the next poll.

The outbox drain is the uplink's own loop (:meth:`agent.uplink.Uplink.run`), woken after each
stored cycle: its pace is set by the controller's answers and the backoff, not by a clock.

Reports reach the outbox *before* anything is pushed: a cycle's batches are stored (fsync'd)
and only then does the drain see them, so a kill -9 at any point loses at most the cycle in
flight and never doubles one (the controller de-duplicates by batch id).

SIGTERM/SIGINT: no new jobs start; the cycle or scan in flight finishes and stores its reports;
the drain gets a last chance to deliver everything (bounded by ``flush_timeout_s``); whatever
is left stays in the outbox for the next start. The status file says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import httpx
from apscheduler.schedulers.asyncio import AsyncIOScheduler  # type: ignore[import-untyped]

from agent.actions import ActionRunner, ActionSettings, Journal
from agent.actions.kinds import miner_names
from agent.config import AgentConfig, AgentSecrets, atomic_write
from agent.coordinator import (
    CoordinatorSettings,
    Outcome,
    PollCoordinator,
    Report,
    Task,
    pack,
    segment_of,
)
from agent.discovery import Discovery
from agent.drivers import DriverOptions
from agent.drivers.base import Identity, MinerLogin, PollSnapshot, utcnow
from agent.drivers.factory import DriverFactory
from agent.enforce.decide import CannotEnforce, WritePools, decide
from agent.enforce.executor import EnforcementResult, Enforcer, EnforcerSettings
from agent.errors import AgentError, DriverError, OutboxError, OutboxFull, Timeout, UplinkError
from agent.outbox import Outbox
from agent.policy import PolicyGuard, PolicyRefused, policy_path
from agent.uplink import Uplink
from contract.policy import PolicyBundle
from contract.reports import Event, EventSeverity, IdentityRecord, Observation, ReportBatch
from contract.text import clean_text

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
STATUS_VERSION = 1
STATUS_INTERVAL_S = 5.0
JOURNAL_KEEP = timedelta(days=7)
"""Finished actions stay in the journal this long (the evidence is the events, not the
journal); pruned at start and then hourly by the action worker."""
MAX_HELD_BATCHES = 1000
"""Batches kept in memory while the outbox cannot take them (disk full); beyond this the
oldest held batches lose their observations, never their identities or events."""


def miner_credentials(secrets: AgentSecrets) -> dict[str, MinerLogin]:
    """The secrets file's ``[miners.<family>]`` logins as the drivers take them."""
    logins = {}
    for family, creds in secrets.miners.items():
        password = creds.password.get_secret_value() if creds.password is not None else None
        logins[family] = MinerLogin(username=creds.username, password=password)
    return logins


def status_path(config: AgentConfig) -> Path:
    return config.data_dir / STATUS_FILE


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _reason(error: BaseException) -> str:
    """One clean line (what went wrong may quote a miner's own words)."""
    if isinstance(error, DriverError):
        return f"{error.kind}: {error.reason}"
    line = " ".join(f"error: {type(error).__name__}: {error}".split())
    return clean_text(line, 300).text


@dataclass
class CycleReport:
    """What one poll cycle did (the status file's ``last_cycle``)."""

    cycle: int
    started_at: datetime
    finished_at: datetime | None = None
    duration_s: float = 0.0
    planned: int = 0
    polled: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    identities: int = 0
    observations: int = 0
    events: int = 0
    batches: int = 0
    stored: int = 0
    errors: dict[str, str] = field(default_factory=dict)
    enforcement: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["started_at"] = _iso(self.started_at)
        data["finished_at"] = _iso(self.finished_at)
        data["errors"] = dict(list(self.errors.items())[:20])  # a sample; the reports have all
        return data


@dataclass
class DiscoveryReport:
    """What one discovery scan did (the status file's ``last_discovery``)."""

    started_at: datetime
    duration_s: float = 0.0
    networks: list[str] = field(default_factory=list)
    probed: int = 0
    responded: int = 0
    identified: int = 0
    unidentified: int = 0
    gone: int = 0
    dropped: int = 0
    known: int = 0
    stored: int = 0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["started_at"] = _iso(self.started_at)
        return data


@dataclass
class PoolsCheckReport:
    """What one pools-only drift check did (the status file's ``last_pools_check``)."""

    started_at: datetime
    duration_s: float = 0.0
    checked: int = 0
    failed: int = 0
    drifted: int = 0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["started_at"] = _iso(self.started_at)
        return data


@dataclass(frozen=True)
class _Done:
    """One miner's task, done: the outcome for the coordinator and what to report."""

    outcome: Outcome
    observation: Observation | None
    identity: IdentityRecord | None
    events: tuple[Event, ...] = ()


class FleetAgent:
    """Discovery, poll cycles and storing reports, without any scheduling.

    With a ``policy`` guard, every poll cycle, once its reports are stored, offers its
    observations to enforcement; :meth:`enforce_pending` (the action worker's step, see
    :meth:`work_actions`) runs a pass over them under the guard's current bundle
    (:mod:`agent.enforce`) and stores its events and read-backs. :meth:`check_pools` offers the
    machines a pools-only read finds newly off their pools. Offer new bundles with
    :meth:`offer_policy`.
    """

    def __init__(
        self,
        config: AgentConfig,
        outbox: Outbox,
        *,
        credentials: dict[str, MinerLogin] | None = None,
        factory: DriverFactory | None = None,
        on_stored: Callable[[], None] | None = None,
        policy: PolicyGuard | None = None,
        enforcer_settings: EnforcerSettings | None = None,
    ) -> None:
        polling = config.polling
        self.config = config
        self.outbox = outbox
        self.on_stored = on_stored
        self.segments: tuple[IPv4Network, ...] = tuple(config.segments)
        self.miner_timeout_s = polling.miner_timeout_s
        self.identify_timeout_s = min(
            max(3.0, 2 * polling.miner_timeout_s), polling.poll_interval_s
        )
        self.factory = factory or DriverFactory(
            credentials=credentials or {},
            options=DriverOptions(timeout=polling.miner_timeout_s),
            identify_timeout=self.identify_timeout_s,
        )
        self.coordinator = PollCoordinator(
            CoordinatorSettings(
                poll_interval_s=polling.poll_interval_s,
                identity_interval_s=polling.identity_interval_s,
            )
        )
        self.discovery = Discovery(
            self.factory, self.segments, concurrency=polling.concurrency_per_segment
        )
        self.cycles = 0
        self.last_cycle: CycleReport | None = None
        self.last_discovery: DiscoveryReport | None = None
        self._limits: dict[IPv4Network | None, asyncio.Semaphore] = {}
        self._held: list[ReportBatch] = []
        self._full_since: datetime | None = None
        self._cleaned: dict[str, tuple[str, ...]] = {}
        self.policy = policy
        self.journal = Journal(config.journal_path)
        self.actions = ActionRunner(
            self.journal, self.segments, ActionSettings.from_config(config.actions)
        )
        self.enforcer = Enforcer(
            self.factory,
            self.segments,
            enforcer_settings,
            data_dir=config.data_dir,
            actions=self.actions,
        )
        self.last_enforcement: EnforcementResult | None = None
        self.last_pools_check: PoolsCheckReport | None = None
        self.pools_checks = 0
        self.enforcement_wanted = asyncio.Event()
        self._offered: dict[str, Observation] = {}
        self._offered_cycle = False
        self._recovered = False
        self._pruned_at: datetime | None = None

    # --- policy ---------------------------------------------------------------------------------

    async def offer_policy(self, bundle: PolicyBundle) -> bool:
        """Verify ``bundle`` and put it in force; on refusal store the alert (once per refused
        bundle) and keep the last valid one. Returns whether the bundle is in force now."""
        if self.policy is None:
            raise AgentError("no policy guard: this agent has no pinned controller key")
        try:
            self.policy.accept(bundle)
        except PolicyRefused as exc:
            await self.refused(exc)
            return False
        return True

    async def refused(self, refusal: PolicyRefused) -> None:
        """Report a refused bundle to the controller (not again for the same bundle)."""
        if not refusal.repeated:
            await self.store(Report(events=[refusal.event]))

    # --- discovery ------------------------------------------------------------------------------

    async def discover(self) -> DiscoveryReport:
        """Scan every configured segment; identify new miners; report who appeared or vanished."""
        started = utcnow()
        report = DiscoveryReport(started_at=started, networks=[str(n) for n in self.segments])
        result = await self.discovery.scan(self.segments, known=self.coordinator.ips)
        now = utcnow()
        decision = self.coordinator.apply_scan(
            self.segments, result.responded, result.found, result.failed, now
        )
        for ip in decision.dropped:
            self.factory.forget(ip)
        out = Report(events=list(decision.events))
        for ip in decision.added:
            found = result.found[ip]
            try:  # one miner's identity that cannot be reported must not cost the scan
                out.identities.append(found.to_record(now))
            except Exception as exc:
                log.exception("%s: identity cannot be reported", ip)
                out.events.append(
                    Event(kind="identity_unreportable", at=now, severity=EventSeverity.WARNING,
                          ip=IPv4Address(ip), detail=_reason(exc)[:4096])
                )  # fmt: skip
            out.events.extend(self._cleaning_events(ip, found.cleaned, now))
        self.log_events(out.events)
        report.stored = await self.store(out)
        report.duration_s = result.duration_s
        report.probed = result.probed
        report.responded = len(result.responded)
        report.identified = len(decision.added)
        report.unidentified = len(result.failed)
        report.gone = len(decision.gone)
        report.dropped = len(decision.dropped)
        report.known = len(self.coordinator.ips)
        self.last_discovery = report
        log.info(
            "discovery: %d addresses probed in %s, %d answered, %d new identified, "
            "%d not identifiable, %d gone, %d dropped (%.1f s)",
            result.probed,
            ", ".join(report.networks),
            report.responded,
            report.identified,
            report.unidentified,
            report.gone,
            report.dropped,
            result.duration_s,
        )
        return report

    # --- the poll cycle -------------------------------------------------------------------------

    def _limit(self, ip: str) -> asyncio.Semaphore:
        segment = segment_of(ip, self.segments)
        limit = self._limits.get(segment)
        if limit is None:
            limit = asyncio.Semaphore(self.config.polling.concurrency_per_segment)
            self._limits[segment] = limit
        return limit

    def budget_s(self, task: Task) -> float:
        """The most one miner's task may take once it runs: its own timeouts plus a margin,
        never more than most of the poll interval (so one miner cannot hold up a cycle)."""
        t = self.miner_timeout_s
        budget = t + 1.0
        if task.rebuild:
            budget += self.identify_timeout_s + 2 * t
        elif task.read_identity:
            budget += 2 * t
        return min(budget, 0.9 * self.config.polling.poll_interval_s)

    async def poll_cycle(self) -> CycleReport:
        """Poll every miner due this cycle (bounded per segment, each under its own budget),
        fold the outcomes into the coordinator and store the cycle's reports."""
        self.cycles += 1
        cycle = self.cycles
        started = utcnow()
        clock = time.monotonic()
        plan = self.coordinator.plan(cycle, started)
        report = CycleReport(cycle=cycle, started_at=started, planned=len(plan.tasks))
        done = await asyncio.gather(*(self._bounded(task) for task in plan.tasks))
        out = Report()
        now = utcnow()
        for item in done:
            outcome = item.outcome
            out.events.extend(self.coordinator.record(outcome, cycle, now))
            if outcome.polled is not None:
                report.polled += 1
            if outcome.polled is True:
                report.ok += 1
            else:
                report.failed += 1
                report.errors[outcome.ip] = outcome.error or "failed"
            if item.identity is not None:
                out.identities.append(item.identity)
            if item.observation is not None:
                out.observations.append(item.observation)
            out.events.extend(item.events)
        for skip in plan.skipped:
            report.skipped += 1
            if skip.observation is not None:
                out.observations.append(skip.observation)
        out.observations.sort(key=lambda o: o.ip)
        self.log_events(out.events)
        report.identities = len(out.identities)
        report.observations = len(out.observations)
        report.events = len(out.events)
        batches_before = len(self._held)
        report.stored = await self.store(out)
        report.batches = report.stored + len(self._held) - batches_before
        self.offer(out.observations, cycle=True)  # stored first; enforcement works them apart
        if self.last_enforcement is not None:
            report.enforcement = self.last_enforcement.summary()
        report.finished_at = utcnow()
        report.duration_s = round(time.monotonic() - clock, 3)
        self.last_cycle = report
        log.info(
            "cycle %d: %d polled, %d ok, %d failed, %d backing off, %d identities, %d events, "
            "%d batch(es) stored in %.2f s",
            cycle,
            report.polled,
            report.ok,
            report.failed,
            report.skipped,
            report.identities,
            report.events,
            report.stored,
            report.duration_s,
        )
        return report

    def log_events(self, events: list[Event]) -> None:
        """One log line per event about a miner (unavailable, recovered, identity changed …),
        naming it by IP, serial and machine id when known."""
        bundle = self.policy.current if self.policy is not None else None
        index = self.enforcer.machine_index(bundle) if bundle is not None else None
        for event in events:
            if event.ip is None:
                continue
            ip = str(event.ip)
            record = self.coordinator.record_of(ip)
            identity = record.identity if record is not None else None
            serial = identity.serial if identity is not None else None
            machine = index.find(serial, identity.mac) if index and identity else None
            level = logging.INFO if event.severity == EventSeverity.INFO else logging.WARNING
            names = miner_names(ip, serial, machine.machine_id if machine else None)
            log.log(level, "%s on %s: %s", event.kind, names, event.detail)

    # --- enforcement: the action worker ---------------------------------------------------------

    def offer(self, observations: list[Observation], *, cycle: bool = False) -> None:
        """Hand observations to enforcement (the newest per miner wins) and wake the worker.
        ``cycle``: they come from a full poll (backoffs count those passes)."""
        offered = self._offered
        for observation in observations:
            ip = str(observation.ip)
            before = offered.get(ip)
            if before is None or observation.observed_at >= before.observed_at:
                offered[ip] = observation
        self._offered_cycle |= cycle
        if observations:
            self.enforcement_wanted.set()

    async def recover(self) -> int:
        """Resolve the actions a previous run left unfinished (read back, reported); store
        their outcomes. Returns how many were resolved."""
        report = await self.enforcer.recover()
        self._recovered = True
        if len(report):
            await self.store(report)
            log.info("actions: %d left unfinished by the last run resolved", len(report.events))
        return len(report.events)

    async def enforce_pending(self) -> EnforcementResult | None:
        """One enforcement pass over what was offered since the last one, its events and
        read-backs stored (the action worker's step; tests call it after a cycle)."""
        self.enforcement_wanted.clear()
        if not self._recovered or self.actions.in_doubt:
            await self.recover()
        observations = sorted(self._offered.values(), key=lambda o: o.ip)
        new_cycle, self._offered, self._offered_cycle = self._offered_cycle, {}, False
        if not observations:
            return None
        result = await self.enforce(observations, new_cycle=new_cycle)
        if result is not None and len(result.report):  # what the pass did not store itself
            await self.store(result.report)
        return result

    async def work_actions(self, stop: asyncio.Event) -> None:
        """The action worker: resolve the last run's unfinished actions, then one enforcement
        pass each time observations are offered, until ``stop``."""
        try:
            await self.recover()
            await self.prune_journal()
        except Exception:
            log.exception("recovering the action journal failed")
        while not stop.is_set():
            wanted = asyncio.ensure_future(self.enforcement_wanted.wait())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({wanted, stopping}, return_when=asyncio.FIRST_COMPLETED)
            wanted.cancel()
            stopping.cancel()
            if stop.is_set():
                break
            try:
                await self.enforce_pending()
                await self.prune_journal()
            except Exception:  # the worker must outlive one bad pass
                log.exception("enforcement pass failed")

    async def prune_journal(self) -> None:
        """Forget finished actions older than :data:`JOURNAL_KEEP` (at most hourly)."""
        now = utcnow()
        if self._pruned_at is not None and now - self._pruned_at < timedelta(hours=1):
            return
        self._pruned_at = now
        pruned = await asyncio.to_thread(self.journal.prune, now - JOURNAL_KEEP)
        if pruned:
            log.info("actions: %d finished action(s) older than %s pruned", pruned, JOURNAL_KEEP)

    async def enforce(
        self, observations: list[Observation], *, new_cycle: bool = True
    ) -> EnforcementResult | None:
        """One enforcement pass under the policy in force (None: no policy, nothing done)."""
        bundle = self.policy.current if self.policy is not None else None
        if bundle is None:
            return None
        try:
            result = await self.enforcer.run(
                bundle, observations, new_cycle=new_cycle, sink=self.store
            )
        except Exception:  # one bad pass must not end the worker
            log.exception("enforcement pass failed")
            return None
        self.last_enforcement = result
        counts = result.summary()
        log.info(
            "enforcement (policy %d, %s): %d compliant, %d written, %d verified, %s failed, "
            "%d cannot enforce, %d exempt, %d unknown",
            bundle.version,
            bundle.content.mode,
            counts["compliant"],
            counts["written"],
            counts["verified"],
            sum(counts["failed"].values()),
            counts["cannot_enforce"],
            counts["exempt"],
            counts["unknown"],
        )
        return result

    async def check_pools(self) -> PoolsCheckReport | None:
        """The drift check between full polls: read every healthy known miner's pools and offer
        to enforcement the ones newly off their approved pools (same decision, same events as
        a full poll's drift). Nothing is stored here: the drift event and the read-backs are.
        None: no policy with a pool set is in force."""
        bundle = self.policy.current if self.policy is not None else None
        if bundle is None or bundle.content.pool_set is None:
            return None
        self.pools_checks += 1
        started, clock = utcnow(), time.monotonic()
        report = PoolsCheckReport(started_at=started)
        index = self.enforcer.machine_index(bundle)
        records = [
            r
            for r in self.coordinator.records()
            if r.identity is not None and r.failures == 0 and r.ip in self.factory.drivers
        ]

        async def read(ip: str) -> PollSnapshot | None:
            async with self._limit(ip):
                try:
                    async with asyncio.timeout(self.miner_timeout_s + 1.0):
                        return await (await self.factory.driver_for(ip)).poll()
                except (DriverError, TimeoutError):
                    return None

        snapshots = await asyncio.gather(*(read(r.ip) for r in records))
        drifted: list[Observation] = []
        now = utcnow()
        for record, snapshot in zip(records, snapshots, strict=True):
            if snapshot is None or snapshot.error is not None or not snapshot.reachable:
                report.failed += 1
                continue
            report.checked += 1
            memory = self.enforcer.memory.get(record.ip)
            if memory is not None and memory.incident is not None:
                continue  # a known incident: the passes already work it
            observation = snapshot.to_observation(record.identity)
            decision = decide(bundle.content, self.enforcer.view_of(observation), now, index=index)
            if isinstance(decision, WritePools) or (
                isinstance(decision, CannotEnforce) and decision.problems
            ):
                drifted.append(observation)
        report.drifted = len(drifted)
        report.duration_s = round(time.monotonic() - clock, 3)
        self.last_pools_check = report
        if drifted:
            log.info("pools check: %d of %d off their pools", len(drifted), report.checked)
            self.offer(drifted)
        return report

    async def _bounded(self, task: Task) -> _Done:
        async with self._limit(task.ip):
            try:
                return await self._work(task)
            except Exception as exc:  # a driver bug must not end the cycle for everyone else
                log.exception("poll of %s failed unexpectedly", task.ip)
                return self._failed(task.ip, exc, utcnow())

    def _failed(self, ip: str, error: BaseException, at: datetime) -> _Done:
        """This miner's failure as an outcome and an observation. Never raises: it runs after
        the per-miner guard, so anything it raised would fail the cycle for every miner."""
        reason = _reason(error)
        driver_error = error if isinstance(error, DriverError) else DriverError(reason)
        snapshot = PollSnapshot.failed(ip, driver_error, at)
        record = self.coordinator.record_of(ip)
        known = record.identity if record is not None else None
        outcome = Outcome(ip=ip, polled=False, reachable=snapshot.reachable, error=reason)
        observation = None
        if known is not None:
            try:
                observation = snapshot.to_observation(known)
            except Exception:  # the kept identity itself is unusable: report the IP alone
                log.exception("%s: kept identity unusable in a report", ip)
                observation = snapshot.to_observation(None)
        return _Done(outcome, observation, None)

    def _cleaning_events(self, ip: str, notes: tuple[str, ...], at: datetime) -> tuple[Event, ...]:
        """One ``miner_data_cleaned`` event when what a miner's strings needed changes (not one
        per poll): the evidence that its reported data was bounded or cleaned, and how."""
        if self._cleaned.get(ip, ()) == notes:
            return ()
        if notes:
            self._cleaned[ip] = notes
        else:
            self._cleaned.pop(ip, None)
            return ()
        detail = f"{ip}: strings from this miner were cleaned: " + "; ".join(notes)
        event = Event(
            kind="miner_data_cleaned",
            at=at,
            severity=EventSeverity.WARNING,
            ip=IPv4Address(ip),
            detail=detail[:4096],
            data={"cleaned": list(notes[:50])},
        )
        return (event,)

    async def _work(self, task: Task) -> _Done:
        """Identify (if told to rebuild), poll, re-read identity (if due): one budget for all."""
        ip = task.ip
        budget = self.budget_s(task)
        identity: Identity | None = None
        identity_error: str | None = None
        started = utcnow()
        record = self.coordinator.record_of(ip)
        known = record.identity if record is not None else None
        try:
            async with asyncio.timeout(budget):
                if task.rebuild:
                    try:
                        identity = await self.discovery.identify(ip)
                    except DriverError as exc:
                        done = self._failed(ip, exc, started)
                        outcome = Outcome(
                            ip=ip,
                            polled=None,
                            reachable=done.outcome.reachable,
                            error=_reason(exc),
                            identity_error=_reason(exc),
                        )
                        return _Done(outcome, done.observation, None)
                driver = await self.factory.driver_for(ip)
                snapshot = await driver.poll()
                if task.read_identity and identity is None and snapshot.error is None:
                    try:
                        identity = await driver.identify()
                    except DriverError as exc:
                        identity_error = _reason(exc)
        except TimeoutError:
            return self._failed(ip, Timeout(f"no complete answer within {budget:g} s"), started)
        except DriverError as exc:
            return self._failed(ip, exc, started)
        polled = snapshot.error is None and snapshot.reachable
        outcome = Outcome(
            ip=ip,
            polled=polled,
            reachable=snapshot.reachable,
            error=None if polled else (snapshot.error or "unreachable"),
            identity=identity,
            identity_error=identity_error,
            mac_hint=getattr(snapshot, "mac", None),
            model_hint=getattr(snapshot, "model", None),
        )
        now = utcnow()
        observation = snapshot.to_observation(identity or known)
        events: tuple[Event, ...] = ()
        if polled:  # a failed poll read no strings: it changes nothing about what was cleaned
            who = identity or known
            notes = snapshot.cleaned + (who.cleaned if who is not None else ())
            events = self._cleaning_events(ip, tuple(dict.fromkeys(notes)), now)
        fresh = identity.to_record(now) if identity else None
        return _Done(outcome, observation, fresh, events)

    # --- the outbox -----------------------------------------------------------------------------

    async def store(self, report: Report) -> int:
        """Pack ``report`` into batches and put them in the outbox, after any batches held back
        earlier (order is kept). On a full disk the rest is held in memory, an ``outbox_full``
        event is added once, and the next call retries. Returns how many batches were stored."""
        now = utcnow()
        fresh = pack(report, self.config.outbox.batch_size, now) if len(report) else []
        batches, self._held = [*self._held, *fresh], []
        stored = 0
        for index, batch in enumerate(batches):
            try:
                await asyncio.to_thread(self.outbox.put, batch)
            except OutboxError as exc:
                self._hold(batches[index:], exc, now)
                break
            stored += 1
        else:
            if self._full_since is not None:
                log.warning("outbox: storing again after being full since %s", self._full_since)
                self._full_since = None
        if stored and self.on_stored is not None:
            self.on_stored()
        return stored

    def _hold(self, batches: list[ReportBatch], error: OutboxError, now: datetime) -> None:
        held = list(batches)
        if self._full_since is None:
            self._full_since = now
            kind = "outbox_full" if isinstance(error, OutboxFull) else "outbox_error"
            event = Event(kind=kind, at=now, severity=EventSeverity.CRITICAL, detail=str(error))
            held.extend(pack(Report(events=[event]), self.config.outbox.batch_size, now))
            log.critical("outbox cannot store reports; holding them in memory: %s", error)
        overflow = len(held) - MAX_HELD_BATCHES
        for n in range(max(0, overflow)):
            held[n] = held[n].model_copy(update={"observations": []})
        self._held = [b for b in held if b.observations or b.identities or b.events]

    @property
    def held_batches(self) -> int:
        return len(self._held)


class Daemon:
    """The scheduled agent: ``await Daemon(config, secrets).run()`` until SIGTERM/SIGINT."""

    def __init__(
        self,
        config: AgentConfig,
        secrets: AgentSecrets,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        flush_timeout_s: float = 30.0,
        status_interval_s: float = STATUS_INTERVAL_S,
        policy_guard: PolicyGuard | None = None,
        enforcer_settings: EnforcerSettings | None = None,
    ) -> None:
        self.config = config
        self.policy_guard = policy_guard
        self.enforcer_settings = enforcer_settings
        self._policy_pull_failing = False
        self.secrets = secrets
        self.transport = transport
        self.flush_timeout_s = flush_timeout_s
        self.status_interval_s = status_interval_s
        self.started_at = utcnow()
        self.state = "starting"
        self.stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._inflight: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._polls_scheduled = False
        self.agent: FleetAgent | None = None
        self._actions_stop = asyncio.Event()
        self._actions_task: asyncio.Task[None] | None = None
        self.uplink: Uplink | None = None
        self.outbox: Outbox | None = None
        self._scheduler: AsyncIOScheduler | None = None

    def request_stop(self) -> None:
        if not self.stop.is_set():
            log.info("stopping: finishing the work in flight, then flushing the outbox")
        self.stop.set()

    async def run(self, *, install_signals: bool = True) -> None:
        """Run until :meth:`request_stop` (or a signal); then finish, flush and write status."""
        config = self.config
        loop = asyncio.get_running_loop()
        if install_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self.request_stop)
        self.outbox = Outbox.from_config(config)
        guard = self.policy_guard
        if guard is None and config.controller.public_key is not None:
            guard = PolicyGuard(
                config.controller.public_key, policy_path(config.data_dir), site=config.site
            )
            self.policy_guard = guard
        self.uplink = Uplink.from_config(
            config,
            self.secrets,
            transport=self.transport,
            verify_policy=guard.accept if guard is not None else None,
        )
        self.agent = FleetAgent(
            config,
            self.outbox,
            credentials=miner_credentials(self.secrets),
            on_stored=self._wake.set,
            policy=guard,
            enforcer_settings=self.enforcer_settings,
        )
        self._actions_task = asyncio.create_task(
            self.agent.work_actions(self._actions_stop), name="actions"
        )
        drain_stop = asyncio.Event()
        drain = asyncio.create_task(
            self.uplink.run(self.outbox, drain_stop, wake=self._wake, idle_s=5.0), name="drain"
        )
        scheduler = AsyncIOScheduler(timezone=UTC)
        self._scheduler = scheduler
        now = datetime.now(UTC)
        scheduler.add_job(
            self._job,
            "interval",
            args=["discovery"],
            id="discovery",
            seconds=config.polling.discovery_interval_s,
            next_run_time=now,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )
        scheduler.add_job(
            self._job,
            "interval",
            args=["status"],
            id="status",
            seconds=self.status_interval_s,
            next_run_time=now + timedelta(seconds=1),
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )
        self.state = "running"
        scheduler.start()
        log.info(
            "agent %s (site %s) running: %s; poll every %g s, discovery every %g s; controller %s",
            config.agent_id,
            config.site,
            ", ".join(str(s) for s in config.segments) or "no segments",
            config.polling.poll_interval_s,
            config.polling.discovery_interval_s,
            config.controller.url,
        )
        try:
            await self.stop.wait()
        finally:
            await self._shutdown(scheduler, drain, drain_stop)
            if install_signals:
                for signum in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(signum)

    async def _job(self, name: str) -> None:
        """Run a job as our own task (shielded: APScheduler cancels its futures at shutdown,
        and a cycle cut in half would lose its reports)."""
        if self._stopping:
            return
        task = asyncio.create_task(self._run_job(name), name=name)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            # the scheduler shut down: _shutdown waits for the task itself

    async def _run_job(self, name: str) -> None:
        assert self.agent is not None
        try:
            if name == "discovery":
                try:
                    await self.agent.discover()
                finally:
                    self._schedule_polls()
            elif name == "poll":
                await self.pull_policy()
                await self.agent.poll_cycle()
            elif name == "pools":
                await self.agent.check_pools()
                return
            await self.write_status()
        except AgentError as exc:
            log.error("%s: %s", name, exc)
        except Exception:
            log.exception("%s failed", name)

    async def pull_policy(self) -> None:
        """Fetch and verify the controller's bundle before a cycle. The controller being away
        keeps the policy in force (one log line when it starts failing); a refused bundle keeps
        it too and is reported (``policy_refused``)."""
        guard, uplink, agent = self.policy_guard, self.uplink, self.agent
        if guard is None or uplink is None or agent is None:
            return
        bound = max(1.0, min(self.config.uplink.timeout_s, self.config.polling.poll_interval_s / 3))
        try:
            async with asyncio.timeout(bound):
                await uplink.pull_policy()
        except PolicyRefused as exc:
            await agent.refused(exc)
            return
        except (UplinkError, TimeoutError) as exc:
            current = guard.current
            keeping = f"version {current.version}" if current is not None else "no policy"
            reason = str(exc) or f"no answer within {bound:g} s"
            if not self._policy_pull_failing:
                log.warning("policy pull failed (%s); keeping %s", reason, keeping)
            else:
                log.debug("policy pull failed (%s); keeping %s", reason, keeping)
            self._policy_pull_failing = True
            return
        if self._policy_pull_failing:
            log.info("policy pull works again")
        self._policy_pull_failing = False

    def _schedule_polls(self) -> None:
        """Polling starts when the first scan has ended (well or not): before it, there is
        nobody to poll, and a cycle racing the scan would only identify miners twice."""
        if self._polls_scheduled or self._stopping or self._scheduler is None:
            return
        self._polls_scheduled = True
        self._scheduler.add_job(
            self._job,
            "interval",
            args=["poll"],
            id="poll",
            seconds=self.config.polling.poll_interval_s,
            next_run_time=datetime.now(UTC),
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )
        every = self.config.polling.pools_check_interval_s
        if every > 0:
            self._scheduler.add_job(
                self._job,
                "interval",
                args=["pools"],
                id="pools",
                seconds=every,
                next_run_time=datetime.now(UTC) + timedelta(seconds=every),
                max_instances=1,
                coalesce=True,
                misfire_grace_time=None,
            )

    async def _shutdown(
        self, scheduler: AsyncIOScheduler, drain: asyncio.Task[None], drain_stop: asyncio.Event
    ) -> None:
        self._stopping = True
        self.state = "stopping"
        scheduler.shutdown(wait=False)
        grace = max(self.config.polling.poll_interval_s, 10.0)
        if self._inflight:
            log.info("waiting for %d job(s) in flight", len(self._inflight))
            _, pending = await asyncio.wait(set(self._inflight), timeout=grace)
            for task in pending:
                task.cancel()
        await self._stop_actions(grace)
        drain_stop.set()
        assert self.uplink is not None and self.outbox is not None
        try:
            await asyncio.wait_for(drain, timeout=self.flush_timeout_s)
        except TimeoutError:
            log.warning("drain did not finish within %g s", self.flush_timeout_s)
        except Exception:
            log.exception("drain failed")
        try:
            flushed = await asyncio.wait_for(
                self.uplink.drain(self.outbox), timeout=self.flush_timeout_s
            )
            left = flushed.remaining
            if flushed.error is not None:
                log.warning("final flush stopped: %s", flushed.error)
        except TimeoutError:
            left = None
        if left:
            log.warning("%d batch(es) stay in the outbox for the next start", left)
        if self.agent is not None and self.agent.held_batches:
            log.critical(
                "%d batch(es) held in memory because the outbox is full are lost at exit",
                self.agent.held_batches,
            )
        self.state = "stopped"
        await self.write_status()
        await self.uplink.aclose()
        self.outbox.close()
        log.info("stopped")

    async def _stop_actions(self, grace: float) -> None:
        """Let the pass in flight finish (bounded); an action cut off stays ``dispatched`` in
        the journal and is read back on the next start."""
        task = self._actions_task
        if task is None:
            return
        self._actions_stop.set()
        _, pending = await asyncio.wait({task}, timeout=grace)
        for left in pending:
            log.warning("actions still running after %g s: cut off, resolved on next start", grace)
            left.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await left
        if self.agent is not None:
            self.agent.journal.close()

    # --- status ---------------------------------------------------------------------------------

    async def write_status(self) -> None:
        """The small JSON file ``asicfleet agent status`` reads (atomically replaced)."""
        if self.outbox is None or self.agent is None or self.uplink is None:
            return
        try:
            stats: dict[str, Any] = asdict(await asyncio.to_thread(self.outbox.stats))
            stats["oldest_queued_at"] = _iso(stats["oldest_queued_at"])
        except OutboxError as exc:
            stats = {"error": str(exc)}
        stats["held_in_memory"] = self.agent.held_batches
        agent = self.agent
        records = agent.coordinator.records()
        uplink = self.uplink.state
        payload = {
            "version": STATUS_VERSION,
            "pid": os.getpid(),
            "state": self.state,
            "started_at": _iso(self.started_at),
            "updated_at": _iso(utcnow()),
            "agent_id": self.config.agent_id,
            "site": self.config.site,
            "controller": self.config.controller.url,
            "segments": [str(s) for s in self.config.segments],
            "poll_interval_s": self.config.polling.poll_interval_s,
            "cycles": agent.cycles,
            "miners": {
                "known": len(records),
                "identified": sum(1 for r in records if r.identified),
                "failing": sum(1 for r in records if r.failures),
            },
            "last_cycle": agent.last_cycle.as_dict() if agent.last_cycle else None,
            "policy": self._policy_status(),
            "enforcement": (
                agent.last_enforcement.summary() if agent.last_enforcement is not None else None
            ),
            "last_discovery": agent.last_discovery.as_dict() if agent.last_discovery else None,
            "last_pools_check": (
                agent.last_pools_check.as_dict() if agent.last_pools_check else None
            ),
            "actions": await self._actions_status(),
            "outbox": stats,
            "uplink": {
                "healthy": uplink.healthy,
                "last_success_at": _iso(uplink.last_success_at),
                "last_failure_at": _iso(uplink.last_failure_at),
                "last_error": uplink.last_error,
                "consecutive_failures": uplink.consecutive_failures,
                "next_attempt_at": _iso(uplink.next_attempt_at),
            },
        }
        try:
            data = (json.dumps(payload, indent=1) + "\n").encode()
            await asyncio.to_thread(atomic_write, status_path(self.config), data, 0o644)
        except AgentError as exc:
            log.warning("cannot write the status file: %s", exc)

    async def _actions_status(self) -> dict[str, Any]:
        agent = self.agent
        assert agent is not None
        try:
            journal: dict[str, Any] = await asyncio.to_thread(agent.journal.counts)
        except AgentError as exc:
            journal = {"error": str(exc)}
        return {
            "running": len(agent.actions.inflight),
            "in_doubt": sorted(agent.actions.in_doubt),
            "journal": journal,
        }

    def _policy_status(self) -> dict[str, Any] | None:
        guard = self.policy_guard
        bundle = guard.current if guard is not None else None
        if bundle is None:
            return None
        content = bundle.content
        return {
            "version": bundle.version,
            "mode": str(content.mode),
            "issued_at": _iso(bundle.issued_at),
            "expires_at": _iso(bundle.expires_at),
            "expired": bundle.expires_at <= utcnow(),
            "pool_set": content.pool_set.name if content.pool_set is not None else None,
            "pool_set_version": (
                content.pool_set.version if content.pool_set is not None else None
            ),
            "machines": len(content.machines),
            "pull_failing": self._policy_pull_failing,
        }


def read_status(config: AgentConfig) -> dict[str, Any] | None:
    """The daemon's last status, or None if it never ran with this data directory."""
    path = status_path(config)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise AgentError(f"{path}: unreadable status file: {exc}") from None
    if not isinstance(data, dict):
        raise AgentError(f"{path}: unreadable status file: not a JSON object")
    return data


def pid_alive(pid: object) -> bool:
    """Whether a process with this id exists (the status file may outlive its daemon)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def run_daemon(config: AgentConfig, secrets: AgentSecrets) -> None:
    """Entry point of ``asicfleet agent run``."""
    with contextlib.suppress(asyncio.CancelledError):
        await Daemon(config, secrets).run()
