"""Enrollment: an agent trades a one-time token for its own credentials."""

from __future__ import annotations

from pydantic import Field

from contract._base import Message


class EnrollmentRequest(Message):
    token: str = Field(min_length=16, max_length=256, description="one-time enrollment token")
    agent_name: str = Field(min_length=1, max_length=128)
    agent_version: str = Field(min_length=1, max_length=64)
    hostname: str = Field(default="", max_length=255)


class EnrollmentResponse(Message):
    agent_id: str
    agent_secret: str = Field(description="bearer credential for every later request; store 0600")
    site: str
    segments: list[str] = Field(description="CIDRs this agent may report from")
    controller_public_key: str = Field(
        description="the controller's Ed25519 public key (base64, raw 32 bytes); policy "
        "bundles are verified against it"
    )
