"""The machine register as it stood at a moment, rebuilt from history.

Each machine's row is its newest ``machine_version`` with ``valid_from <= as_of`` (never
today's row with an old date on it). Around it, everything else is read as of the same
moment. The pool columns are one fact, so they come from one record: the
``compliance_interval`` covering ``as_of``, which keeps what its judgement saw — the status,
the pools the agent read back, the worker the machine was expected to use, the approved pool
set's version and the newest poll that confirmed it. "compliant" therefore always sits next
to the read-back that was judged compliant. The last pool check is that newest confirming
poll when it is not after ``as_of``; for an ``as_of`` inside an interval's span, the newest
poll kept in the history at or before ``as_of`` and not before the interval started (exact
to a history bucket). Without an interval (nothing judged yet) the status is unknown, the
read-back and worker empty, and the approved pool set the newest one approved at or before
``as_of``. Measured averages cover ``period``:
hashrate and power average the reachable polls; operating hours are the polls that found the
machine mining times the history resolution (one poll is kept per bucket, so this is exact
to a bucket).

Cost grows with machines, not with polls kept (288 a machine a day at 300 s): every
per-machine read is an index seek driven from ``machine``, and the averages come from the
hour and day sums of :mod:`controller.history_rollup`. Rows are fetched without SQLAlchemy's
per-value processing and converted where used: a 100,000-machine register is millions of
values.

Not versioned (their current values are used): site names, owners and licence numbers.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import Column as SqlColumn
from sqlalchemy import (
    DateTime,
    Float,
    Integer,
    MetaData,
    and_,
    func,
    insert,
    or_,
    select,
    text,
    type_coerce,
)
from sqlalchemy import Table as SqlTable
from sqlalchemy.engine import Connection
from sqlalchemy.sql import ColumnElement
from sqlalchemy.types import NullType
from sqlmodel import Session, col
from sqlmodel import select as orm_select

from controller import history_rollup
from controller.errors import NotFound
from controller.exports.table import Column, Table
from controller.models import (
    LifecycleState,
    PoolSet,
    PoolSetStatus,
    Site,
)
from controller.tables import HISTORY, INTERVAL, MACHINE, VERSION

SERIAL_MISMATCH_FLAG = "serial_mismatch"

COLUMNS: tuple[Column, ...] = (
    Column("machine_id", "text", 11),
    Column("vendor", "text", 9),
    Column("model", "text", 14),
    Column("label_serial", "text", 16),
    Column("reported_serial", "text", 16),
    Column("serial_mismatch", "bool", 8),
    Column("control_board_serial", "text", 14),
    Column("hashboard_serials", "list", 24),
    Column("psu_serial", "text", 12),
    Column("mac", "text", 17),
    Column("firmware", "text", 9),
    Column("firmware_version", "text", 14),
    Column("owner", "text", 18),
    Column("licence_number", "text", 14),
    Column("site", "text", 12),
    Column("container", "text", 9),
    Column("rack", "text", 6),
    Column("shelf", "text", 6),
    Column("slot", "text", 6),
    Column("ip", "text", 15),
    Column("nominal_ths", "float2", 9),
    Column("nominal_w", "float0", 8),
    Column("avg_hashrate_ths", "float2", 9),
    Column("avg_power_w", "float0", 8),
    Column("operating_hours", "float2", 9),
    Column("approved_pool_set", "text", 30),
    Column("configured_pools", "text", 40),
    Column("worker_name", "text", 22),
    Column("pool_compliance", "status", 12),
    Column("last_pool_check", "datetime", 19),
    Column("lifecycle_state", "state", 13),
    Column("state_since", "datetime", 19),
    Column("commissioned_at", "datetime", 19),
    Column("decommissioned_at", "datetime", 19),
    Column("record_version", "int", 7),
)
INDEX = {c.key: i for i, c in enumerate(COLUMNS)}

PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "part.identity",
        (
            "vendor",
            "model",
            "label_serial",
            "reported_serial",
            "serial_mismatch",
            "control_board_serial",
            "hashboard_serials",
            "psu_serial",
            "mac",
            "firmware",
            "firmware_version",
        ),
    ),
    (
        "part.location",
        (
            "owner",
            "licence_number",
            "site",
            "container",
            "rack",
            "shelf",
            "slot",
            "ip",
            "lifecycle_state",
            "state_since",
            "commissioned_at",
            "decommissioned_at",
            "record_version",
        ),
    ),
    (
        "part.operation",
        (
            "nominal_ths",
            "nominal_w",
            "avg_hashrate_ths",
            "avg_power_w",
            "operating_hours",
            "approved_pool_set",
            "configured_pools",
            "worker_name",
            "pool_compliance",
            "last_pool_check",
        ),
    ),
)

_STATES = {key: state for state in LifecycleState for key in (state.name, state.value)}


_STATE_VALUES = {key: state.value for key, state in _STATES.items()}


def state_of(value: Any) -> LifecycleState:
    """Lifecycle states are stored by member name (``ACTIVE``); values are accepted too."""
    return _STATES[str(value)]


@dataclass(frozen=True)
class RegisterQuery:
    """What an inspector asked for: the register as of a moment, optionally filtered."""

    as_of: datetime
    period: tuple[datetime, datetime] | None = None
    site: str | None = None
    state: LifecycleState | None = None
    model: str | None = None


Averages = tuple[float | None, float | None, float | None]
"""Measured over the period: average hashrate and power, operating hours (a plain tuple:
one per machine, 100,000s at once)."""


@dataclass(frozen=True)
class PoolSetView:
    version: int
    name: str
    urls: tuple[str, ...]
    account: str

    @property
    def text(self) -> str:
        return f"{self.name} v{self.version}: {'; '.join(self.urls)}"


def build_register(session: Session, query: RegisterQuery, resolution_s: int) -> Table:
    """The register table as of ``query.as_of`` (rows sorted by site and location)."""
    conn = session.connection()
    sites = _sites(session)
    site_id: int | None = None
    if query.site is not None:
        site_id = site_named(sites, query.site).id
    pool_sets = approved_sets_as_of(session, query.as_of)
    versions_of_sets = _pool_set_versions(session)
    # The history is read on a second connection meanwhile, into temporary tables: one
    # statement each, during which SQLite releases the GIL, so it runs on the other core
    # (history before ``as_of`` is not rewritten). Fetching rows there instead would take
    # the GIL for every row, and wait for it while this thread builds the rows.
    with conn.engine.connect() as history, ThreadPoolExecutor(max_workers=1) as pool:
        filled = pool.submit(_fill_history_tables, history, query)
        versions = current_versions(conn, query, site_id)
        judged = judgements_as_of(conn, query.as_of) if versions else {}
        heads, tails = _machine_parts(versions, sites, pool_sets, versions_of_sets, judged)
        filled.result()
        polled = _polls_from(history.execute(select(*map(_plain_column, _CHECKS_TMP.c))).all())
        averages = _averages_from(history.execute(_SUMS_TOTAL).all(), resolution_s)
        history.rollback()  # drops the temporary tables
    no_average: Averages = (None, None, 0.0 if query.period else None)
    rows: list[tuple[Any, ...]] = []
    append = rows.append
    for pk, head, (pool_text, worker, status, pools, *tail) in zip(
        (v[0] for v in versions), heads, tails, strict=True
    ):
        avg = averages.get(pk, no_average)
        judgement = judged.get(pk)
        at = judgement.last_check(query.as_of, polled.get(pk)) if judgement else None
        append(
            (
                *head,
                *avg,  # hashrate, power, operating hours
                pool_text,
                pools,
                worker,
                status,
                at,
                *tail,
            )
        )
    rows.sort(key=_location_key)
    return Table(name="register", sheet="sheet.register", columns=COLUMNS, rows=rows, parts=PARTS)


def _machine_parts(
    versions: list[tuple[Any, ...]],
    sites: dict[int, Site],
    pool_sets: dict[int, PoolSetView],
    sets_by_version: dict[tuple[int, int], PoolSetView],
    judged: dict[int, Judgement],
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Each row's cells before and after the measured ones (averages, last pool check), built
    while the history is still being read."""
    heads: list[tuple[Any, ...]] = []
    tails: list[tuple[Any, ...]] = []
    # plain values, not ORM attributes, in the loop: (name, owner, licence) and the set's text
    site_facts = {pk: (s.name, s.owner_name, s.licence_number) for pk, s in sites.items()}
    set_text = {pk: p.text for pk, p in pool_sets.items()}
    no_site: tuple[Any, ...] = (None, None, None)
    for (
        pk,
        machine_id,
        label_serial,
        reported_serial,
        board_serial,
        vendor,
        model,
        firmware,
        firmware_version,
        mac,
        hashboards,
        psu_serial,
        site_pk,
        container,
        rack,
        shelf,
        slot,
        ip,
        nominal_ths,
        nominal_w,
        state,
        state_since,
        commissioned_at,
        decommissioned_at,
        record_version,
        flags,
    ) in versions:
        site_name, owner, licence = site_facts.get(site_pk, no_site)
        judgement = judged.get(pk)
        if judgement is None:
            approved, worker, status, pools = set_text.get(site_pk), None, "unknown", None
        else:
            judged_set = (
                sets_by_version.get((site_pk, judgement.pool_set_version))
                if judgement.pool_set_version is not None
                else None
            )
            approved = judged_set.text if judged_set else set_text.get(site_pk)
            worker, status, pools = judgement.worker, judgement.status, judgement.pools_text
        heads.append(
            (
                machine_id,
                vendor,
                model,
                label_serial,
                reported_serial,
                SERIAL_MISMATCH_FLAG in _json_list(flags),
                board_serial,
                _json_list(hashboards),
                psu_serial,
                mac,
                firmware,
                firmware_version,
                owner,
                licence,
                site_name,
                container,
                rack,
                shelf,
                slot,
                ip,
                nominal_ths,
                nominal_w,
            )
        )
        tails.append(
            (
                approved,
                worker,
                status,
                pools,
                _STATE_VALUES[str(state)],
                _utc(state_since),
                _utc(commissioned_at),
                _utc(decommissioned_at),
                record_version,
            )
        )
    return heads, tails


