"""Sums over the observation history per machine and UTC hour, day and week (``observation_sum``).

At the default resolution a machine keeps 288 history rows a day, so a 100,000-machine
register's 30-day averages would read 864 million rows. From the sums, a period is read as
whole weeks, then whole days, then whole hours, then raw polls only for what is left of an
hour at each edge: about a dozen rows per machine for 30 days, 60-odd for a year, and no raw
polls at all when the edges fall on whole hours.

Ingest adds each history row it actually wrote (never one dropped as a duplicate of its
bucket) to its hour, day and week in the same transaction, so the sums always equal a
``GROUP BY`` over the raw rows, whatever order the polls arrive in. :func:`rebuild`
recomputes them from the raw rows (a backfill, and the definition the tests compare with).

What is summed mirrors the register's definitions: hashrate and power over the reachable
polls that carry a value (an average is ``sum / n``), and the polls that found the machine
reachable and mining (operating hours are those times the history resolution).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Integer, and_, case, cast, delete, func, insert, literal, select
from sqlalchemy import true as sql_true
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.sql import ColumnElement

from controller.tables import HISTORY, SUM

HOUR = 3_600
DAY = 86_400
WEEK = 7 * DAY  # weeks since the epoch (they start on Thursdays; any alignment would do)
SPANS = (HOUR, DAY, WEEK)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)
SUMS = ("polls", "mining", "hashrate_sum", "hashrate_n", "power_sum", "power_n")


class Reading(NamedTuple):
    """The fields of one history row that the sums need."""

    machine_pk: int
    observed_at: datetime
    reachable: bool
    is_mining: bool | None
    hashrate_ths: float | None
    power_w: float | None


class Piece(NamedTuple):
    """Part of a period, ``[since, until)``, read from the sums of ``span`` seconds
    (``None``: from the raw history rows)."""

    span: int | None
    since: datetime
    until: datetime


def split_period(start: datetime, end: datetime) -> list[Piece]:
    """``[start, end)`` as whole weeks, then whole UTC days, then whole hours, then raw
    remainders (pure).

    The pieces do not overlap and together cover the period exactly.
    """
    return _split(start, end, (WEEK, DAY, HOUR))


def _split(since: datetime, until: datetime, spans: tuple[int, ...]) -> list[Piece]:
    if since >= until:
        return []
    if not spans:
        return [Piece(None, since, until)]
    span, finer = spans[0], spans[1:]
    first, last = _ceil(since, span), _floor(until, span)
    if first >= last:
        return _split(since, until, finer)
    return [*_split(since, first, finer), Piece(span, first, last), *_split(last, until, finer)]


def _floor(at: datetime, span: int) -> datetime:
    step = timedelta(seconds=span)
    return EPOCH + (at - EPOCH) // step * step


def _ceil(at: datetime, span: int) -> datetime:
    floor = _floor(at, span)
    return floor if floor == at else floor + timedelta(seconds=span)


def seconds(at: datetime) -> int:
    """Whole Unix seconds (floored), exactly."""
    return (at - EPOCH) // _SECOND


def sums(readings: Iterable[Reading]) -> dict[tuple[int, int, int], list[Any]]:
    """Per ``(machine_pk, span_s, start_s)``: the sums in :data:`SUMS` order (pure)."""
    out: dict[tuple[int, int, int], list[Any]] = {}
    for r in readings:
        at = seconds(r.observed_at)
        for span in SPANS:
            key = (r.machine_pk, span, at - at % span)
            acc = out.get(key)
            if acc is None:
                acc = out[key] = [0, 0, 0.0, 0, 0.0, 0]
            acc[0] += 1
            if r.reachable:
                if r.is_mining:
                    acc[1] += 1
                if r.hashrate_ths is not None:
                    acc[2] += r.hashrate_ths
                    acc[3] += 1
                if r.power_w is not None:
                    acc[4] += r.power_w
                    acc[5] += 1
    return out


def add(conn: Connection, readings: Iterable[Reading]) -> None:
    """Add newly written history rows to their hour, day and week (one upsert per span)."""
    per_span = sums(readings)
    if not per_span:
        return
    rows = [
        {"machine_pk": pk, "span_s": span, "start_s": begin, **dict(zip(SUMS, acc, strict=True))}
        for (pk, span, begin), acc in sorted(per_span.items())  # one lock order (PostgreSQL)
    ]
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(SUM)
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[SUM.c.machine_pk, SUM.c.span_s, SUM.c.start_s],
            set_={name: SUM.c[name] + stmt.excluded[name] for name in SUMS},
        ),
        rows,
    )


def history_seconds(conn: Connection) -> ColumnElement[int]:
    """SQL for ``observation_history.observed_at`` in whole Unix seconds."""
    if conn.dialect.name == "postgresql":
        return cast(func.floor(func.extract("epoch", HISTORY.c.observed_at)), Integer)
    # SQLite keeps ``YYYY-MM-DD HH:MM:SS.ffffff`` (UTC); '%s' reads it as Unix seconds.
    return cast(func.strftime("%s", HISTORY.c.observed_at), Integer)


def sum_columns() -> list[ColumnElement[Any]]:
    """Aggregates over ``observation_history`` rows, in :data:`SUMS` order."""
    up = HISTORY.c.reachable == sql_true()
    return [
        func.count(),
        func.coalesce(func.sum(case((and_(up, HISTORY.c.is_mining == sql_true()), 1), else_=0)), 0),
        func.coalesce(func.sum(case((up, HISTORY.c.hashrate_ths), else_=None)), 0.0),
        func.count(case((up, HISTORY.c.hashrate_ths), else_=None)),
        func.coalesce(func.sum(case((up, HISTORY.c.power_w), else_=None)), 0.0),
        func.count(case((up, HISTORY.c.power_w), else_=None)),
    ]


def rebuild(conn: Connection) -> int:
    """Recompute every sum from the raw history (a backfill); returns the rows written."""
    conn.execute(delete(SUM))
    at = history_seconds(conn)
    for span in SPANS:
        begin = (at - at % span).label("start_s")
        source = select(
            HISTORY.c.machine_pk, literal(span).label("span_s"), begin, *sum_columns()
        ).group_by(HISTORY.c.machine_pk, begin)
        conn.execute(insert(SUM).from_select(["machine_pk", "span_s", "start_s", *SUMS], source))
    return int(conn.execute(select(func.count()).select_from(SUM)).scalar_one())
