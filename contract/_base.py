"""Shared model configuration: strict, immutable, explicit about unknown fields."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from contract.version import CONTRACT_VERSION, check_version


def _aware(value: datetime) -> datetime:
    """Timestamps on the wire are timezone-aware; naive ones are refused, not guessed."""
    if value.tzinfo is None:
        raise ValueError("timestamp must include a timezone (e.g. 2026-11-01T00:00:00Z)")
    return value.astimezone(UTC)


AwareDatetime = Annotated[datetime, AfterValidator(_aware)]


def nesting_problem(value: Any, limit: int) -> str | None:
    """Why ``value`` (parsed JSON) nests deeper than ``limit``, or None; iterative, so it cannot
    recurse itself."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return f"nested deeper than {limit} levels"
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return None


Version = Annotated[str, AfterValidator(check_version)]


class WireModel(BaseModel):
    """Base for every model on the wire. Unknown fields are ignored (minor versions add them)."""

    model_config = ConfigDict(frozen=True, extra="ignore", str_strip_whitespace=True)


class Message(WireModel):
    """A top-level message: carries the contract version it was written in."""

    contract_version: Version = Field(default=CONTRACT_VERSION)
