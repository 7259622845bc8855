"""Shared model configuration: strict, immutable, explicit about unknown fields."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from contract.version import CONTRACT_VERSION, check_version


def _aware(value: datetime) -> datetime:
    """Timestamps on the wire are timezone-aware; naive ones are refused, not guessed."""
    if value.tzinfo is None:
        raise ValueError("timestamp must include a timezone (e.g. 2026-11-01T00:00:00Z)")
    return value.astimezone(UTC)


AwareDatetime = Annotated[datetime, AfterValidator(_aware)]
Version = Annotated[str, AfterValidator(check_version)]


class WireModel(BaseModel):
    """Base for every model on the wire. Unknown fields are ignored (minor versions add them)."""

    model_config = ConfigDict(frozen=True, extra="ignore", str_strip_whitespace=True)


class Message(WireModel):
    """A top-level message: carries the contract version it was written in."""

    contract_version: Version = Field(default=CONTRACT_VERSION)
