"""The policy bundle: signed by the controller, verified by the agent before use.

Contract 1.1 added what the agent enforces: the site's approved pool set, its enforcement
mode, one entry per registered machine (its worker name and any exemption) and the rollout
limits for a policy change. Every field added in 1.1 is optional with a safe default
(``observe`` mode, no pool set), so a 1.0 agent ignores them and a 1.0 bundle enforces nothing.
"""

from __future__ import annotations

import json
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import Field, field_validator

from contract._base import AwareDatetime, Message, WireModel

MAX_POOL_URLS = 3
MAX_MACHINES = 250_000


class EnforcementMode(StrEnum):
    """``observe``: detect and report only; ``enforce``: detect, correct, verify."""

    OBSERVE = "observe"
    ENFORCE = "enforce"


class DevFeePolicy(StrEnum):
    """What an extra pool that the firmware adds for its own fee (VNish ``DevFee``) means."""

    ALLOW = "allow"  # classified and reported, not a violation
    FORBID = "forbid"  # a violation the agent cannot correct by writing pools


class ApprovedPoolSet(WireModel):
    """An accredited digital mining pool (DMP): its URLs in slot order and the farm's account."""

    name: str = Field(min_length=1, max_length=128, description="DMP name")
    accreditation_ref: str = Field(default="", max_length=128)
    version: int = Field(default=1, ge=1, description="the approved revision of this set")
    urls: list[str] = Field(min_length=1, max_length=MAX_POOL_URLS)
    account: str = Field(min_length=1, max_length=128)
    password: str = Field(default="x", max_length=128, description="stratum password (not secret)")
    devfee: DevFeePolicy = DevFeePolicy.ALLOW

    @field_validator("urls")
    @classmethod
    def _urls_present(cls, value: list[str]) -> list[str]:
        cleaned = [u.strip() for u in value]
        if any(not u for u in cleaned):
            raise ValueError("a pool URL may not be empty")
        return cleaned


class MachinePolicy(WireModel):
    """What one machine of the site must be set to; the agent finds it by serial, else MAC."""

    machine_id: str = Field(min_length=1, max_length=16)
    serial: str | None = Field(default=None, max_length=128)
    mac: str | None = Field(default=None, max_length=32)
    worker: str = Field(min_length=1, max_length=255, description="the pool user to write")
    registered: bool = Field(
        default=True, description="claimed into the register (False: only discovered)"
    )
    exempt_until: AwareDatetime | None = None
    exempt_reason: str = Field(default="", max_length=1024)

    def exempt_at(self, now: datetime) -> bool:
        return self.exempt_until is not None and now < self.exempt_until


class RolloutPolicy(WireModel):
    """How a policy change is rolled out: a canary first, halting on too many failures."""

    canary_size: int = Field(default=10, ge=1, le=10_000)
    max_failure_rate: float = Field(default=0.2, ge=0.0, le=1.0)
    writes_per_segment: int = Field(default=8, ge=1, le=256)
    verify_attempts: int = Field(default=3, ge=1, le=10)


class PolicyContent(WireModel):
    """What the agent should enforce."""

    site: str
    poll_interval_s: int = Field(default=60, ge=5, le=3600)
    mode: EnforcementMode = EnforcementMode.OBSERVE
    pool_set: ApprovedPoolSet | None = None
    machines: list[MachinePolicy] = Field(default_factory=list, max_length=MAX_MACHINES)
    quarantine_unregistered: bool = Field(
        default=False, description="sleep machines hashing while unregistered; wake when claimed"
    )
    rollout: RolloutPolicy = Field(default_factory=RolloutPolicy)
    extra: dict[str, Any] = Field(default_factory=dict)


class PolicyBundle(Message):
    version: int = Field(ge=1, description="monotonic; an agent refuses an older bundle")
    issued_at: AwareDatetime
    expires_at: AwareDatetime
    content: PolicyContent
    signature: str | None = Field(
        default=None, description="base64 Ed25519 signature over signing_bytes()"
    )

    def signing_bytes(self) -> bytes:
        """The canonical bytes that are signed: everything but the signature, sorted keys."""
        payload = self.model_dump(mode="json", exclude={"signature"})
        return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
