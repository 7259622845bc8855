"""Report batches: what an agent pushes — observations, identities and events.

Every string in a report is bounded and storable at this boundary (:mod:`contract.text`): a NUL
or a lone surrogate is replaced with U+FFFD and an over-long value is cut to its field's limit,
and each change is recorded in the item's ``cleaned`` list ("serial: NUL replaced"). Nothing is
changed silently, and a batch never fails as a whole because one miner sent bad text; what the
controller then does with a cleaned item (store it, or refuse it when the damaged field is an
identity key) is its decision, reported per item in the :class:`BatchAck`.
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from functools import cache
from ipaddress import IPv4Address
from typing import Any, ClassVar

from annotated_types import MaxLen
from pydantic import Field, model_validator

from contract._base import AwareDatetime, Message, WireModel
from contract.text import clean_data, clean_text

MAX_BATCH_ITEMS = 5_000
MAX_SEQUENCE = 2**63 - 1  # a 64-bit column on both databases
MAX_CLEANED_NOTES = 64


@cache
def _text_limits(model: type[WireModel]) -> dict[str, int]:
    """``{field: max_length}`` for the model's text fields, read from their declarations."""
    limits: dict[str, int] = {}
    for name, info in model.model_fields.items():
        if info.annotation not in _TEXT_TYPES:
            continue
        for meta in info.metadata:
            if isinstance(meta, MaxLen):
                limits[name] = meta.max_length
    return limits


_TEXT_TYPES = (str, str | None)


def _clean_fields(
    model: type[WireModel],
    data: dict[str, Any],
    notes: list[str],
    prefix: str = "",
    item_limits: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A copy of ``data`` with ``model``'s text fields (and list-of-text fields) cleaned."""
    out = dict(data)
    for name, limit in _text_limits(model).items():
        value = out.get(name)
        if isinstance(value, str):
            out[name], found = clean_text(value, limit)
            notes.extend(f"{prefix}{name}: {note}" for note in found)
    for name, limit in (item_limits or {}).items():
        values = out.get(name)
        if isinstance(values, list):
            cleaned = []
            for i, value in enumerate(values):
                if isinstance(value, str):
                    value, found = clean_text(value, limit)
                    notes.extend(f"{prefix}{name}[{i}]: {note}" for note in found)
                cleaned.append(value)
            out[name] = cleaned
    return out


class Cleaned(WireModel):
    """A report item whose text fields are cleaned on the way in (see the module docstring)."""

    # list[str] fields: the limit of each element (the declared max_length counts elements).
    _item_limits: ClassVar[dict[str, int]] = {}
    # list-of-model fields whose text is cleaned too (notes go to this item's ``cleaned``).
    _nested: ClassVar[dict[str, type[WireModel]]] = {}

    cleaned: list[str] = Field(
        default_factory=list,
        max_length=MAX_CLEANED_NOTES,
        description="what was cleaned in this item, e.g. 'serial: NUL replaced' (1.1)",
    )

    @model_validator(mode="before")
    @classmethod
    def _clean(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        notes: list[str] = []
        prior = data.get("cleaned")
        if isinstance(prior, list):  # what the agent already cleaned on its side
            for note in prior[:MAX_CLEANED_NOTES]:
                if isinstance(note, str):
                    notes.append(clean_text(note, 200)[0])
        out = _clean_fields(cls, data, notes, item_limits=cls._item_limits)
        for name, model in cls._nested.items():
            items = out.get(name)
            if isinstance(items, list):
                out[name] = [
                    _clean_fields(model, item, notes, f"{name}[{i}].")
                    if isinstance(item, dict)
                    else item
                    for i, item in enumerate(items)
                ]
        if "data" in cls.model_fields and isinstance(out.get("data"), dict):
            out["data"] = clean_data(out["data"], notes)
        if notes:
            kept = list(dict.fromkeys(notes))
            if len(kept) > MAX_CLEANED_NOTES:
                kept = [*kept[: MAX_CLEANED_NOTES - 1], f"{len(kept) - MAX_CLEANED_NOTES + 1} more"]
            out["cleaned"] = kept
        return out


class PoolReading(WireModel):
    """One pool slot as the miner reported it (passwords never travel)."""

    url: str = Field(max_length=512)
    user: str = Field(default="", max_length=512)
    status: str | None = Field(default=None, max_length=32)
    active: bool | None = None
    kind: str | None = Field(default=None, description="e.g. user, devfee", max_length=32)


class Observation(Cleaned):
    """One poll of one miner."""

    _nested: ClassVar[dict[str, type[WireModel]]] = {"pools": PoolReading}

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


class IdentityRecord(Cleaned):
    """Who a miner is: read on the slow cadence and whenever MAC or model change."""

    _item_limits: ClassVar[dict[str, int]] = {"hashboard_serials": 128}

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


class Event(Cleaned):
    """Something the agent noticed: a miner vanished, a policy was refused, a disk is full."""

    kind: str = Field(min_length=1, max_length=64)
    at: AwareDatetime
    severity: EventSeverity = EventSeverity.INFO
    ip: IPv4Address | None = None
    detail: str = Field(default="", max_length=4096)
    data: dict[str, Any] = Field(
        default_factory=dict, description="structured facts (1.1), e.g. an enforcement incident"
    )


class ReportBatch(Message):
    """A batch the agent pushes; ``batch_id`` makes re-delivery idempotent."""

    batch_id: uuid.UUID
    agent_clock: AwareDatetime = Field(description="the agent's clock when it sealed the batch")
    sequence: int = Field(ge=0, le=MAX_SEQUENCE, description="per-agent, increasing; replay order")
    sent_at: AwareDatetime | None = Field(
        default=None,
        description="the agent's clock when this delivery was sent (1.1): measures its skew",
    )
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
    cleaned: list[str] = Field(
        default_factory=list,
        description="items stored with text cleaned, and what was cleaned (1.1)",
    )
    received_at: AwareDatetime | None = Field(
        default=None, description="the controller's clock when it received the batch (1.1)"
    )
    clock_skew_s: float | None = Field(
        default=None,
        description="the agent's clock minus the controller's, from sent_at (1.1)",
    )
