"""Applying an agent's report batch: idempotent, confined to its segments, one transaction.

A batch is claimed first: its :class:`IngestedBatch` row is the transaction's first write,
so a concurrent delivery of the same batch waits for it and then finds it (PostgreSQL's
unique index; on SQLite the process's writers also queue on a lock rather than on SQLite's
sleeping busy handler). A batch id seen before returns the stored acknowledgement with
``duplicate=true`` and adds nothing. Items outside the agent's segments are refused,
listed in the ack and logged (one event and one audit entry per batch). Identities go
through :func:`controller.reconcile.reconcile`; every machine change it decides is audited
with the agent as actor. Observations are most of the traffic (10⁴–10⁵ machines every
30–60 s), so they take one machine lookup per batch and bulk statements: the latest row per
machine (upserted, only ever forward in time, so a replayed old batch cannot overwrite a
newer poll), the *first* observation of each ``history_resolution_s`` bucket, and
``machine.last_seen`` (reachable polls only, capped at the time of reception).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, Protocol

from pydantic import TypeAdapter
from sqlalchemy import (
    ColumnElement,
    String,
    Table,
    bindparam,
    case,
    false,
    func,
    insert,
    or_,
    select,
    type_coerce,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from contract import BatchAck, Event, IdentityRecord, Observation, PoolReading, ReportBatch
from controller import audit, history_rollup, machine_versions
from controller.actors import Actor
from controller.errors import Conflict
from controller.evidence import track_compliance
from controller.models import (
    LifecycleState,
    UTCDateTime,
    utcnow,
)
from controller.reconcile import (
    EXPECTED_ONLINE,
    Alert,
    CreateMachine,
    Decision,
    Finding,
    RegisterView,
    UpdateMachine,
    check_observation,
    find_missing,
    normalize_mac,
    normalize_serial,
    observation_may_matter,
    reconcile,
)
from controller.report_bounds import TimeWindow, clock_skew_s, damaged_key, refuse_fact_times
from controller.settings import Settings
from controller.tables import (
    AGENT,
    BATCH,
    EVENT,
    HISTORY,
    LATEST,
    MACHINE,
    SEGMENT,
    SITE,
    STATE_CHANGE,
)

log = logging.getLogger(__name__)


REFUSED_EVENT = "report_refused"
CROSS_SITE_EVENT = "cross_site_report"  # an alert (critical): another site's machine named
OUTSIDE, OUT_OF_TIME, DAMAGED, OTHER_SITE = "outside_segments", "time", "damaged_key", "other_site"
MAX_LOGGED_ITEMS = 200  # refused items kept in one event/audit entry


class ReportingAgent(Protocol):
    """Who sent the batch (``controller.api.deps.Principal`` for an agent satisfies this)."""

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def source(self) -> str: ...

    @property
    def agent_id(self) -> str | None: ...

    @property
    def site_id(self) -> int | None: ...


class _Segments:
    """Membership test for the agent's CIDRs: one set lookup per distinct prefix length."""

    def __init__(self, cidrs: Iterable[str]) -> None:
        self._nets: dict[tuple[int, int], set[int]] = {}
        for cidr in cidrs:
            network = ipaddress.ip_network(cidr, strict=False)
            key = (network.version, int(network.netmask))
            self._nets.setdefault(key, set()).add(int(network.network_address))

    def __contains__(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        value = int(address)
        version = address.version
        return any(v == version and value & mask in nets for (v, mask), nets in self._nets.items())


# --- the service -------------------------------------------------------------------------------


def ingest_batch(
    session: Session,
    agent: ReportingAgent,
    batch: ReportBatch,
    settings: Settings,
    *,
    now: datetime | None = None,
) -> BatchAck:
    """Apply ``batch`` from ``agent`` in one transaction and commit; return the acknowledgement."""
    if agent.agent_id is None:
        raise ValueError("ingest_batch needs an agent principal")
    with _writer_slot(session):
        return _ingest(session, agent, agent.agent_id, batch, settings, now or utcnow())


_SQLITE_WRITERS: dict[str, threading.Lock] = {}
_SQLITE_WRITERS_GUARD = threading.Lock()


@contextmanager
def _writer_slot(session: Session) -> Iterator[None]:
    """On SQLite, queue this process's batch writers on a lock.

    SQLite admits one writer at a time and makes the others poll with growing sleeps
    (up to 100 ms each), which wastes most of the time under concurrent deliveries; a
    lock hands over at once. PostgreSQL needs nothing: its row locks queue writers.
    """
    bind = session.get_bind()
    if bind.dialect.name != "sqlite":
        yield
        return
    key = str(bind.engine.url)
    with _SQLITE_WRITERS_GUARD:
        lock = _SQLITE_WRITERS.setdefault(key, threading.Lock())
    with lock:
        yield


def _ingest(
    session: Session,
    agent: ReportingAgent,
    agent_id: str,
    batch: ReportBatch,
    settings: Settings,
    now: datetime,
) -> BatchAck:
    batch_id = str(batch.batch_id)
    conn = session.connection()
    stored = _stored_ack(conn, batch_id, agent_id)
    if stored is not None:
        session.rollback()
        return stored
    try:
        # The first write of the transaction: claims the id (and SQLite's write lock).
        conn.execute(
            insert(BATCH).values(
                batch_id=batch_id,
                agent_id=agent_id,
                sequence=batch.sequence,
                received_at=now,
                ack={},
            )
        )
    except IntegrityError:
        session.rollback()  # a concurrent delivery of the same batch won the race
        stored = _stored_ack(session.connection(), batch_id, agent_id)
        session.rollback()
        if stored is None:  # pragma: no cover - the row that conflicted must exist
            raise
        return stored

    segments = _Segments(
        conn.execute(select(SEGMENT.c.cidr).where(SEGMENT.c.agent_id == agent_id)).scalars()
    )
    window = TimeWindow.around(now, settings)
    refused: list[str] = []
    cleaned: list[str] = []
    logged: list[dict[str, Any]] = []

    def refuse(kind: str, index: int, ip: object, why: str, reason: str, **extra: Any) -> None:
        refused.append(f"{kind} {index} ({ip}): {reason}")
        logged.append({"item": kind, "index": index, "ip": str(ip), "why": why, **extra})

    def admit(kind: str, index: int, item: IdentityRecord | Observation | Event) -> bool:
        ip = item.ip
        if ip is None:
            ip_text = "-"
        elif ip not in segments:
            refuse(kind, index, ip, OUTSIDE, "outside this agent's segments")
            return False
        else:
            ip_text = str(ip)
        at = item.at if isinstance(item, Event) else item.observed_at
        late = window.refuse(at, "at" if isinstance(item, Event) else "observed_at")
        if late is None and isinstance(item, Event):
            late = refuse_fact_times(window, item.data)
        if late is not None:
            refuse(kind, index, ip_text, OUT_OF_TIME, late, at=at.isoformat())
            return False
        damaged = None if isinstance(item, Event) else damaged_key(item.cleaned)
        if damaged is not None:
            reason = f"{damaged}: a damaged identity key cannot name a machine"
            refuse(kind, index, ip_text, DAMAGED, reason)
            return False
        if item.cleaned:  # listed in the ack unless the item is refused later
            cleaned.append(
                f"{kind} {index} ({ip_text}): stored cleaned: " + "; ".join(item.cleaned)
            )
        return True

    site_id = agent.site_id
    candidates = [(i, r) for i, r in enumerate(batch.identities) if admit("identity", i, r)]
    foreign = _foreign_holders(conn, [r for _, r in candidates], site_id)
    conflicts: list[_Conflict] = []
    identities: list[IdentityRecord] = []
    placeable = 0
    for i, record in candidates:
        holder = _holder_of(foreign, record.serial, record.mac)
        if holder is not None:
            conflicts.append(
                _Conflict("identity", i, str(record.ip), record.mac, record.serial, holder)
            )
            refuse(
                "identity",
                i,
                record.ip,
                OTHER_SITE,
                _conflict_reason(holder),
                machine=holder.machine_id,
            )
            continue
        identities.append(record)  # unplaceable ones too: reconcile raises the alert
        if normalize_serial(record.serial) or normalize_mac(record.mac):
            placeable += 1
        else:
            refused.append(f"identity {i} ({record.ip}): neither a readable serial nor a MAC")
    observations = [
        (i, obs) for i, obs in enumerate(batch.observations) if admit("observation", i, obs)
    ]
    admitted = [(i, event) for i, event in enumerate(batch.events) if admit("event", i, event)]
    events = _confine_events(conn, admitted, site_id, refuse, conflicts)

    if identities:
        _apply_identities(session, conn, agent, identities, settings, now)
    resolved: list[tuple[int, Observation]] = []
    applied_observations = _apply_observations(
        session, conn, agent, observations, settings, now, refused, resolved, refuse, conflicts
    )
    _apply_agent_events(conn, agent, events, now)
    track_compliance(conn, agent, resolved, events, settings, now)
    if logged:
        _log_refused(session, conn, agent, batch_id, logged, now)
    if conflicts:
        _raise_conflicts(conn, agent, batch_id, conflicts, now)
    skew = clock_skew_s(batch.sent_at, now)
    seen: dict[str, Any] = {"last_seen_at": now, "last_address": agent.source or None}
    if skew is not None:
        seen.update(clock_skew_s=skew, clock_checked_at=now)
    conn.execute(update(AGENT).where(AGENT.c.id == agent_id).values(**seen))
    ack = BatchAck(
        batch_id=batch.batch_id,
        duplicate=False,
        observations=applied_observations,
        identities=placeable,
        events=len(events),
        refused=refused,
        cleaned=[c for c in cleaned if not any(r.startswith(c.split(")", 1)[0]) for r in refused)],
        received_at=now,
        clock_skew_s=skew,
    )
    conn.execute(
        update(BATCH).where(BATCH.c.batch_id == batch_id).values(ack=ack.model_dump(mode="json"))
    )
    session.commit()
    return ack


def _stored_ack(conn: Connection, batch_id: str, agent_id: str) -> BatchAck | None:
    row = conn.execute(
        select(BATCH.c.agent_id, BATCH.c.ack).where(BATCH.c.batch_id == batch_id)
    ).first()
    if row is None:
        return None
    if row.agent_id != agent_id:
        raise Conflict(f"batch_id {batch_id} was already delivered by another agent")
    ack = BatchAck.model_validate(row.ack)
    return ack.model_copy(update={"duplicate": True})


_WHY = {
    OUTSIDE: "outside the agent's segments",
    OUT_OF_TIME: "dated outside the accepted window",
    DAMAGED: "identity key damaged",
    OTHER_SITE: "naming a machine of another site",
}


def _log_refused(
    session: Session,
    conn: Connection,
    agent: ReportingAgent,
    batch_id: str,
    items: list[dict[str, Any]],
    now: datetime,
) -> None:
    """One event and one audit entry per batch with items refused for what they claimed."""
    kept = items[:MAX_LOGGED_ITEMS]
    counts: dict[str, int] = {}
    for item in items:
        counts[item["why"]] = counts.get(item["why"], 0) + 1
    reasons = ", ".join(_WHY[why] for why in counts)
    detail = f"{len(items)} item(s) refused: " + ", ".join(
        f"{n} {_WHY[why]}" for why, n in counts.items()
    )
    conn.execute(
        insert(EVENT).values(
            at=now,
            kind=REFUSED_EVENT,
            severity="warning",
            machine_pk=None,
            agent_id=agent.agent_id,
            ip=items[0]["ip"],
            detail=detail,
            data={"batch_id": batch_id, "count": len(items), "by_reason": counts, "items": kept},
        )
    )
    audit.record(
        session,
        actor=agent.name,
        actor_kind=agent.kind,
        action="ingest.refuse",
        entity="agent",
        entity_id=agent.agent_id or "",
        after={"batch_id": batch_id, "count": len(items), "by_reason": counts, "items": kept},
        source=agent.source,
        reason=reasons,
    )
    log.warning("agent %s: %s (batch %s)", agent.agent_id, detail, batch_id)


# --- site confinement --------------------------------------------------------------------------


class _Holder(NamedTuple):
    """A machine of another site that an item's serial or MAC names."""

    pk: int
    machine_id: str
    site_id: int
    serials: frozenset[str]
    mac: str | None


class _Conflict(NamedTuple):
    item: str
    position: int
    ip: str
    mac: str | None
    serial: str | None
    holder: _Holder


def _conflict_reason(holder: _Holder) -> str:
    return (
        f"names machine {holder.machine_id} of another site (site {holder.site_id}); "
        "not applied (to move a machine between sites, decommission it at the old one)"
    )


def _own_site(site_id: int | None) -> ColumnElement[bool]:
    """Machines an agent of ``site_id`` may touch: its site's, and those with no site yet."""
    if site_id is None:
        return MACHINE.c.site_id.is_(None)
    return or_(MACHINE.c.site_id.is_(None), MACHINE.c.site_id == site_id)


def _foreign_holders(
    conn: Connection, records: Sequence[IdentityRecord | Observation], site_id: int | None
) -> list[_Holder]:
    """Machines in service at *other* sites sharing a serial or MAC with ``records``."""
    macs = {normalize_mac(r.mac) for r in records}
    serials = {normalize_serial(r.serial) for r in records}
    if not any(macs) and not any(serials):
        return []
    rows = conn.execute(
        select(
            MACHINE.c.id,
            MACHINE.c.machine_id,
            MACHINE.c.site_id,
            MACHINE.c.reported_serial,
            MACHINE.c.label_serial,
            MACHINE.c.mac,
            type_coerce(MACHINE.c.lifecycle_state, String),
        ).where(
            or_(
                _any_of(MACHINE.c.mac, macs),
                _any_of(MACHINE.c.reported_serial, serials),
                _any_of(MACHINE.c.label_serial, serials),
            ),
            ~_own_site(site_id),
        )
    ).all()
    return [
        _Holder(pk, mid, site, frozenset(s for s in (reported, label) if s), mac)
        for pk, mid, site, reported, label, mac, state in rows
        if _raw_state(state) != LifecycleState.DECOMMISSIONED
    ]


def _holder_of(holders: Sequence[_Holder], serial: str | None, mac: str | None) -> _Holder | None:
    serial, mac = normalize_serial(serial), normalize_mac(mac)
    for holder in holders:
        if (serial and serial in holder.serials) or (mac and mac == holder.mac):
            return holder
    return None


def _confine_events(
    conn: Connection,
    events: list[tuple[int, Event]],
    site_id: int | None,
    refuse: Callable[..., None],
    conflicts: list[_Conflict],
) -> list[Event]:
    """Events may only name (by ``data.machine_id``) machines the agent may touch."""
    named = {e.data.get("machine_id") for _, e in events}
    ids = sorted(v for v in named if isinstance(v, str) and v)
    foreign: dict[str, _Holder] = {}
    if ids:
        for pk, mid, site in conn.execute(
            select(MACHINE.c.id, MACHINE.c.machine_id, MACHINE.c.site_id).where(
                MACHINE.c.machine_id.in_(ids), ~_own_site(site_id)
            )
        ):
            foreign[mid] = _Holder(pk, mid, site, frozenset(), None)
    kept: list[Event] = []
    for index, event in events:
        holder = foreign.get(str(event.data.get("machine_id")))
        if holder is not None:
            ip = str(event.ip) if event.ip else None
            conflicts.append(_Conflict("event", index, ip or "-", None, None, holder))
            refuse(
                "event",
                index,
                ip or "-",
                OTHER_SITE,
                _conflict_reason(holder),
                machine=holder.machine_id,
            )
            continue
        kept.append(event)
    return kept


def _raise_conflicts(
    conn: Connection,
    agent: ReportingAgent,
    batch_id: str,
    conflicts: list[_Conflict],
    now: datetime,
) -> None:
    """One alert per machine of another site named by this agent, until someone resolves it."""
    by_machine: dict[int, list[_Conflict]] = {}
    for conflict in conflicts:
        by_machine.setdefault(conflict.holder.pk, []).append(conflict)
    open_ = set(
        conn.execute(
            select(EVENT.c.machine_pk).where(
                EVENT.c.kind == CROSS_SITE_EVENT,
                EVENT.c.agent_id == agent.agent_id,
                EVENT.c.resolved_at.is_(None),
                EVENT.c.machine_pk.in_(sorted(by_machine)),
            )
        ).scalars()
    )
    wanted = sorted({c.holder.site_id for c in conflicts} | {agent.site_id or 0})
    sites = {
        row.id: row.name
        for row in conn.execute(select(SITE.c.id, SITE.c.name).where(SITE.c.id.in_(wanted)))
    }
    rows = []
    for pk, found in by_machine.items():
        if pk in open_:
            continue
        holder = found[0].holder
        first = found[0]
        if first.mac:
            named = f"MAC {first.mac}"
        elif first.serial:
            named = f"serial {first.serial}"
        else:
            named = "an event"
        detail = (
            f"agent {agent.name} of site {sites.get(agent.site_id or 0, agent.site_id)} reported "
            f"{named} of machine {holder.machine_id} of site "
            f"{sites.get(holder.site_id, holder.site_id)}; refused (a MAC or serial seen at two "
            "sites: a cloned identity, a moved machine, or an agent writing where it should not)"
        )
        rows.append(
            {
                "at": now,
                "kind": CROSS_SITE_EVENT,
                "severity": "critical",
                "machine_pk": pk,
                "agent_id": agent.agent_id,
                "ip": first.ip if first.ip != "-" else None,
                "detail": detail[:4096],
                "data": {
                    "origin": "controller",
                    "batch_id": batch_id,
                    "machine_id": holder.machine_id,
                    "machine_site_id": holder.site_id,
                    "agent_site_id": agent.site_id,
                    "items": [
                        {"item": c.item, "index": c.position, "ip": c.ip, "mac": c.mac}
                        | ({"serial": c.serial} if c.serial else {})
                        for c in found[:MAX_LOGGED_ITEMS]
                    ],
                },
                "resolved_at": None,
            }
        )
    if rows:
        conn.execute(insert(EVENT), rows)
    log.warning(
        "agent %s: %d item(s) named machines of another site (batch %s)",
        agent.agent_id,
        len(conflicts),
        batch_id,
    )


# --- register views ----------------------------------------------------------------------------

_VIEW_COLUMNS = (
    MACHINE.c.id,
    MACHINE.c.machine_id,
    MACHINE.c.lifecycle_state,
    MACHINE.c.reported_serial,
    MACHINE.c.label_serial,
    MACHINE.c.mac,
    MACHINE.c.control_board_serial,
    MACHINE.c.hashboard_serials,
    MACHINE.c.psu_serial,
    MACHINE.c.vendor,
    MACHINE.c.model,
    MACHINE.c.firmware,
    MACHINE.c.firmware_version,
    MACHINE.c.hostname,
    MACHINE.c.current_ip,
    MACHINE.c.site_id,
    MACHINE.c.agent_id,
    MACHINE.c.last_seen,
    MACHINE.c.serial_unconfirmed,
    MACHINE.c.flags,
)


def load_views(conn: Connection, condition: ColumnElement[bool]) -> list[RegisterView]:
    """Register entries matching ``condition``, as reconciliation sees them (one query)."""
    rows = conn.execute(select(*_VIEW_COLUMNS).where(condition)).all()
    return [
        RegisterView(
            machine_pk=row.id,
            machine_id=row.machine_id,
            lifecycle_state=LifecycleState(row.lifecycle_state),
            reported_serial=row.reported_serial,
            label_serial=row.label_serial,
            mac=row.mac,
            control_board_serial=row.control_board_serial,
            hashboard_serials=tuple(row.hashboard_serials or ()),
            psu_serial=row.psu_serial,
            vendor=row.vendor,
            model=row.model,
            firmware=row.firmware,
            firmware_version=row.firmware_version,
            hostname=row.hostname,
            current_ip=row.current_ip,
            site_id=row.site_id,
            agent_id=row.agent_id,
            last_seen=row.last_seen,
            serial_unconfirmed=bool(row.serial_unconfirmed),
            flags=frozenset(row.flags or ()),
        )
        for row in rows
    ]


def _any_of(column: Any, values: Iterable[str | None]) -> ColumnElement[bool]:
    wanted = sorted({v for v in values if v})
    return column.in_(wanted) if wanted else false()


# --- identities --------------------------------------------------------------------------------


def _apply_identities(
    session: Session,
    conn: Connection,
    agent: ReportingAgent,
    identities: Sequence[IdentityRecord],
    settings: Settings,
    now: datetime,
) -> None:
    """Reconcile identities against every machine sharing a serial, MAC or IP with them."""
    macs: set[str | None] = set()
    serials: set[str | None] = set()
    for record in identities:
        # Both the normal form and the raw spelling, in case older rows were stored raw.
        macs.update((normalize_mac(record.mac), record.mac))
        serials.update((normalize_serial(record.serial), record.serial))
    ips = {str(record.ip) for record in identities}
    # Only machines this agent may touch: another site's machine with one of these serials or
    # MACs has refused the record already (``_foreign_holders``), and its addresses are
    # another network's (sites reuse private ranges).
    condition = or_(
        _any_of(MACHINE.c.mac, macs),
        _any_of(MACHINE.c.reported_serial, serials),
        _any_of(MACHINE.c.label_serial, serials),
        _any_of(MACHINE.c.current_ip, ips),
    )
    views = load_views(conn, condition & _own_site(agent.site_id))
    decisions = reconcile(
        identities,
        views,
        received_at=now,
        site_id=agent.site_id,
        agent_id=agent.agent_id,
        live_window=timedelta(minutes=settings.missing_after_minutes),
    )
    apply_decisions(session, conn, agent, decisions, now)


def apply_decisions(
    session: Session,
    conn: Connection,
    actor: Actor,
    decisions: Sequence[Decision],
    now: datetime,
) -> None:
    """Write reconciliation decisions: machines, lifecycle history, events and audit entries."""
    agent_id: str | None = getattr(actor, "agent_id", None)
    events: list[dict[str, Any]] = []
    creates = [d for d in decisions if isinstance(d, CreateMachine)]
    if creates:
        _insert_machines(session, conn, actor, creates, now, events, agent_id)
    seen_only: list[dict[str, Any]] = []
    for decision in decisions:
        if isinstance(decision, UpdateMachine):
            _update_machine(session, conn, actor, decision, now, events, agent_id, seen_only)
        elif isinstance(decision, Alert):
            events.append(_event_row(decision.finding, None, agent_id, now))
    changed = [d.machine_pk for d in decisions if isinstance(d, UpdateMachine) and d.after]
    if changed:  # the register's history: one version per record_version bump
        machine_versions.snapshot(conn, changed)
    if seen_only:
        _touch_last_seen(conn, seen_only)
    if events:
        conn.execute(insert(EVENT), events)


def _insert_machines(
    session: Session,
    conn: Connection,
    actor: Actor,
    creates: Sequence[CreateMachine],
    now: datetime,
    events: list[dict[str, Any]],
    agent_id: str | None,
) -> None:
    rows = [
        {
            **{k: v for k, v in d.fields.items()},
            "state_since": now,
            "record_version": 1,
            "updated_at": now,
        }
        for d in creates
    ]
    result = conn.execute(
        insert(MACHINE).returning(MACHINE.c.id, MACHINE.c.machine_id, sort_by_parameter_order=True),
        rows,
    )
    pks = {row.machine_id: row.id for row in result}
    machine_versions.snapshot(conn, pks.values())
    conn.execute(
        insert(STATE_CHANGE),
        [
            {
                "machine_pk": pks[d.machine_id],
                "from_state": None,
                "to_state": LifecycleState.DISCOVERED.value,
                "at": now,
                "actor": actor.name,
                "reason": "discovered from an agent's identity report",
            }
            for d in creates
        ],
    )
    for d in creates:
        pk = pks[d.machine_id]
        events.extend(_event_row(f, pk, agent_id, now) for f in d.findings)
        audit.record(
            session,
            actor=actor.name,
            actor_kind=actor.kind,
            action="machine.discover",
            entity="machine",
            entity_id=d.machine_id,
            after=dict(d.fields),
            source=actor.source,
            reason=_reason(d.findings),
        )


def _update_machine(
    session: Session,
    conn: Connection,
    actor: Actor,
    d: UpdateMachine,
    now: datetime,
    events: list[dict[str, Any]],
    agent_id: str | None,
    seen_only: list[dict[str, Any]],
) -> None:
    if d.after:
        values: dict[str, Any] = dict(d.after)
        values.update(record_version=MACHINE.c.record_version + 1, updated_at=now)
        if d.last_seen is not None:
            values["last_seen"] = d.last_seen
        conn.execute(update(MACHINE).where(MACHINE.c.id == d.machine_pk).values(**values))
        audit.record(
            session,
            actor=actor.name,
            actor_kind=actor.kind,
            action="machine.reconcile",
            entity="machine",
            entity_id=d.machine_id,
            before=dict(d.before),
            after=dict(d.after),
            source=actor.source,
            reason=_reason(d.findings) or "identity report",
        )
    elif d.last_seen is not None:
        seen_only.append({"pk": d.machine_pk, "seen": d.last_seen})
    if d.resolves:
        conn.execute(
            update(EVENT)
            .where(
                EVENT.c.machine_pk == d.machine_pk,
                EVENT.c.kind.in_(sorted(k.value for k in d.resolves)),
                EVENT.c.resolved_at.is_(None),
            )
            .values(resolved_at=now)
        )
    events.extend(_event_row(f, d.machine_pk, agent_id, now) for f in d.findings)


def _reason(findings: Iterable[Finding]) -> str:
    return ", ".join(dict.fromkeys(f.kind.value for f in findings))


def _event_row(
    finding: Finding, machine_pk: int | None, agent_id: str | None, now: datetime
) -> dict[str, Any]:
    return {
        "at": now,
        "kind": finding.kind.value,
        "severity": finding.severity.value,
        "machine_pk": machine_pk,
        "agent_id": agent_id,
        "ip": finding.ip,
        "detail": finding.detail[:4096],
        "data": {"origin": "controller", **finding.data},
        "resolved_at": None,
    }


_LAST_SEEN = bindparam("seen", type_=UTCDateTime())


def _touch_last_seen(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """``last_seen`` only moves forward (executemany, one statement)."""
    conn.execute(
        update(MACHINE)
        .where(MACHINE.c.id == bindparam("pk"))
        .where(or_(MACHINE.c.last_seen.is_(None), MACHINE.c.last_seen < _LAST_SEEN))
        .values(last_seen=_LAST_SEEN),
        rows,
    )


# --- observations ------------------------------------------------------------------------------


class _Known(NamedTuple):
    """A machine as the observation path sees it (plain values: this runs for every batch)."""

    pk: int
    machine_id: str
    state: LifecycleState
    mac: str | None
    ip: str | None
    last_seen: datetime | None
    flags: frozenset[str]
    latest_at: datetime | None
    site_id: int | None

    def view(self) -> RegisterView:
        return RegisterView(
            machine_pk=self.pk,
            machine_id=self.machine_id,
            lifecycle_state=self.state,
            mac=self.mac,
            current_ip=self.ip,
            last_seen=self.last_seen,
            flags=self.flags,
        )


# Raw column values (no per-row type processing): 500 rows a batch make it count.
_KNOWN_COLUMNS = (
    MACHINE.c.id,
    MACHINE.c.machine_id,
    type_coerce(MACHINE.c.lifecycle_state, String),
    MACHINE.c.mac,
    MACHINE.c.current_ip,
    type_coerce(MACHINE.c.last_seen, String),
    type_coerce(MACHINE.c.flags, String),
    type_coerce(LATEST.c.observed_at, String),
    MACHINE.c.site_id,
)
_NO_FLAGS: frozenset[str] = frozenset()


def _raw_time(value: Any) -> datetime | None:
    """A UTC column read raw: SQLite gives ISO text, PostgreSQL a datetime."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    stamp: datetime = value
    return stamp.replace(tzinfo=UTC) if stamp.tzinfo is None else stamp.astimezone(UTC)


def _raw_flags(value: Any) -> frozenset[str]:
    if not value or value == "[]":
        return _NO_FLAGS
    return frozenset(json.loads(value) if isinstance(value, str) else value)


_STATES = {key: state for state in LifecycleState for key in (state.name, state.value)}


def _raw_state(value: Any) -> LifecycleState:
    """The enum column stores member names (``ACTIVE``); values are accepted too."""
    return _STATES[str(value)]


def _load_known(conn: Connection, condition: ColumnElement[bool]) -> list[_Known]:
    joined = MACHINE.outerjoin(LATEST, LATEST.c.machine_pk == MACHINE.c.id)
    cursor = conn.execute(select(*_KNOWN_COLUMNS).select_from(joined).where(condition))
    return [
        _Known(
            pk,
            machine_id,
            _raw_state(state),
            mac,
            ip,
            _raw_time(last_seen),
            _raw_flags(flags),
            _raw_time(latest_at),
            site,
        )
        for pk, machine_id, state, mac, ip, last_seen, flags, latest_at, site in cursor.tuples()
    ]


def _index(known: Iterable[_Known], key: Callable[[_Known], str | None]) -> dict[str, _Known]:
    """By IP or MAC; where several share one, the in-service, most recently seen wins."""
    out: dict[str, _Known] = {}
    for entry in sorted(known, key=lambda e: _rank(e.state, e.last_seen)):
        value = key(entry)
        if value:
            out[value] = entry
    return out


def _apply_observations(
    session: Session,
    conn: Connection,
    agent: ReportingAgent,
    observations: Sequence[tuple[int, Observation]],
    settings: Settings,
    now: datetime,
    refused: list[str],
    resolved: list[tuple[int, Observation]] | None = None,
    refuse: Callable[..., None] | None = None,
    conflicts: list[_Conflict] | None = None,
) -> int:
    """Latest (upsert), history (first per bucket), ``last_seen``; returns how many applied.

    Each applied observation is appended to ``resolved`` with its machine's pk (for the
    compliance evidence). Machines are looked up among those the agent may touch (its
    site's); a MAC that names a machine of another site is refused through ``refuse`` and
    noted in ``conflicts``, never followed.

    Writes the database already has are skipped: the latest row when it is newer, the
    history row when the latest poll already falls in the same bucket (that poll's history
    row exists, by induction). Only machines whose flags or state could make a poll matter
    go through :func:`controller.reconcile.check_observation`.
    """
    if not observations:
        return 0
    prepared = [(index, obs, str(obs.ip), normalize_mac(obs.mac)) for index, obs in observations]
    ips = {ip for _, _, ip, _ in prepared}
    own = _own_site(agent.site_id)
    by_ip = _index(_load_known(conn, _any_of(MACHINE.c.current_ip, ips) & own), lambda k: k.ip)
    stray: set[str | None] = set()
    for _, _, ip, mac in prepared:
        entry = by_ip.get(ip)
        if mac and (entry is None or (entry.mac is not None and entry.mac != mac)):
            stray.add(mac)
    by_mac: dict[str, _Known] = {}
    foreign_mac: dict[str, _Known] = {}
    if stray:
        holders = _load_known(conn, _any_of(MACHINE.c.mac, stray))
        mine = [k for k in holders if k.site_id is None or k.site_id == agent.site_id]
        by_mac = _index(mine, lambda k: k.mac)
        foreign_mac = _index(
            (
                k
                for k in holders
                if k.site_id not in (None, agent.site_id)
                and k.state != LifecycleState.DECOMMISSIONED
            ),
            lambda k: k.mac,
        )

    resolution = settings.history_resolution_s
    latest: dict[int, tuple[Observation, str, _Known]] = {}
    history: dict[tuple[int, int], Observation] = {}
    seen: dict[int, datetime] = {}
    applied = 0
    for index, obs, ip, mac in prepared:
        found = by_ip.get(ip)
        if mac is not None and (found is None or (found.mac is not None and found.mac != mac)):
            found = by_mac.get(mac)  # the address changed hands: follow the MAC, not the IP
            other = foreign_mac.get(mac) if found is None else None
            if other is not None:
                assert other.site_id is not None
                holder = _Holder(other.pk, other.machine_id, other.site_id, frozenset(), other.mac)
                if conflicts is not None:
                    conflicts.append(_Conflict("observation", index, ip, mac, obs.serial, holder))
                reason = _conflict_reason(holder)
                if refuse is not None:
                    refuse("observation", index, ip, OTHER_SITE, reason, machine=other.machine_id)
                else:
                    refused.append(f"observation {index} ({ip}): {reason}")
                continue
        if found is None:
            refused.append(
                f"observation {index} ({ip}): no machine known at this address "
                "(report its identity first)"
            )
            continue
        applied += 1
        pk = found.pk
        if resolved is not None:
            resolved.append((pk, obs))
        at = obs.observed_at
        latest_at = found.latest_at
        if latest_at is None or at > latest_at:
            current = latest.get(pk)
            if current is None or at >= current[0].observed_at:
                latest[pk] = (obs, ip, found)
        bucket = int(at.timestamp()) // resolution
        if latest_at is None or bucket != int(latest_at.timestamp()) // resolution:
            first = history.get((pk, bucket))
            if first is None or at < first.observed_at:
                history[(pk, bucket)] = obs
        if obs.reachable:
            at = min(at, now)
            best = seen.get(pk) or found.last_seen
            if best is None or at > best:
                seen[pk] = at

    decisions: list[Decision] = []
    for obs, _, found in latest.values():
        if observation_may_matter(found.state, found.flags):
            decision = check_observation(found.view(), obs)
            if decision is not None:
                decisions.append(decision)
    if decisions:
        apply_decisions(session, conn, agent, decisions, now)

    pools: dict[int, str] = {}
    time = _sqlite_time if conn.dialect.name == "sqlite" else _same_time
    if latest:
        _upsert_latest(
            conn, [_latest_row(pk, obs, ip, pools, time) for pk, (obs, ip, _) in latest.items()]
        )
    if history:
        kept = _insert_history(
            conn, [_history_row(pk, b, obs, pools, time) for (pk, b), obs in history.items()]
        )
        history_rollup.add(conn, (_reading(pk, history[(pk, b)]) for pk, b in kept))
    if seen:
        # Mostly the poll just written as latest: copy its time in one statement.
        copied: list[int] = []
        rest: list[dict[str, Any]] = []
        for pk, at in seen.items():
            written = latest.get(pk)
            if written is not None and written[0].observed_at == at:
                copied.append(pk)
            else:
                rest.append({"pk": pk, "seen": at})
        if copied:
            _last_seen_from_latest(conn, copied, now)
        if rest:
            _touch_last_seen(conn, rest)
    return applied


def _last_seen_from_latest(conn: Connection, pks: list[int], now: datetime) -> None:
    """``machine.last_seen`` := the latest poll's time (capped at ``now``), one statement."""
    cap = bindparam("now", now, type_=UTCDateTime())
    polled = (
        select(case((LATEST.c.observed_at > cap, cap), else_=LATEST.c.observed_at))
        .where(LATEST.c.machine_pk == MACHINE.c.id)
        .scalar_subquery()
    )
    conn.execute(update(MACHINE).where(MACHINE.c.id.in_(pks)).values(last_seen=polled))


def _rank(state: LifecycleState, last_seen: datetime | None) -> tuple[bool, float]:
    """Sort key: in-service, then most recently seen, sorts last (and so wins)."""
    in_service = state != LifecycleState.DECOMMISSIONED
    return (in_service, last_seen.timestamp() if last_seen else float("-inf"))


_POOLS = TypeAdapter(list[PoolReading])


def _pools(obs: Observation, cache: dict[int, str]) -> str:
    """Pool readings as stored (JSON text, no None values), encoded once per observation."""
    hit = cache.get(id(obs))
    if hit is None:
        hit = _POOLS.dump_json(obs.pools, exclude_none=True).decode()
        cache[id(obs)] = hit
    return hit


def _sqlite_time(value: datetime) -> str:
    """A UTC timestamp as SQLAlchemy stores it on SQLite (``YYYY-MM-DD HH:MM:SS.ffffff``)."""
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


def _same_time(value: datetime) -> datetime:
    return value


_LATEST_COLUMNS = (
    "machine_pk",
    "observed_at",
    "reachable",
    "error",
    "is_mining",
    "hashrate_ths",
    "power_w",
    "temperature_c",
    "pools",
    "ip",
)
_HISTORY_COLUMNS = (
    "machine_pk",
    "bucket",
    "observed_at",
    "reachable",
    "error",
    "is_mining",
    "hashrate_ths",
    "power_w",
    "temperature_c",
    "pools",
)


def _latest_row(
    pk: int, obs: Observation, ip: str, pools: dict[int, str], time: Callable[[datetime], Any]
) -> tuple[Any, ...]:
    return (
        pk,
        time(obs.observed_at),
        obs.reachable,
        obs.error,
        obs.is_mining,
        obs.hashrate_ths,
        obs.power_w,
        obs.temperature_c,
        _pools(obs, pools),
        ip,
    )


def _history_row(
    pk: int, bucket: int, obs: Observation, pools: dict[int, str], time: Callable[[datetime], Any]
) -> tuple[Any, ...]:
    return (
        pk,
        bucket,
        time(obs.observed_at),
        obs.reachable,
        obs.error,
        obs.is_mining,
        obs.hashrate_ths,
        obs.power_w,
        obs.temperature_c,
        _pools(obs, pools),
    )


class _Bulk(NamedTuple):
    """A compiled INSERT … ON CONFLICT and how to order a row's values for it."""

    sql: str
    names: tuple[str, ...]
    order: tuple[int, ...] | None  # positional drivers (SQLite); None: named (psycopg)


_BULK: dict[tuple[str, str], _Bulk] = {}


def _dialect_insert(conn: Connection, table: Table) -> Any:
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def _bulk(conn: Connection, table: Table) -> _Bulk:
    """SQLAlchemy writes the statement (per dialect, once per process); the driver runs it.

    SQLAlchemy's per-row parameter handling costs more than SQLite's insert itself, so the
    two hot statements get their rows already in driver form (see ``_sqlite_time``; pools
    are JSON text, which PostgreSQL casts with the ``::JSON`` SQLAlchemy renders).
    """
    key = (conn.dialect.name, table.name)
    bulk = _BULK.get(key)
    if bulk is None:
        names = _LATEST_COLUMNS if table is LATEST else _HISTORY_COLUMNS
        base = _dialect_insert(conn, table).values(
            {name: bindparam(name, type_=table.c[name].type) for name in names}
        )
        if table is LATEST:
            stmt = base.on_conflict_do_update(
                index_elements=[LATEST.c.machine_pk],
                set_={c.name: base.excluded[c.name] for c in LATEST.c if c.name != "machine_pk"},
                where=base.excluded.observed_at >= LATEST.c.observed_at,
            )
        else:
            stmt = base.on_conflict_do_nothing(index_elements=["machine_pk", "bucket"])
        compiled = stmt.compile(dialect=conn.dialect)
        order = None
        if compiled.positional:
            order = tuple(names.index(name) for name in compiled.positiontup or ())
        bulk = _BULK[key] = _Bulk(compiled.string, names, order)
    return bulk


def _executemany(conn: Connection, table: Table, rows: list[tuple[Any, ...]]) -> None:
    bulk = _bulk(conn, table)
    params: list[Any]
    if bulk.order is None:
        params = [dict(zip(bulk.names, row, strict=True)) for row in rows]
    elif bulk.order == tuple(range(len(bulk.names))):
        params = rows
    else:
        params = [tuple(row[i] for i in bulk.order) for row in rows]
    conn.exec_driver_sql(bulk.sql, params)


def _upsert_latest(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    """One row per machine; a newer poll replaces it, an older (replayed) one does not."""
    _executemany(conn, LATEST, rows)


def _insert_history(conn: Connection, rows: list[tuple[Any, ...]]) -> list[tuple[int, int]]:
    """The first observation of each bucket stays; later ones in the same bucket are dropped.

    Returns the ``(machine_pk, bucket)`` of the rows actually written, for the day sums
    (``controller.history_rollup``), which must not count a dropped duplicate.
    """
    if conn.dialect.name == "postgresql":
        return _insert_history_returning(conn, rows)
    before = conn.execute(select(func.max(HISTORY.c.id))).scalar()
    _executemany(conn, HISTORY, rows)
    # The batch's claim made this transaction SQLite's only writer, and new rowids go past
    # the old maximum: the rows above it are exactly the ones just written.
    written = select(HISTORY.c.machine_pk, HISTORY.c.bucket).where(HISTORY.c.id > (before or 0))
    return [(pk, bucket) for pk, bucket in conn.execute(written)]


def _history_returning_sql(conn: Connection) -> str:
    global _HISTORY_RETURNING
    if _HISTORY_RETURNING is None:
        stmt = (
            postgresql.insert(HISTORY)
            .values({n: bindparam(n, type_=HISTORY.c[n].type) for n in _HISTORY_COLUMNS})
            .on_conflict_do_nothing(index_elements=["machine_pk", "bucket"])
            .returning(HISTORY.c.machine_pk, HISTORY.c.bucket)
        )
        _HISTORY_RETURNING = stmt.compile(dialect=conn.dialect).string
    return _HISTORY_RETURNING


_HISTORY_RETURNING: str | None = None  # compiled once per process (PostgreSQL only)


def _insert_history_returning(
    conn: Connection, rows: list[tuple[Any, ...]]
) -> list[tuple[int, int]]:
    """PostgreSQL: the insert itself names the rows it wrote (concurrent writers included)."""
    params = [dict(zip(_HISTORY_COLUMNS, row, strict=True)) for row in rows]
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    written: list[tuple[int, int]] = []
    try:
        cursor.executemany(_history_returning_sql(conn), params, returning=True)
        while True:
            written.extend((int(pk), int(bucket)) for pk, bucket in cursor.fetchall())
            if not cursor.nextset():
                break
    finally:
        cursor.close()
    return written


def _reading(pk: int, obs: Observation) -> history_rollup.Reading:
    return history_rollup.Reading(
        pk, obs.observed_at, obs.reachable, obs.is_mining, obs.hashrate_ths, obs.power_w
    )


# --- agent events ------------------------------------------------------------------------------


def _apply_agent_events(
    conn: Connection, agent: ReportingAgent, events: Sequence[Event], now: datetime
) -> None:
    if not events:
        return
    ips = {str(e.ip) for e in events if e.ip is not None}
    machines: dict[str, int] = {}
    if ips:
        for view in sorted(
            load_views(conn, _any_of(MACHINE.c.current_ip, ips) & _own_site(agent.site_id)),
            key=lambda v: _rank(v.lifecycle_state, v.last_seen),
        ):
            if view.current_ip:
                machines[view.current_ip] = view.machine_pk
    conn.execute(
        insert(EVENT),
        [
            {
                "at": e.at,
                "kind": e.kind,
                "severity": e.severity.value,
                "machine_pk": machines.get(str(e.ip)) if e.ip else None,
                "agent_id": agent.agent_id,
                "ip": str(e.ip) if e.ip else None,
                "detail": e.detail,
                "data": {**e.data, "origin": "agent"}
                | ({"cleaned": list(e.cleaned)} if e.cleaned else {}),
                "resolved_at": None,
            }
            for e in events
        ],
    )


# --- missing machines --------------------------------------------------------------------------


class _System:
    name = "system:missing-sweep"
    kind = "system"
    source = "controller"
    agent_id = None


def sweep_missing(session: Session, *, now: datetime, after: timedelta) -> int:
    """Flag machines in service unseen for ``after`` (one event each, once); commits.

    Meant to run periodically (e.g. from ``serve``); returns how many were newly flagged.
    """
    conn = session.connection()
    cutoff = now - after
    views = load_views(
        conn,
        MACHINE.c.lifecycle_state.in_(sorted(EXPECTED_ONLINE))
        & or_(MACHINE.c.last_seen.is_(None), MACHINE.c.last_seen < cutoff),
    )
    decisions = find_missing(views, now=now, after=after)
    if decisions:
        apply_decisions(session, conn, _System(), decisions, now)
    session.commit()
    return len(decisions)
