"""The machine register as it stood at a moment, rebuilt from history.

Each machine's row is its newest ``machine_version`` with ``valid_from <= as_of`` (never
today's row with an old date on it). Around it, everything else is read as of the same
moment: the configured pools and the time of the last pool check are the newest successful
poll at or before ``as_of`` (``observation_history``); the pool-compliance status is the
``compliance_interval`` covering ``as_of``; the approved pool set is the newest set of the
machine's site approved at or before ``as_of``. Measured averages cover ``period``:
hashrate and power average the reachable polls; operating hours are the polls that found the
machine mining times the history resolution (one poll is kept per bucket, so this is exact
to a bucket).

Not versioned (their current values are used): site names, owners and licence numbers, and
the site's worker-name template.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Table as SqlTable
from sqlalchemy import and_, case, func, or_, select, true
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session, col
from sqlmodel import select as orm_select

from controller.errors import NotFound
from controller.exports.table import Column, Table
from controller.models import (
    ComplianceInterval,
    LifecycleState,
    MachineVersion,
    ObservationHistory,
    PoolSet,
    PoolSetStatus,
    Site,
    SitePolicy,
)
from controller.worker_names import DEFAULT_TEMPLATE, render_worker

VERSION: SqlTable = MachineVersion.__table__  # type: ignore[attr-defined]
HISTORY: SqlTable = ObservationHistory.__table__  # type: ignore[attr-defined]
INTERVAL: SqlTable = ComplianceInterval.__table__  # type: ignore[attr-defined]

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


@dataclass(frozen=True)
class Averages:
    hashrate_ths: float | None
    power_w: float | None
    operating_hours: float


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
    # The history scans run on a second connection meanwhile (SQLite releases the GIL while
    # it works, so they use the other core); history before ``as_of`` is not rewritten.
    with ThreadPoolExecutor(max_workers=1) as pool:
        scans = pool.submit(_history_scans, conn.engine, query, resolution_s)
        versions = list(_versions_as_of(conn, query, site_id))
        statuses = statuses_as_of(conn, query.as_of) if versions else {}
        checks, averages = scans.result()
    pool_sets = approved_sets_as_of(session, query.as_of)
    templates = _templates(session)
    rows: list[tuple[Any, ...]] = []
    for v in versions:
        pk = v["machine_pk"]
        site = sites.get(v["site_id"]) if v["site_id"] is not None else None
        pool_set = pool_sets.get(v["site_id"]) if v["site_id"] is not None else None
        check = checks.get(pk)
        avg = averages.get(pk)
        worker = None
        if pool_set is not None:
            worker = render_worker(
                templates.get(v["site_id"], DEFAULT_TEMPLATE),
                {
                    "account": pool_set.account,
                    "machine_id": v["machine_id"],
                    "serial": v["label_serial"] or v["reported_serial"],
                    "site": site.name if site else None,
                    "container": v["container"],
                    "rack": v["rack"],
                    "shelf": v["shelf"],
                    "slot": v["slot"],
                },
            )
        flags = v["flags"] or []
        rows.append(
            (
                v["machine_id"],
                v["vendor"],
                v["model"],
                v["label_serial"],
                v["reported_serial"],
                SERIAL_MISMATCH_FLAG in flags,
                v["control_board_serial"],
                list(v["hashboard_serials"] or []),
                v["psu_serial"],
                v["mac"],
                v["firmware"],
                v["firmware_version"],
                site.owner_name if site else None,
                site.licence_number if site else None,
                site.name if site else None,
                v["container"],
                v["rack"],
                v["shelf"],
                v["slot"],
                v["current_ip"],
                v["nominal_ths"],
                v["nominal_w"],
                avg.hashrate_ths if avg else None,
                avg.power_w if avg else None,
                avg.operating_hours if avg else (0.0 if query.period else None),
                pool_set.text if pool_set else None,
                pools_text(check[1]) if check else None,
                worker,
                statuses.get(pk, "unknown"),
                check[0] if check else None,
                state_of(v["lifecycle_state"]).value,
                v["state_since"],
                v["commissioned_at"],
                v["decommissioned_at"],
                v["record_version"],
            )
        )
    rows.sort(key=_location_key)
    return Table(name="register", sheet="sheet.register", columns=COLUMNS, rows=rows, parts=PARTS)


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


def _history_scans(
    engine: Engine, query: RegisterQuery, resolution_s: int
) -> tuple[dict[int, tuple[datetime, list[Any]]], dict[int, Averages]]:
    with engine.connect() as conn:
        checks = last_checks(conn, query.as_of)
        averages = measured_averages(conn, query.period, resolution_s)
    return checks, averages


def _sites(session: Session) -> dict[int, Site]:
    return {s.id: s for s in session.exec(orm_select(Site)) if s.id is not None}


def site_named(sites: dict[int, Site], name: str) -> Site:
    for site in sites.values():
        if site.name == name:
            return site
    raise NotFound(f"no site named {name!r}")


def _templates(session: Session) -> dict[int, str]:
    return {p.site_id: p.worker_template for p in session.exec(orm_select(SitePolicy))}


def versions_as_of(conn: Connection, as_of: datetime) -> Any:
    """A subquery: the newest version of each machine valid at ``as_of``."""
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


def _versions_as_of(
    conn: Connection, query: RegisterQuery, site_id: int | None
) -> Iterable[dict[str, Any]]:
    current = versions_as_of(conn, query.as_of)
    conditions = [current.c.rn == 1]
    if site_id is not None:
        conditions.append(current.c.site_id == site_id)
    if query.state is not None:
        conditions.append(current.c.lifecycle_state.in_([query.state.name, query.state.value]))
    if query.model is not None:
        conditions.append(current.c.model == query.model)
    stmt = select(current).where(*conditions)
    for row in conn.execute(stmt).mappings():
        yield dict(row)


def last_checks(conn: Connection, as_of: datetime) -> dict[int, tuple[datetime, list[Any]]]:
    """Per machine: the time and pools of its newest successful poll at or before ``as_of``."""
    newest = (
        select(HISTORY.c.machine_pk, func.max(HISTORY.c.bucket).label("bucket"))
        .where(HISTORY.c.observed_at <= as_of, HISTORY.c.reachable == true())
        .group_by(HISTORY.c.machine_pk)
        .subquery("newest")
    )
    stmt = select(HISTORY.c.machine_pk, HISTORY.c.observed_at, HISTORY.c.pools).join(
        newest,
        and_(HISTORY.c.machine_pk == newest.c.machine_pk, HISTORY.c.bucket == newest.c.bucket),
    )
    return {pk: (at, pools or []) for pk, at, pools in conn.execute(stmt)}


def statuses_as_of(conn: Connection, as_of: datetime) -> dict[int, str]:
    """Per machine: the pool-compliance status whose interval covers ``as_of``."""
    stmt = select(INTERVAL.c.machine_pk, INTERVAL.c.status).where(
        INTERVAL.c.started_at <= as_of,
        or_(INTERVAL.c.ended_at.is_(None), INTERVAL.c.ended_at > as_of),
    )
    return {pk: status for pk, status in conn.execute(stmt)}


def measured_averages(
    conn: Connection, period: tuple[datetime, datetime] | None, resolution_s: int
) -> dict[int, Averages]:
    """Per machine over ``[start, end)``: average hashrate and power, operating hours."""
    if period is None:
        return {}
    start, end = period
    up = HISTORY.c.reachable == true()
    mining = case((and_(up, HISTORY.c.is_mining == true()), 1), else_=0)
    stmt = (
        select(
            HISTORY.c.machine_pk,
            func.avg(case((up, HISTORY.c.hashrate_ths), else_=None)),
            func.avg(case((up, HISTORY.c.power_w), else_=None)),
            func.sum(mining),
        )
        .where(HISTORY.c.observed_at >= start, HISTORY.c.observed_at < end)
        .group_by(HISTORY.c.machine_pk)
    )
    hours = resolution_s / 3600.0
    return {
        pk: Averages(
            hashrate_ths=float(hr) if hr is not None else None,
            power_w=float(pw) if pw is not None else None,
            operating_hours=round(float(n or 0) * hours, 2),
        )
        for pk, hr, pw, n in conn.execute(stmt)
    }


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


def _natural(text: str | None) -> tuple[Any, ...]:
    """``R2`` before ``R10``."""
    return tuple(int(p) if p.isdigit() else p for p in _DIGITS.split(text or ""))


def _location_key(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return (
        row[INDEX["site"]] or "",
        _natural(row[INDEX["container"]]),
        _natural(row[INDEX["rack"]]),
        _natural(row[INDEX["shelf"]]),
        _natural(row[INDEX["slot"]]),
        row[INDEX["machine_id"]],
    )