def _utc(value: Any) -> datetime | None:
    """A stored time as an aware UTC datetime: SQLite hands back its text form (UTC), and
    PostgreSQL a datetime (see :func:`_plain_column`)."""
    if value is None:
        return None
    if isinstance(value, str):
        return datetime.fromisoformat(value + "+00:00")  # the UTC singleton as tzinfo
    return value.astimezone(UTC)  # type: ignore[no-any-return]


_JSON = json.JSONDecoder()


def _json_list(value: Any) -> list[Any]:
    """A stored JSON list: text on SQLite, already decoded on PostgreSQL."""
    if value is None or value == "[]":
        return []
    if isinstance(value, str):
        try:
            decoded = _JSON.raw_decode(value)[0]  # 3x json.loads, for text json.dumps wrote
        except ValueError:
            decoded = json.loads(value)
        return decoded if isinstance(decoded, list) else []
    return list(value)


def _plain_column(column: Any) -> Any:
    """The column without SQLAlchemy's per-value result processing (100,000s of values):
    the driver's value is converted where it is used (:func:`_utc`, :func:`_json_list`)."""
    return type_coerce(column, NullType()).label(column.name)


def register_totals(table: Table) -> list[tuple[str, Any]]:
    """Machines, machines per lifecycle state, nominal hashrate and power."""
    states = Counter(row[INDEX["lifecycle_state"]] for row in table.rows)
    ths = sum(row[INDEX["nominal_ths"]] or 0.0 for row in table.rows)
    watts = sum(row[INDEX["nominal_w"]] or 0.0 for row in table.rows)
    totals: list[tuple[str, Any]] = [("total.machines", len(table.rows))]
    totals.extend((f"state.{s.value}", states[s.value]) for s in LifecycleState if states[s.value])
    totals.append(("total.nominal_ths", round(ths, 2)))
    totals.append(("total.nominal_w", round(watts)))
    return totals


