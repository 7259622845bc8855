"""Results of commands the agent carried out, one per machine."""

from __future__ import annotations

from enum import StrEnum
from ipaddress import IPv4Address

from pydantic import Field

from contract._base import AwareDatetime, Message


class CommandOutcome(StrEnum):
    CHANGED = "changed"
    UNCHANGED = "unchanged"
    FAILED = "failed"


class CommandResult(Message):
    command_id: str = Field(min_length=1, max_length=64)
    ip: IPv4Address
    outcome: CommandOutcome
    reason: str = Field(default="", max_length=1024)
    finished_at: AwareDatetime
