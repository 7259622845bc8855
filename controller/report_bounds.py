"""What an agent's report may claim: pure checks, applied per item before anything is written.

Three bounds (see ``docs/controller.md``, "Ingestion bounds"):

- **time**: an item's ``observed_at`` (an event's ``at``) must lie within
  [received − ``report_max_age_days``, received + ``report_max_skew_s``]; a poll from the
  future would pin a machine's latest state, one from 1970 would rewrite its history;
- **text**: the contract cleans every string (``contract.text``); an item whose *identity key*
  (MAC, serial, board serials) had to be cleaned is refused, since a damaged key could name
  the wrong machine; other cleaned text is stored and listed in the acknowledgement;
- **site**: an item may only touch a machine of the agent's own site (or one with no site
  yet); the MAC or serial of another site's machine is a conflict, never followed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from controller.settings import Settings

# Fields whose value names a machine: cleaning them would make a different identity.
IDENTITY_KEYS = frozenset(
    {"mac", "serial", "control_board_serial", "psu_serial", "hashboard_serials"}
)


@dataclass(frozen=True)
class TimeWindow:
    """The instants an item received at ``received`` may carry."""

    received: datetime
    earliest: datetime
    latest: datetime

    @classmethod
    def around(cls, received: datetime, settings: Settings) -> TimeWindow:
        return cls(
            received=received,
            earliest=received - timedelta(days=settings.report_max_age_days),
            latest=received + timedelta(seconds=settings.report_max_skew_s),
        )

    def refuse(self, at: datetime, what: str = "observed_at") -> str | None:
        """Why ``at`` is refused, or None if it is inside the window."""
        if at > self.latest:
            ahead = (at - self.received).total_seconds()
            return (
                f"{what} {at.isoformat()} is {_span(ahead)} ahead of the controller's clock "
                f"(at most {_span((self.latest - self.received).total_seconds())} allowed: "
                "check the agent's clock)"
            )
        if at < self.earliest:
            limit = _span((self.received - self.earliest).total_seconds())
            return f"{what} {at.isoformat()} is older than {limit} (report_max_age_days)"
        return None


FACT_TIMES = ("detected_at", "written_at", "verified_at")
"""Instants inside an event's facts that the evidence uses as the time of what happened."""


def refuse_fact_times(window: TimeWindow, data: Mapping[str, Any]) -> str | None:
    """Why an event's fact times are refused (outside the window, or not an instant with a
    zone), or None. The evidence dates drifts, writes and verifications by these, so they are
    bounded exactly as the event's own ``at``."""
    for key in FACT_TIMES:
        value = data.get(key)
        if value is None:
            continue
        try:
            at = datetime.fromisoformat(value) if isinstance(value, str) else None
        except ValueError:
            at = None
        if at is None or at.tzinfo is None:
            return f"data.{key} is not a time with a zone"
        why = window.refuse(at.astimezone(UTC), f"data.{key}")
        if why is not None:
            return why
    return None


def damaged_key(cleaned: list[str]) -> str | None:
    """The first cleaning note that touched an identity key, if any."""
    for note in cleaned:
        field = note.split(":", 1)[0].split("[", 1)[0]
        if field in IDENTITY_KEYS:
            return note
    return None


def clock_skew_s(sent_at: datetime | None, received: datetime) -> float | None:
    """The agent's clock minus the controller's (network delay included, so a bound)."""
    if sent_at is None:
        return None
    return round((sent_at - received).total_seconds(), 3)


def _span(seconds: float) -> str:
    seconds = abs(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"