# --- queries -----------------------------------------------------------------------------------


_TMP = MetaData()
_CHECKS_TMP = SqlTable(
    "export_last_check",
    _TMP,
    SqlColumn("machine_pk", Integer),
    SqlColumn("observed_at", DateTime(timezone=True)),
    prefixes=["TEMPORARY"],
)
_SUMS_TMP = SqlTable(
    "export_period_sum",
    _TMP,
    SqlColumn("machine_pk", Integer),
    *(SqlColumn(name, Float if name.endswith("_sum") else Integer) for name in history_rollup.SUMS),
    prefixes=["TEMPORARY"],
)
_SUMS_TOTAL = select(
    _SUMS_TMP.c.machine_pk, *(func.sum(_SUMS_TMP.c[name]) for name in history_rollup.SUMS)
).group_by(_SUMS_TMP.c.machine_pk)


def _fill_history_tables(conn: Connection, query: RegisterQuery) -> None:
    """Last pool checks and the period's sums per machine, into temporary tables of ``conn``
    (gone when its transaction ends)."""
    _TMP.create_all(conn)
    conn.execute(
        insert(_CHECKS_TMP).from_select(
            ["machine_pk", "observed_at"], _last_check_query(query.as_of)
        )
    )
    if query.period is not None:
        columns = ["machine_pk", *history_rollup.SUMS]
        for stmt in _period_sum_queries(query.period):
            conn.execute(insert(_SUMS_TMP).from_select(columns, stmt))


