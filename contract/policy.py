"""The policy bundle: signed by the controller, verified by the agent before use."""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field

from contract._base import AwareDatetime, Message, WireModel


class PolicyContent(WireModel):
    """What the agent should enforce. Grows with later contract minors (optional fields)."""

    site: str
    poll_interval_s: int = Field(default=60, ge=5, le=3600)
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
