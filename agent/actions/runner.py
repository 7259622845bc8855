"""The action runner: works writes apart from polling, each under a deadline, journaled.

Every write to a miner goes through :meth:`ActionRunner.run`: the action is journaled
``planned``; it waits for its segment's gate (at most ``concurrency_per_segment`` actions at
once, and, with ``wave_size``, waves of that many separated by ``wave_pause_s``); it is
journaled ``dispatched`` right before it is sent; it runs under its deadline; a failure that
did not (or may not have) reached the miner's configuration (``unreachable``, ``timeout``) is
retried with backoff if the action is idempotent and its deadline allows; it ends ``done`` or
``failed`` with its cause. One log line per write and per failure names the miner.

After a kill, :meth:`ActionRunner.recover` reads back every action a previous run dispatched
and never saw end, before anything else may write that miner: it took effect (``done``), it did
not (``failed``: the caller decides again from a fresh observation, which re-issues it only if
it is idempotent and still needed), or it cannot be told yet (the miner does not answer: the
miner stays *in doubt*, untouched, until a read-back tells or the action's deadline passes).
A reboot is never re-issued: it has no read-back and is reported as interrupted.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from ipaddress import IPv4Network

from agent.actions.journal import Journal, JournalEntry
from agent.actions.kinds import RETRYABLE_CAUSES, Action, ActionKind, ActionResult, ActionState
from agent.backoff import doubling
from agent.config import ActionsConfig
from agent.coordinator import segment_of
from agent.drivers.base import utcnow
from agent.errors import DriverError

log = logging.getLogger(__name__)

Verifier = Callable[[JournalEntry], Awaitable[bool | None]]
"""Read an interrupted action back: True took effect, False did not, None cannot tell yet."""


@dataclass(frozen=True)
class ActionSettings:
    concurrency_per_segment: int = 16
    wave_size: int = 0
    wave_pause_s: float = 0.0
    deadline_s: float = 120.0
    retries: int = 2
    retry_backoff_s: float = 1.0
    retry_backoff_max_s: float = 30.0

    @classmethod
    def from_config(cls, config: ActionsConfig) -> ActionSettings:
        return cls(
            concurrency_per_segment=config.concurrency_per_segment,
            wave_size=config.wave_size,
            wave_pause_s=config.wave_pause_s,
            deadline_s=config.deadline_s,
            retries=config.retries,
            retry_backoff_s=config.retry_backoff_s,
            retry_backoff_max_s=config.retry_backoff_max_s,
        )


def backoff_s(attempt: int, initial: float, cap: float) -> float:
    """Wait before retry ``attempt`` (1-based): initial, 2×, 4× … never more than ``cap``."""
    return doubling(attempt, initial, cap)


class SegmentGate:
    """One segment's bound on writes: ``concurrency`` at once, and waves of ``wave_size``
    (0: no waves) — the next wave starts once the last one has ended and ``pause_s`` passed."""

    def __init__(self, concurrency: int, wave_size: int, pause_s: float) -> None:
        self.slots = asyncio.Semaphore(concurrency)
        self.wave_size = wave_size
        self.pause_s = pause_s
        self.in_wave = 0
        self.inflight = 0
        self.waves = 0
        self._cond = asyncio.Condition()

    async def enter(self) -> None:
        async with self._cond:
            if self.wave_size > 0:
                while self.in_wave >= self.wave_size:
                    await self._cond.wait_for(lambda: self.inflight == 0)
                    if self.in_wave >= self.wave_size:  # the first one here starts the next wave
                        if self.pause_s > 0:
                            await asyncio.sleep(self.pause_s)
                        self.in_wave = 0
                        self.waves += 1
            self.in_wave += 1
            self.inflight += 1
        await self.slots.acquire()

    async def leave(self) -> None:
        self.slots.release()
        async with self._cond:
            self.inflight -= 1
            self._cond.notify_all()


class ActionRunner:
    """Runs actions against miners; keeps the journal and who is busy or in doubt."""

    def __init__(
        self,
        journal: Journal,
        segments: Sequence[IPv4Network] = (),
        settings: ActionSettings | None = None,
    ) -> None:
        self.journal = journal
        self.segments = tuple(segments)
        self.settings = settings or ActionSettings()
        self._gates: dict[IPv4Network | None, SegmentGate] = {}
        self.inflight: dict[str, Action] = {}
        self.in_doubt: dict[str, JournalEntry] = {}
        self.counts: Counter[str] = Counter()

    def gate(self, ip: str) -> SegmentGate:
        segment = segment_of(ip, self.segments) if self.segments else None
        gate = self._gates.get(segment)
        if gate is None:
            s = self.settings
            gate = self._gates[segment] = SegmentGate(
                s.concurrency_per_segment, s.wave_size, s.wave_pause_s
            )
        return gate

    def busy(self, ip: str) -> bool:
        """Whether an action on ``ip`` is running or unresolved since a restart: nothing else
        may write that miner now."""
        return ip in self.inflight or ip in self.in_doubt

    async def run(
        self,
        action: Action,
        do: Callable[[], Awaitable[object]],
        *,
        verify: Callable[[], Awaitable[bool | None]] | None = None,
    ) -> ActionResult:
        """Journal, gate, dispatch ``do`` under the deadline, retry if allowed, journal the end.
        A bug in ``do`` (not a :class:`DriverError`) is journaled ``failed`` and re-raised."""
        deadline = action.deadline_s or self.settings.deadline_s
        await asyncio.to_thread(self.journal.plan, action, utcnow())
        self.inflight[action.ip] = action
        try:
            gate = self.gate(action.ip)
            await gate.enter()
            try:
                return await self._attempts(action, do, verify, deadline)
            finally:
                await gate.leave()
        finally:
            self.inflight.pop(action.ip, None)

    async def _attempts(
        self,
        action: Action,
        do: Callable[[], Awaitable[object]],
        verify: Callable[[], Awaitable[bool | None]] | None,
        deadline: float,
    ) -> ActionResult:
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        attempt = 0
        while True:
            attempt += 1
            await asyncio.to_thread(self.journal.dispatch, action.id, utcnow())
            log.info(
                "write %s to %s (attempt %d, deadline %g s)",
                action.kind.value,
                action.names(),
                attempt,
                deadline,
            )
            error: BaseException | None = None
            try:
                async with asyncio.timeout(max(0.0, end - loop.time())):
                    await do()
            except DriverError as exc:
                cause, detail, error = exc.kind, exc.reason, exc
            except TimeoutError:
                cause, detail = "deadline", f"not finished within its {deadline:g} s deadline"
            except Exception as exc:
                await self._finish(action, False, "error", repr(exc)[:300], attempt)
                raise
            else:
                return await self._finish(action, True, None, "", attempt)
            left = end - loop.time()
            delay = backoff_s(
                attempt, self.settings.retry_backoff_s, self.settings.retry_backoff_max_s
            )
            retry = (
                action.idempotent
                and cause in RETRYABLE_CAUSES
                and attempt <= self.settings.retries
                and delay < left
            )
            if not retry:
                return await self._finish(action, False, cause, detail, attempt, error)
            log.info(
                "write %s to %s failed (%s: %s); retrying in %g s",
                action.kind.value,
                action.names(),
                cause,
                detail,
                delay,
            )
            await asyncio.sleep(delay)
            # a timeout may have landed after all: read back before writing again
            if verify is not None and cause == "timeout" and await verify():
                return await self._finish(
                    action, True, None, "took effect despite the timeout", attempt
                )

    async def _finish(
        self,
        action: Action,
        ok: bool,
        cause: str | None,
        detail: str,
        attempts: int,
        error: BaseException | None = None,
    ) -> ActionResult:
        await asyncio.to_thread(self.journal.finish, action.id, ok, cause, detail, utcnow())
        result = ActionResult(action, ok, cause, detail, attempts, error)
        self.counts["done" if ok else "failed"] += 1
        if ok:
            log.info("write %s to %s: done", action.kind.value, action.names())
        else:
            log.warning(
                "write %s to %s failed after %d attempt(s): %s: %s",
                action.kind.value,
                action.names(),
                attempts,
                cause,
                detail,
            )
        return result

    # --- after a restart ------------------------------------------------------------------------

    async def recover(
        self, verifiers: Mapping[ActionKind, Verifier], now: datetime | None = None
    ) -> list[ActionResult]:
        """Resolve what a previous run left unfinished (and what is still in doubt since).
        Returns the actions resolved now, each with its outcome; the rest stay in doubt."""
        now = now or utcnow()
        ours = {action.id for action in self.inflight.values()}
        entries = [
            e for e in await asyncio.to_thread(self.journal.unfinished) if e.action.id not in ours
        ]

        async def one(entry: JournalEntry) -> ActionResult | None:
            gate = self.gate(entry.action.ip)
            await gate.slots.acquire()  # read-backs bounded like writes, but outside the waves
            try:
                return await self._resolve(entry, verifiers.get(entry.action.kind), now)
            finally:
                gate.slots.release()

        outcomes = await asyncio.gather(*(one(entry) for entry in entries))
        resolved: list[ActionResult] = []
        for entry, result in zip(entries, outcomes, strict=True):
            if result is None:
                self.in_doubt[entry.action.ip] = entry
                continue
            self.in_doubt.pop(entry.action.ip, None)
            resolved.append(result)
        return resolved

    async def _resolve(
        self, entry: JournalEntry, verify: Verifier | None, now: datetime
    ) -> ActionResult | None:
        action = entry.action
        if entry.state is ActionState.PLANNED:
            return await self._finish(
                action,
                False,
                "interrupted",
                "not sent: the agent stopped before dispatching it",
                entry.attempts,
            )
        if verify is None:
            repeat = "never repeated blindly" if not action.idempotent else "not read back"
            return await self._finish(
                action,
                False,
                "interrupted",
                f"dispatched before the agent stopped; outcome unknown ({repeat})",
                entry.attempts,
            )
        try:
            took = await verify(entry)
        except DriverError as exc:
            log.info("read-back of %s on %s failed: %s", action.kind.value, action.names(), exc)
            took = None
        if took is True:
            return await self._finish(
                action, True, None, "read back after an agent restart: took effect", entry.attempts
            )
        if took is False:
            return await self._finish(
                action,
                False,
                "not_applied",
                "read back after an agent restart: did not take effect",
                entry.attempts,
            )
        since = entry.dispatched_at or entry.planned_at
        if now - since > timedelta(seconds=action.deadline_s or self.settings.deadline_s):
            return await self._finish(
                action,
                False,
                "unreachable",
                "interrupted by an agent restart and not readable back within its deadline",
                entry.attempts,
            )
        log.info("%s on %s is in doubt: no read-back yet", action.kind.value, action.names())
        return None