def _sites(session: Session) -> dict[int, Site]:
    return {s.id: s for s in session.exec(orm_select(Site)) if s.id is not None}


def site_named(sites: dict[int, Site], name: str) -> Site:
    for site in sites.values():
        if site.name == name:
            return site
    raise NotFound(f"no site named {name!r}")


def versions_as_of(conn: Connection, as_of: datetime) -> Any:
    """A subquery: every version valid at ``as_of``, ``rn == 1`` for each machine's newest."""
    ranked = select(
        VERSION,
        func.row_number()
        .over(
            partition_by=VERSION.c.machine_pk,
            order_by=(VERSION.c.valid_from.desc(), VERSION.c.id.desc()),
        )
        .label("rn"),
    ).where(VERSION.c.valid_from <= as_of)
    return ranked.subquery("current")


_VERSION_FIELDS = (
    "machine_pk",
    "machine_id",
    "label_serial",
    "reported_serial",
    "control_board_serial",
    "vendor",
    "model",
    "firmware",
    "firmware_version",
    "mac",
    "hashboard_serials",
    "psu_serial",
    "site_id",
    "container",
    "rack",
    "shelf",
    "slot",
    "current_ip",
    "nominal_ths",
    "nominal_w",
    "lifecycle_state",
    "state_since",
    "commissioned_at",
    "decommissioned_at",
    "record_version",
    "flags",
)
_V_SITE = _VERSION_FIELDS.index("site_id")
_V_FLAGS = _VERSION_FIELDS.index("flags")


def newest_version_id(as_of: datetime) -> Any:
    """Per ``machine`` row (correlated): the id of its newest version valid at ``as_of``.

    One index seek per machine on ``(machine_pk, valid_from)``, instead of ranking every
    version of every machine.
    """
    return (
        select(VERSION.c.id)
        .where(VERSION.c.machine_pk == MACHINE.c.id, VERSION.c.valid_from <= as_of)
        .order_by(VERSION.c.valid_from.desc(), VERSION.c.id.desc())
        .limit(1)
        .correlate(MACHINE)
        .scalar_subquery()
    )


def current_versions(
    conn: Connection, query: RegisterQuery, site_id: int | None
) -> list[tuple[Any, ...]]:
    """Each machine's newest version valid at ``as_of`` that passes the filters, as tuples
    in :data:`_VERSION_FIELDS` order."""
    newest = select(newest_version_id(query.as_of)).select_from(MACHINE)
    conditions: list[ColumnElement[bool]] = [VERSION.c.id.in_(newest)]
    if site_id is not None:
        conditions.append(VERSION.c.site_id == site_id)
    if query.state is not None:
        conditions.append(VERSION.c.lifecycle_state.in_([query.state.name, query.state.value]))
    if query.model is not None:
        conditions.append(VERSION.c.model == query.model)
    stmt = select(*(_plain_column(VERSION.c[name]) for name in _VERSION_FIELDS)).where(*conditions)
    return list(conn.execute(stmt).tuples().all())


def last_polls(conn: Connection, as_of: datetime) -> dict[int, datetime | None]:
    """Per machine: the time of its newest poll kept in the history at or before ``as_of``."""
    return _polls_from(conn.execute(_last_check_query(as_of)).all())


