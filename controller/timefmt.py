"""Instants, periods and durations: the one rule every CLI option and API parameter follows.

So that ``--period 2026-10-01..2026-11-01`` counts the same window in ``compliance status``,
``export compliance`` and the API, and a bad value gets the same wording everywhere. The rule
(documented in docs/controller.md, "Times and periods"):

- An instant is ISO 8601 *with* a zone (``2026-11-01T08:00Z``, ``…+05:00``), a bare date
  (``2026-11-01``: 00:00 UTC that day) or ``now``. A time without a zone is refused, since
  the controller cannot know which wall clock was meant. Instants lie in [2000-01-01, 3000-01-01].
- A period ``FROM..TO`` is half-open ``[FROM, TO)``: a bare-date TO is 00:00 UTC of that day,
  so ``2026-10-01..2026-11-01`` is all of October and nothing of 1 November.
- A duration is ``90s``, ``15m``, ``12h``, ``7d``, a sum such as ``1h30m``, or whole seconds
  (``600``); it must be positive. ``--since 24h`` is the period ``[now - 24h, now)``.

Pure functions: ``now`` is always passed in. Errors are :class:`TimeFormatError` (a
``ValueError``) whose text is ``WHAT 'TEXT': reason``, WHAT being the option or parameter name.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from typing import Annotated

from pydantic import BeforeValidator, ValidationInfo

EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)  # before any evidence this controller can hold
LATEST = datetime(3000, 1, 1, tzinfo=UTC)  # beyond this the reports' date arithmetic overflows

INSTANT_FORM = "an ISO 8601 time with a zone (2026-11-01T08:00Z), a date (2026-11-01) or now"
PERIOD_FORM = "FROM..TO, e.g. 2026-10-01..2026-11-01 (TO excluded)"
DURATION_FORM = "a positive duration such as 90s, 15m, 12h, 7d or 1h30m"

HELP = "Times, periods and durations: docs/controller.md, 'Times and periods'."

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_PART = re.compile(r"(\d+)([smhd])")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class TimeFormatError(ValueError):
    """A time, period or duration the user typed that does not follow the rule."""

    def __init__(self, what: str, text: str, reason: str) -> None:
        super().__init__(f"{what} {text!r}: {reason}")


def _checked(what: str, text: str, value: datetime) -> datetime:
    if not EARLIEST <= value <= LATEST:
        raise TimeFormatError(what, text, f"must lie between {EARLIEST.date()} and {LATEST.date()}")
    return value


def parse_instant(text: str, what: str, *, now: datetime) -> datetime:
    """One instant in UTC (see the module rule); ``now`` is returned to the second."""
    value = text.strip()
    if value.lower() == "now":
        return now.astimezone(UTC).replace(microsecond=0)
    try:
        if _DATE.match(value):
            day = date.fromisoformat(value)
            parsed = datetime(day.year, day.month, day.day, tzinfo=UTC)
        else:
            parsed = datetime.fromisoformat(value)
    except ValueError:
        raise TimeFormatError(what, text, f"expected {INSTANT_FORM}") from None
    if parsed.tzinfo is None:
        raise TimeFormatError(what, text, "has no time zone; add Z for UTC")
    try:
        return _checked(what, text, parsed.astimezone(UTC))
    except OverflowError:  # year 1 or 9999 with an offset
        raise TimeFormatError(
            what, text, f"must lie between {EARLIEST.date()} and {LATEST.date()}"
        ) from None


def parse_period(text: str, what: str, *, now: datetime) -> tuple[datetime, datetime]:
    """``FROM..TO`` as the half-open ``[FROM, TO)``, each end an instant."""
    first, sep, last = text.partition("..")
    if not sep or not first.strip() or not last.strip():
        raise TimeFormatError(what, text, f"expected {PERIOD_FORM}")
    start = parse_instant(first, f"{what} FROM", now=now)
    end = parse_instant(last, f"{what} TO", now=now)
    if start >= end:
        raise TimeFormatError(what, text, "FROM must be before TO")
    return start, end


def parse_duration(text: str, what: str) -> timedelta:
    """``90s``, ``15m``, ``12h``, ``7d``, ``1h30m`` or whole seconds; positive."""
    value = text.strip().lower()
    if value.isdigit():
        seconds = int(value)
    else:
        parts = _DURATION_PART.findall(value)
        if not value or "".join(n + u for n, u in parts) != value:
            raise TimeFormatError(what, text, f"expected {DURATION_FORM}")
        seconds = sum(int(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise TimeFormatError(what, text, f"expected {DURATION_FORM}")
    if seconds > (LATEST - EARLIEST).total_seconds():
        raise TimeFormatError(what, text, "is longer than the years 2000 to 3000")
    return timedelta(seconds=seconds)


def parse_since(text: str, what: str, *, now: datetime) -> tuple[datetime, datetime]:
    """``--since 24h``: the period ``[now - 24h, now)``, never starting before 2000."""
    end = now.astimezone(UTC)
    return max(EARLIEST, end - parse_duration(text, what)), end


def parse_moment(text: str, what: str, *, now: datetime) -> datetime:
    """A duration from now (``7d``) or an instant: for deadlines such as an exemption's end."""
    try:
        return _checked(what, text, now.astimezone(UTC) + parse_duration(text, what))
    except TimeFormatError:
        pass
    try:
        return parse_instant(text, what, now=now)
    except TimeFormatError:
        raise TimeFormatError(
            what, text, f"expected a duration from now (7d, 36h) or {INSTANT_FORM}"
        ) from None


def resolve_period(
    start: str | None,
    end: str | None,
    *,
    now: datetime,
    default: timedelta = timedelta(hours=24),
    names: tuple[str, str] = ("start", "end"),
) -> tuple[datetime, datetime]:
    """The API's ``start``/``end`` pair as ``[start, end)``: end defaults to now, start to
    ``default`` before end (never before 2000)."""
    hi = parse_instant(end, names[1], now=now) if end is not None else now.astimezone(UTC)
    if start is None:
        return max(EARLIEST, hi - default), hi
    lo = parse_instant(start, names[0], now=now)
    if lo >= hi:
        raise TimeFormatError(names[0], start, f"must be before {names[1]} {hi.isoformat()}")
    return lo, hi


def _body_instant(value: object, info: ValidationInfo) -> object:
    """A JSON string is read by :func:`parse_instant`; a datetime from Python code passes."""
    what = info.field_name or "time"
    if isinstance(value, str):
        return parse_instant(value, what, now=datetime.now(UTC))
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise TimeFormatError(what, value.isoformat(), "has no time zone; add Z for UTC")
        return value.astimezone(UTC)
    return value


Instant = Annotated[datetime, BeforeValidator(_body_instant)]
"""An instant in an API body, by the same rule and wording as the options and query parameters."""
