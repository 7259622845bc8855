"""Report batches: what an agent pushes — observations, identities and events.

Every string in a report is bounded and storable at this boundary (:mod:`contract.text`): a NUL
or a lone surrogate is replaced with U+FFFD and an over-long value is cut to its field's limit,
and each change is recorded in the item's ``cleaned`` list ("serial: 1 invalid character(s)
replaced (NUL)"). Nothing is
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

from pydantic import Field, ModelWrapValidatorHandler, ValidationError, model_validator

from contract._base import AwareDatetime, Message, WireModel
from contract.text import BAD_TEXT, clean_data, clean_text, needs_cleaning

MAX_BATCH_ITEMS = 5_000
MAX_SEQUENCE = 2**31 - 1  # what the controller's INTEGER column holds (a batch per second: 68 y)
MAX_CLEANED_NOTES = 64


def _text(limit: int, **kwargs: Any) -> Any:
    """A text field cut to ``limit`` characters (documented as maxLength, enforced by cleaning
    rather than by refusing the whole batch)."""
    return Field(json_schema_extra={"maxLength": limit}, **kwargs)


@cache
def _text_limits(model: type[WireModel]) -> tuple[tuple[str, int], ...]:
    """``(field, limit)`` for the model's text fields, read from their declarations."""
    limits: list[tuple[str, int]] = []
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra
        if info.annotation in _TEXT_TYPES and isinstance(extra, dict):
            limit = extra.get("maxLength")
            if isinstance(limit, int):
                limits.append((name, limit))
    return tuple(limits)


_TEXT_TYPES = (str, str | None)


def _set(item: WireModel, name: str, value: Any) -> None:
    """Replace a field of a (frozen) model being validated: only ever a cleaned value."""
    object.__setattr__(item, name, value)


def _clean_attrs(item: WireModel, notes: list[str], prefix: str = "") -> None:
    for name, limit in _text_limits(type(item)):
        value = getattr(item, name)
        if value is not None and needs_cleaning(value, limit):
            cleaned = clean_text(value, limit)
            _set(item, name, cleaned.text)
            notes.extend(f"{prefix}{name}: {note}" for note in cleaned.notes)


def _dirty(item: Cleaned) -> bool:
    """The fast screen run for every item: could any of its text need cleaning?

    Reads the validated values straight from ``__dict__`` with limits computed once per
    class (this runs for every item: 10⁵ a minute on a large farm).
    """
    search = BAD_TEXT.search
    values = item.__dict__
    for name, limit in item._own_limits:
        value = values[name]
        if value is not None and (len(value) > limit or search(value)):
            return True
    for name, limit in item._list_limits:
        for value in values[name]:
            if len(value) > limit or search(value):
                return True
    for name, limits in item._nested_limits:
        for nested in values[name]:
            inner = nested.__dict__
            for field, limit in limits:
                value = inner[field]
                if value is not None and (len(value) > limit or search(value)):
                    return True
    return False


class Cleaned(WireModel):
    """A report item whose text fields are cleaned on the way in (see the module docstring).

    Pydantic validates the item first (fast, in its core); then one cheap screen decides if
    anything needs cleaning, and only then are values replaced and notes written.
    """

    # list[str] fields: the limit of each element.
    _item_limits: ClassVar[dict[str, int]] = {"cleaned": 200}
    # list-of-model fields whose text is cleaned too (notes go to this item's ``cleaned``).
    _nested: ClassVar[dict[str, type[WireModel]]] = {}

    # Computed once per class (``__pydantic_init_subclass__``) for the fast screen.
    _own_limits: ClassVar[tuple[tuple[str, int], ...]] = ()
    _list_limits: ClassVar[tuple[tuple[str, int], ...]] = ()
    _nested_limits: ClassVar[tuple[tuple[str, tuple[tuple[str, int], ...]], ...]] = ()

    cleaned: list[str] = Field(
        default_factory=list,
        max_length=MAX_CLEANED_NOTES,
        description="what was cleaned in this item, e.g. 'serial: cut from 300 to 128 characters'",
    )

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls._own_limits = _text_limits(cls)
        cls._list_limits = tuple(cls._item_limits.items())
        cls._nested_limits = tuple((n, _text_limits(m)) for n, m in cls._nested.items())

    @model_validator(mode="wrap")
    @classmethod
    def _surrogates(cls, data: Any, handler: ModelWrapValidatorHandler[Cleaned]) -> Cleaned:
        """A lone surrogate (Python input can hold one: a JSON body parsed by the API, a
        miner's string on the agent) makes the core's string check refuse the item: then,
        and only then, every surrogate and NUL in it is replaced and noted, and it is
        validated again."""
        try:
            return handler(data)
        except ValidationError as exc:
            if not isinstance(data, dict) or all(
                e["type"] != "string_unicode" for e in exc.errors()
            ):
                raise
        notes: list[str] = []
        item = _clean_raw(data, notes)
        prior = item.get("cleaned")
        item["cleaned"] = [*(prior if isinstance(prior, list) else []), *notes]
        return handler(item)

    @model_validator(mode="after")
    def _clean(self) -> Cleaned:
        data = self.__dict__.get("data")
        if not data and not _dirty(self):
            return self
        notes: list[str] = []
        _clean_attrs(self, notes)
        for name, limit in self._item_limits.items():
            values: list[str] = getattr(self, name)
            if any(needs_cleaning(v, limit) for v in values):
                kept = []
                for i, value in enumerate(values):
                    cleaned = clean_text(value, limit)
                    kept.append(cleaned.text)
                    notes.extend(f"{name}[{i}]: {note}" for note in cleaned.notes)
                _set(self, name, kept)
        for name in self._nested:
            for i, nested in enumerate(getattr(self, name)):
                _clean_attrs(nested, notes, f"{name}[{i}].")
        if data:
            _set(self, "data", clean_data(data, notes))
        if notes:
            merged = list(dict.fromkeys([*self.cleaned, *notes]))
            if len(merged) > MAX_CLEANED_NOTES:
                extra = len(merged) - MAX_CLEANED_NOTES + 1
                merged = [*merged[: MAX_CLEANED_NOTES - 1], f"{extra} more"]
            _set(self, "cleaned", merged)
        return self