def _last_check_query(as_of: datetime) -> Any:
    """One backward index seek per machine on ``(machine_pk, observed_at)``: the cost does
    not grow with the amount of history kept."""
    newest = (
        select(HISTORY.c.id)
        .where(
            HISTORY.c.machine_pk == MACHINE.c.id,
            HISTORY.c.observed_at <= as_of,
        )
        .order_by(HISTORY.c.observed_at.desc(), HISTORY.c.id.desc())
        .limit(1)
        .correlate(MACHINE)
        .scalar_subquery()
    )
    return select(HISTORY.c.machine_pk, _plain_column(HISTORY.c.observed_at)).where(
        HISTORY.c.id.in_(select(newest).select_from(MACHINE))
    )


def _polls_from(rows: Iterable[Any]) -> dict[int, datetime | None]:
    return {pk: _utc(at) for pk, at in rows}


@dataclass(frozen=True)
class Judgement:
    """The compliance interval covering a moment: what was judged, and on what."""

    status: str
    started_at: datetime
    checked_at: datetime | None
    pool_set_version: int | None
    worker: str | None
    pools: list[Any] | None  # None: recorded before read-backs were kept

    @property
    def pools_text(self) -> str | None:
        return None if self.pools is None else pools_text(self.pools)

    def last_check(self, as_of: datetime, polled: datetime | None) -> datetime:
        """The newest poll of this judgement at or before ``as_of``: its newest confirming
        poll if that is not later, else the newest history poll since it started (polls
        inside an interval's span are the polls that made it)."""
        if self.checked_at is not None and self.checked_at <= as_of:
            return self.checked_at
        if polled is not None and self.started_at <= polled <= as_of:
            return polled
        return self.started_at


def judgements_as_of(conn: Connection, as_of: datetime) -> dict[int, Judgement]:
    """Per machine: the compliance interval covering ``as_of``."""
    stmt = select(
        INTERVAL.c.machine_pk,
        INTERVAL.c.status,
        _plain_column(INTERVAL.c.started_at),
        _plain_column(INTERVAL.c.checked_at),
        INTERVAL.c.pool_set_version,
        INTERVAL.c.worker,
        _plain_column(INTERVAL.c.pools),
    ).where(
        INTERVAL.c.started_at <= as_of,
        or_(INTERVAL.c.ended_at.is_(None), INTERVAL.c.ended_at > as_of),
    )
    out: dict[int, Judgement] = {}
    for pk, status, started, checked, version, worker, pools in conn.execute(stmt):
        start = _utc(started)
        assert start is not None
        out[pk] = Judgement(
            status,
            start,
            _utc(checked),
            version,
            worker,
            None if pools is None else _json_list(pools),
        )
    return out


def measured_averages(
    conn: Connection, period: tuple[datetime, datetime] | None, resolution_s: int
) -> dict[int, Averages]:
    """Per machine over ``[start, end)``: average hashrate and power, operating hours."""
    totals: dict[int, list[Any]] = {}
    for stmt in _period_sum_queries(period) if period else []:
        _add_sums(totals, conn.execute(stmt))
    return _averages_from(([pk, *sums] for pk, sums in totals.items()), resolution_s)


def _period_sum_queries(period: tuple[datetime, datetime]) -> list[Any]:
    """Per machine, sums over the period: whole weeks, days and hours from their sums
    (``observation_sum``), in one pass over the machines, and what is left of an hour at an
    edge from the raw polls."""
    pieces = history_rollup.split_period(*period)
    spans = [p for p in pieces if p.span is not None]
    queries = [_span_sums(spans)] if spans else []
    return queries + [_raw_sums(p) for p in pieces if p.span is None]


def _averages_from(rows: Iterable[Any], resolution_s: int) -> dict[int, Averages]:
    hours = resolution_s / 3600.0
    return {
        pk: (
            hr / hr_n if hr_n else None,
            pw / pw_n if pw_n else None,
            round((mining or 0) * hours, 2),
        )
        for pk, _polls, mining, hr, hr_n, pw, pw_n in rows
    }


_SPAN_SUMS = """
SELECT m.id, {sums}
FROM machine AS m
CROSS JOIN ({ranges}) AS r
JOIN observation_sum AS s
  ON s.machine_pk = m.id AND s.span_s = r.span_s AND s.start_s >= r.since
  AND s.start_s < r.until
GROUP BY m.id
"""
"""Machines outside (``CROSS JOIN`` fixes that order on SQLite), so each machine reads one
range of its own sums per piece: one pass over the machines for all the pieces."""


