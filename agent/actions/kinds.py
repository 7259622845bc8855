"""What an action is: one write to one miner, with the facts needed to judge it after a crash.

Pure data, no I/O. Whether a kind is *idempotent* decides what a restarted agent may do with an
action it had dispatched but never saw finish: an idempotent one (pools, power limit, sleep,
wake: writing the same value twice ends in the same state) may be re-issued once a read-back
shows it did not take effect; a reboot is never re-issued blindly.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class ActionKind(StrEnum):
    SET_POOLS = "set_pools"
    REBOOT = "reboot"
    SET_POWER_LIMIT = "set_power_limit"
    SLEEP = "sleep"
    WAKE = "wake"


IDEMPOTENT: frozenset[ActionKind] = frozenset(
    {ActionKind.SET_POOLS, ActionKind.SET_POWER_LIMIT, ActionKind.SLEEP, ActionKind.WAKE}
)


class ActionState(StrEnum):
    """planned -> dispatched -> done | failed (the journal's life of an action)."""

    PLANNED = "planned"
    DISPATCHED = "dispatched"
    DONE = "done"
    FAILED = "failed"


FINISHED: frozenset[ActionState] = frozenset({ActionState.DONE, ActionState.FAILED})

RETRYABLE_CAUSES: frozenset[str] = frozenset({"unreachable", "timeout"})
"""Failures that did not reach the miner's configuration (or may not have): worth a retry
with backoff, for an idempotent action, within its deadline."""


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Action:
    """One write to one miner. ``payload`` is JSON-able: what to write and the facts a
    restarted agent needs to verify and report it (policy version, targets, worker …)."""

    kind: ActionKind
    ip: str
    serial: str | None = None
    machine_id: str | None = None
    payload: Mapping[str, Any] = field(default_factory=dict)
    deadline_s: float | None = None
    id: str = field(default_factory=new_id)

    @property
    def idempotent(self) -> bool:
        return self.kind in IDEMPOTENT

    def names(self) -> str:
        """The miner as a log line names it: IP, serial and machine id when known."""
        return miner_names(self.ip, self.serial, self.machine_id)


def miner_names(ip: str, serial: str | None, machine_id: str | None) -> str:
    parts = [f"ip={ip}"]
    if serial:
        parts.append(f"serial={serial}")
    if machine_id:
        parts.append(f"machine={machine_id}")
    return " ".join(parts)


@dataclass(frozen=True)
class ActionResult:
    """How an action ended: ``ok``, or the ``cause`` (a driver error kind, ``deadline``,
    ``interrupted`` …) and a detail; ``attempts`` counts dispatches."""

    action: Action
    ok: bool
    cause: str | None = None
    detail: str = ""
    attempts: int = 0
    error: BaseException | None = field(default=None, compare=False)

    @property
    def state(self) -> ActionState:
        return ActionState.DONE if self.ok else ActionState.FAILED
