"""What to do about one miner's pools under a policy: a pure function, no I/O.

``decide(policy, view, now)`` looks at one poll of one miner (a :class:`MinerView`) and the
policy in force and says what should happen. It never writes anything; the executor does,
and in observe mode (or a dry run) it does nothing and reports what it would have done.

Compliance is judged by :func:`contract.compliance.assess_pools` (the same rule the controller
applies to the evidence). A firmware fee pool (VNish ``DevFee``) is classified by that rule;
when the pool set forbids it, no pool write can remove it, so the answer is
:class:`CannotEnforce`, not a write that would loop forever.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from agent.drivers.base import PoolTarget, normalise_mac
from contract.compliance import assess_pools, is_devfee
from contract.policy import ApprovedPoolSet, DevFeePolicy, MachinePolicy, PolicyContent
from contract.reports import PoolReading


@dataclass(frozen=True)
class MinerView:
    """What the decision needs to know about one miner, from one poll.

    ``pools`` is None when the pools could not be read (an empty tuple means read, and none
    configured). ``quarantined`` is the executor's memory: this agent put it to sleep.
    """

    ip: str
    serial: str | None = None
    mac: str | None = None
    family: str | None = None
    reachable: bool = True
    pools: tuple[PoolReading, ...] | None = ()
    is_mining: bool | None = None
    can_set_pools: bool = True
    cannot_set_pools_reason: str | None = None
    pool_slots: int | None = None
    can_sleep: bool = True
    quarantined: bool = False


# --- decisions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Compliant:
    machine: MachinePolicy
    devfee_pools: tuple[str, ...] = ()


@dataclass(frozen=True)
class WritePools:
    """Write ``targets`` (slot order, the machine's worker) and verify by reading back."""

    machine: MachinePolicy
    targets: tuple[PoolTarget, ...]
    worker: str
    problems: tuple[str, ...]


@dataclass(frozen=True)
class CannotEnforce:
    """Off its approved pools (or to be quarantined), but the firmware cannot be made to."""

    machine: MachinePolicy
    reason: str
    capability: str
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class Exempt:
    machine: MachinePolicy
    until: datetime
    reason: str


@dataclass(frozen=True)
class Unknown:
    """Nothing can be judged: unreachable, pools unreadable, no policy or pool set, or a
    machine the policy does not list (yet)."""

    reason: str
    machine: MachinePolicy | None = None


@dataclass(frozen=True)
class Quarantine:
    """Hashing while unregistered and the site quarantines such machines: put it to sleep."""

    machine: MachinePolicy


@dataclass(frozen=True)
class Quarantined:
    """Unregistered, asleep because this agent quarantined it: nothing to do."""

    machine: MachinePolicy


@dataclass(frozen=True)
class Release:
    """This agent quarantined it, and it is registered now (or quarantine is off): wake it."""

    machine: MachinePolicy


Decision = (
    Compliant | WritePools | CannotEnforce | Exempt | Unknown | Quarantine | Quarantined | Release
)


# --- finding the machine ------------------------------------------------------------------------


@dataclass(frozen=True)
class MachineIndex:
    """The policy's machines by serial and by MAC (build once per policy, not per miner)."""

    by_serial: dict[str, MachinePolicy] = field(default_factory=dict)
    by_mac: dict[str, MachinePolicy] = field(default_factory=dict)

    @classmethod
    def of(cls, machines: Sequence[MachinePolicy]) -> MachineIndex:
        by_serial: dict[str, MachinePolicy] = {}
        by_mac: dict[str, MachinePolicy] = {}
        for machine in machines:
            if machine.serial and machine.serial.strip():
                by_serial.setdefault(machine.serial.strip().upper(), machine)
            mac = normalise_mac(machine.mac)
            if mac is not None:
                by_mac.setdefault(mac, machine)
        return cls(by_serial, by_mac)

    def find(self, serial: str | None, mac: str | None) -> MachinePolicy | None:
        """By chassis serial first (the identity), else by MAC (Avalon has no serial)."""
        if serial and serial.strip():
            found = self.by_serial.get(serial.strip().upper())
            if found is not None:
                return found
        normal = normalise_mac(mac)
        return self.by_mac.get(normal) if normal is not None else None


def writable_set(pool_set: ApprovedPoolSet) -> ApprovedPoolSet:
    """The pool set as a pool write can satisfy it: a firmware fee pool tolerated."""
    if pool_set.devfee is DevFeePolicy.ALLOW:
        return pool_set
    return pool_set.model_copy(update={"devfee": DevFeePolicy.ALLOW})


def only_extra_pools(
    pool_set: ApprovedPoolSet, worker: str, readings: Sequence[PoolReading]
) -> bool:
    """The approved slots are right and the only problem is an unapproved extra user pool (a
    hidden slot that a pool write does not remove)."""
    user = [r for r in readings if r.url.strip() and not is_devfee(r)]
    if len(user) <= len(pool_set.urls):
        return False
    return assess_pools(writable_set(pool_set), worker, user[: len(pool_set.urls)]).compliant


def targets_of(pool_set: ApprovedPoolSet, worker: str) -> tuple[PoolTarget, ...]:
    return tuple(PoolTarget(url, worker, pool_set.password) for url in pool_set.urls)


# --- the decision -------------------------------------------------------------------------------


def decide(
    policy: PolicyContent | None,
    view: MinerView,
    now: datetime,
    *,
    index: MachineIndex | None = None,
) -> Decision:
    """What to do about ``view`` under ``policy`` at ``now`` (pass ``index`` when deciding for
    many miners under one policy)."""
    if policy is None:
        return Unknown("no valid policy yet")
    index = index or MachineIndex.of(policy.machines)
    machine = index.find(view.serial, view.mac)
    if machine is None:
        return Unknown("not in the policy (yet): no machine with this serial or MAC")
    if not view.reachable:
        return Unknown("unreachable", machine)

    quarantining = policy.quarantine_unregistered and not machine.registered
    if quarantining:
        if view.is_mining:
            if not view.can_sleep:
                return CannotEnforce(
                    machine,
                    f"{view.family or 'this firmware'} cannot sleep (capability can_sleep)",
                    "can_sleep",
                )
            return Quarantine(machine)
        if view.quarantined:
            return Quarantined(machine)
    elif view.quarantined:
        return Release(machine)

    if machine.exempt_at(now):
        assert machine.exempt_until is not None
        return Exempt(machine, machine.exempt_until, machine.exempt_reason or "exempt")
    pool_set = policy.pool_set
    if pool_set is None:
        return Unknown("the policy has no approved pool set", machine)
    if view.pools is None:
        return Unknown("pools could not be read", machine)

    assessment = assess_pools(pool_set, machine.worker, view.pools)
    if assessment.compliant:
        return Compliant(machine, assessment.devfee_pools)
    fixable = assess_pools(writable_set(pool_set), machine.worker, view.pools)
    if fixable.compliant:
        return CannotEnforce(
            machine,
            "the firmware adds its own fee pool, which the pool set forbids and no pool "
            "write removes",
            "remove_devfee",
            assessment.problems,
        )
    if not view.can_set_pools:
        reason = view.cannot_set_pools_reason or (
            f"{view.family or 'this firmware'} cannot set pools (capability can_set_pools)"
        )
        return CannotEnforce(machine, reason, "can_set_pools", assessment.problems)
    if view.pool_slots is not None and view.pool_slots < len(pool_set.urls):
        return CannotEnforce(
            machine,
            f"{view.family or 'this firmware'} has {view.pool_slots} pool slot(s); the pool set "
            f"needs {len(pool_set.urls)} (capability pool_slots)",
            "pool_slots",
            assessment.problems,
        )
    return WritePools(
        machine, targets_of(pool_set, machine.worker), machine.worker, assessment.problems
    )
