"""Enforcement events: what the agent tells the controller it found and did about pools.

They travel as ordinary :class:`~contract.reports.Event` s whose ``kind`` is one of
:class:`EnforcementEvent` and whose ``data`` is an :class:`EnforcementFacts` dump. The
controller builds the drift incidents of the compliance evidence from them: detected → action →
verified (or failed, with the cause).
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from contract._base import AwareDatetime, WireModel
from contract.reports import PoolReading


class EnforcementEvent(StrEnum):
    POOL_DRIFT = "pool_drift"  # a machine is off its approved pools (detected)
    POOL_WRITE = "pool_write"  # the agent wrote the approved pools (action)
    POOL_VERIFIED = "pool_verified"  # read back: the machine is on its approved pools
    POOL_WRITE_FAILED = "pool_write_failed"  # the write did not take; ``cause`` says why
    CANNOT_ENFORCE = "cannot_enforce"  # the firmware lacks the capability; ``detail`` says which
    QUARANTINED = "quarantined"  # hashing while unregistered: put to sleep
    RELEASED = "released"  # claimed: woken again
    POLICY_REFUSED = "policy_refused"  # a bundle failed verification; the last valid one stays
    ROLLOUT_HALTED = "rollout_halted"  # the canary or a later wave failed more than allowed


class FailureCause(StrEnum):
    """Why a pool write is not (yet) verified — never reported as success."""

    IGNORED = "write_ignored"  # acknowledged, read back unchanged, still unchanged after reboot
    PENDING_REBOOT = "pending_reboot"  # acknowledged, unchanged: rebooted so that it applies
    AUTH_FAILED = "auth_failed"  # the miner refused our credentials
    UNREACHABLE = "unreachable"  # no answer while writing or reading back
    REFUSED = "refused"  # the firmware answered with an error
    HIDDEN_POOL = "hidden_pool"  # written, but an unapproved pool is still reported
    HALTED = "rollout_halted"  # not attempted: the rollout stopped (too many writes failed)


class EnforcementFacts(WireModel):
    """The structured part of an enforcement event (``Event.data``)."""

    machine_id: str | None = Field(default=None, max_length=16)
    policy_version: int | None = None
    pool_set_version: int | None = None
    detected_at: AwareDatetime | None = None
    written_at: AwareDatetime | None = None
    verified_at: AwareDatetime | None = None
    attempts: int = Field(default=0, ge=0)
    after_reboot: bool = False
    cause: FailureCause | None = None
    problems: list[str] = Field(default_factory=list, max_length=16)
    observed: list[PoolReading] = Field(default_factory=list, max_length=16)
    dry_run: bool = False
    rollout_attempted: int | None = Field(
        default=None, ge=0, description="rollout_halted: writes attempted under the version"
    )
    rollout_failed: int | None = Field(
        default=None, ge=0, description="rollout_halted: of those, not verified"
    )
