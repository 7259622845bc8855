"""Report batches: what an agent pushes — observations, identities and events."""

from __future__ import annotations

import uuid
from enum import StrEnum
from ipaddress import IPv4Address

from pydantic import Field

from contract._base import AwareDatetime, Message, ShallowDict, WireModel

MAX_BATCH_ITEMS = 5_000
MAX_SEQUENCE = 2**31 - 1  # what the controller's INTEGER column holds (a batch per second: 68 y)


class PoolReading(WireModel):
    """One pool slot as the miner reported it (passwords never travel)."""

    url: str = Field(max_length=512)
    user: str = Field(default="", max_length=512)
    status: str | None = Field(default=None, max_length=32)
    active: bool | None = None
    kind: str | None = Field(default=None, description="e.g. user, devfee", max_length=32)


class Observation(WireModel):
    """One poll of one miner."""

    ip: IPv4Address
    observed_at: AwareDatetime
    reachable: bool
    error: str | None = Field(default=None, max_length=1024, description="why a poll failed")
    mac: str | None = Field(default=None, max_length=32)
    serial: str | None = Field(default=None, max_length=128)
    is_mining: bool | None = None
    hashrate_ths: float | None = Field(default=None, ge=0)
    power_w: float | None = Field(default=None, ge=0)
    temperature_c: float | None = None
    fan_rpm: list[int] = Field(default_factory=list, max_length=16)
    pools: list[PoolReading] = Field(default_factory=list, max_length=16)


class IdentityRecord(WireModel):
    """Who a miner is: read on the slow cadence and whenever MAC or model change."""

    ip: IPv4Address
    observed_at: AwareDatetime
    mac: str | None = Field(default=None, max_length=32)
    serial: str | None = Field(default=None, max_length=128)
    serial_source: str | None = Field(default=None, max_length=64)
    control_board_serial: str | None = Field(default=None, max_length=128)
    hashboard_serials: list[str] = Field(default_factory=list, max_length=16)
    psu_serial: str | None = Field(default=None, max_length=128)
    make: str | None = Field(default=None, max_length=64)
    model: str | None = Field(default=None, max_length=128)
    firmware: str | None = Field(default=None, max_length=64)
    firmware_version: str | None = Field(default=None, max_length=128)
    hostname: str | None = Field(default=None, max_length=255)


class EventSeverity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class Event(WireModel):
    """Something the agent noticed: a miner vanished, a policy was refused, a disk is full."""

    kind: str = Field(min_length=1, max_length=64)
    at: AwareDatetime
    severity: EventSeverity = EventSeverity.INFO
    ip: IPv4Address | None = None
    detail: str = Field(default="", max_length=4096)
    data: ShallowDict = Field(
        default_factory=dict, description="structured facts (1.1), e.g. an enforcement incident"
    )


class ReportBatch(Message):
    """A batch the agent pushes; ``batch_id`` makes re-delivery idempotent."""

    batch_id: uuid.UUID
    agent_clock: AwareDatetime = Field(description="the agent's clock when it sealed the batch")
    sequence: int = Field(ge=0, le=MAX_SEQUENCE, description="per-agent, increasing; replay order")
    observations: list[Observation] = Field(default_factory=list, max_length=MAX_BATCH_ITEMS)
    identities: list[IdentityRecord] = Field(default_factory=list, max_length=MAX_BATCH_ITEMS)
    events: list[Event] = Field(default_factory=list, max_length=MAX_BATCH_ITEMS)


class BatchAck(Message):
    """The controller's answer; the same for a batch delivered twice."""

    batch_id: uuid.UUID
    duplicate: bool
    observations: int
    identities: int
    events: int
    refused: list[str] = Field(
        default_factory=list, description="items refused, with why (e.g. outside segments)"
    )