class PoolReading(WireModel):
    """One pool slot as the miner reported it (passwords never travel)."""

    url: str = _text(512)
    user: str = _text(512, default="")
    status: str | None = _text(32, default=None)
    active: bool | None = None
    kind: str | None = _text(32, default=None, description="e.g. user, devfee")


class Observation(Cleaned):
    """One poll of one miner."""

    _nested: ClassVar[dict[str, type[WireModel]]] = {"pools": PoolReading}

    ip: IPv4Address
    observed_at: AwareDatetime
    reachable: bool
    error: str | None = _text(1024, default=None, description="why a poll failed")
    mac: str | None = _text(32, default=None)
    serial: str | None = _text(128, default=None)
    is_mining: bool | None = None
    hashrate_ths: float | None = Field(default=None, ge=0)
    power_w: float | None = Field(default=None, ge=0)
    temperature_c: float | None = None
    fan_rpm: list[int] = Field(default_factory=list, max_length=16)
    pools: list[PoolReading] = Field(default_factory=list, max_length=16)


class IdentityRecord(Cleaned):
    """Who a miner is: read on the slow cadence and whenever MAC or model change."""

    _item_limits: ClassVar[dict[str, int]] = {"cleaned": 200, "hashboard_serials": 128}

    ip: IPv4Address
    observed_at: AwareDatetime
    mac: str | None = _text(32, default=None)
    serial: str | None = _text(128, default=None)
    serial_source: str | None = _text(64, default=None)
    control_board_serial: str | None = _text(128, default=None)
    hashboard_serials: list[str] = Field(default_factory=list, max_length=16)
    psu_serial: str | None = _text(128, default=None)
    make: str | None = _text(64, default=None)
    model: str | None = _text(128, default=None)
    firmware: str | None = _text(64, default=None)
    firmware_version: str | None = _text(128, default=None)
    hostname: str | None = _text(255, default=None)


class EventSeverity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class Event(Cleaned):
    """Something the agent noticed: a miner vanished, a policy was refused, a disk is full."""

    kind: str = _text(64, min_length=1)
    at: AwareDatetime
    severity: EventSeverity = EventSeverity.INFO
    ip: IPv4Address | None = None
    detail: str = _text(4096, default="")
    data: dict[str, Any] = Field(
        default_factory=dict, description="structured facts (1.1), e.g. an enforcement incident"
    )


def _clean_raw(item: Any, notes: list[str], path: str = "") -> Any:
    """``item`` with every string cleaned of NUL and lone surrogates (before validation)."""
    if isinstance(item, str):
        cleaned = clean_text(item, len(item))
        notes.extend(f"{path}: {note}" for note in cleaned.notes)
        return cleaned.text
    if isinstance(item, list):
        return [_clean_raw(v, notes, f"{path}[{i}]") for i, v in enumerate(item)]
    if isinstance(item, dict):
        out = {}
        for key, value in item.items():
            name = _clean_raw(key, notes, f"{path} key" if path else "key")
            out[name] = _clean_raw(value, notes, f"{path}.{name}" if path else str(name))
        return out
    return item


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