def _span_sums(pieces: list[history_rollup.Piece]) -> Any:
    ranges = " UNION ALL ".join(
        f"SELECT CAST(:span{i} AS BIGINT) AS span_s, CAST(:since{i} AS BIGINT) AS since, "
        f"CAST(:until{i} AS BIGINT) AS until"
        for i in range(len(pieces))
    )
    params: dict[str, int] = {}
    for i, piece in enumerate(pieces):
        assert piece.span is not None
        params[f"span{i}"] = piece.span
        params[f"since{i}"] = history_rollup.seconds(piece.since)
        params[f"until{i}"] = history_rollup.seconds(piece.until)
    sums = ", ".join(f"sum(s.{name})" for name in history_rollup.SUMS)
    sql = _SPAN_SUMS.format(sums=sums, ranges=ranges)
    return (
        text(sql)
        .bindparams(**params)
        .columns(SqlColumn("id", Integer), *(_SUMS_TMP.c[n].copy() for n in history_rollup.SUMS))
    )


def _raw_sums(piece: history_rollup.Piece) -> Any:
    """Per machine, sums over the raw polls of a piece (machines outside, grouped by
    ``machine.id``, so each reads one range of its own index entries)."""
    inside = and_(
        HISTORY.c.machine_pk == MACHINE.c.id,
        HISTORY.c.observed_at >= piece.since,
        HISTORY.c.observed_at < piece.until,
    )
    return (
        select(MACHINE.c.id, *history_rollup.sum_columns())
        .select_from(MACHINE)
        .join(HISTORY, inside)
        .group_by(MACHINE.c.id)
    )


def _add_sums(totals: dict[int, list[Any]], rows: Iterable[Any]) -> None:
    for pk, *values in rows:
        acc = totals.get(pk)
        if acc is None:
            totals[pk] = [v or 0 for v in values]
        else:
            for i, v in enumerate(values):
                acc[i] += v or 0


def approved_sets_as_of(session: Session, as_of: datetime) -> dict[int, PoolSetView]:
    """Per site: the newest pool set approved at or before ``as_of`` (later superseded or not)."""
    decided = (PoolSetStatus.APPROVED, PoolSetStatus.SUPERSEDED)
    stmt = (
        orm_select(PoolSet)
        .where(col(PoolSet.status).in_(decided), col(PoolSet.decided_at) <= as_of)
        .order_by(col(PoolSet.site_id), col(PoolSet.version))
    )
    out: dict[int, PoolSetView] = {}
    for ps in session.exec(stmt):
        out[ps.site_id] = PoolSetView(ps.version, ps.name, tuple(ps.urls), ps.account)
    return out


def _pool_set_versions(session: Session) -> dict[tuple[int, int], PoolSetView]:
    """Every decided pool set by (site, version): the set a judgement was made against."""
    decided = (PoolSetStatus.APPROVED, PoolSetStatus.SUPERSEDED)
    return {
        (ps.site_id, ps.version): PoolSetView(ps.version, ps.name, tuple(ps.urls), ps.account)
        for ps in session.exec(orm_select(PoolSet).where(col(PoolSet.status).in_(decided)))
    }


def pools_text(pools: list[Any]) -> str:
    """``url (user)`` per configured slot, in slot order."""
    parts = []
    for pool in pools:
        if not isinstance(pool, dict):
            continue
        url = str(pool.get("url") or "")
        user = str(pool.get("user") or "")
        parts.append(f"{url} ({user})" if user else url)
    return "; ".join(parts)


_DIGITS = re.compile(r"(\d+)")


@lru_cache(maxsize=65_536)
def _natural(text: str | None) -> tuple[Any, ...]:
    """``R2`` before ``R10`` (cached: a farm has few distinct containers, racks, slots)."""
    return tuple(int(p) if p.isdigit() else p for p in _DIGITS.split(text or ""))


_SITE, _CONTAINER, _RACK, _SHELF, _SLOT, _MACHINE_ID = (
    INDEX[k] for k in ("site", "container", "rack", "shelf", "slot", "machine_id")
)


def _location_key(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return (
        row[_SITE] or "",
        _natural(row[_CONTAINER]),
        _natural(row[_RACK]),
        _natural(row[_SHELF]),
        _natural(row[_SLOT]),
        row[_MACHINE_ID],
    )
