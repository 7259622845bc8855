"""The machine register, as technicians and operators change it.

Claiming a discovered machine puts it on the register with its location and the serial read
from the chassis label; lifecycle transitions follow a fixed table; a serial the agent could
not read is confirmed by a technician. Every change is audited in the same transaction.

The decisions (which transitions exist, whether a label serial may be accepted, whether a
CSV is well formed) are pure functions at the top; the functions below them do the I/O.
Service functions flush but never commit: the caller (API route or CLI command) owns the
transaction, so a bulk import is all or nothing.
"""

from __future__ import annotations

import csv
import hashlib
import io
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sqlalchemy import func, update
from sqlmodel import Session, col, select

from controller import machine_versions
from controller.actors import Actor, record
from controller.errors import Conflict, NotFound
from controller.models import (
    LatestObservation,
    LifecycleState,
    Machine,
    MachineStateChange,
    Site,
    utcnow,
)

SERIAL_MISMATCH_FLAG = "serial_mismatch"
"""Kept on a machine claimed (or confirmed) with a label serial that differs from the reported."""
CONFIRMATION_CLEARS = frozenset({"serial_unconfirmed", "serial_changed"})
"""Flags a technician's serial confirmation resolves (``serial_changed`` is raised by
reconciliation when the serial behind a MAC changed; ``serial_unreadable`` is left alone:
it says the agent still cannot read the serial, which a confirmation does not change)."""
MAX_PAGE = 1000
_MACHINE = Machine.metadata.tables["machine"]

_S = LifecycleState
TRANSITIONS: dict[LifecycleState, frozenset[LifecycleState]] = {
    _S.DISCOVERED: frozenset({_S.REGISTERED}),
    _S.REGISTERED: frozenset({_S.ACTIVE, _S.MAINTENANCE, _S.RMA, _S.DECOMMISSIONED}),
    _S.ACTIVE: frozenset({_S.MAINTENANCE, _S.RMA, _S.DECOMMISSIONED}),
    _S.MAINTENANCE: frozenset({_S.ACTIVE, _S.RMA, _S.DECOMMISSIONED}),
    _S.RMA: frozenset({_S.MAINTENANCE, _S.ACTIVE, _S.DECOMMISSIONED}),
    _S.DECOMMISSIONED: frozenset(),
}
"""Allowed lifecycle moves. ``discovered → registered`` happens only by a claim."""

REASON_REQUIRED = frozenset({_S.RMA, _S.DECOMMISSIONED})
"""Leaving service for repair or for good must say why (RMA number, claim reason, …)."""


class SerialMismatch(Conflict):
    """A serial differs from the one the machine reports, or from the label on record (409).

    The answer carries both values so the technician sees what to check on the chassis.
    """

    def __init__(
        self, machine_id: str, label_serial: str, other_serial: str, other: str = "reported_serial"
    ) -> None:
        self.machine_id = machine_id
        self.label_serial = label_serial
        self.other_serial = other_serial
        self.other = other
        what = "reported serial" if other == "reported_serial" else "label serial on record"
        super().__init__(
            f"machine {machine_id}: label serial {label_serial!r} differs from the {what} "
            f"{other_serial!r}; check the label, or override with a reason"
        )

    def body(self) -> dict[str, str]:
        return {
            "detail": str(self),
            "machine_id": self.machine_id,
            "label_serial": self.label_serial,
            self.other: self.other_serial,
        }


# --- pure decisions ----------------------------------------------------------------------------


def normalize_serial(serial: str) -> str:
    """Serials are compared (and label serials stored) trimmed and upper-case."""
    return serial.strip().upper()


_MAC_HEX = re.compile(r"^[0-9A-Fa-f]{12}$")


def normalize_mac(text: str) -> str | None:
    """``AA-BB-CC-DD-EE-FF``, ``aabb.ccdd.eeff`` … → ``aa:bb:cc:dd:ee:ff`` (as ingestion stores
    it); None if ``text`` is not a MAC."""
    digits = re.sub(r"[:\-.]", "", text.strip())
    if not _MAC_HEX.match(digits):
        return None
    digits = digits.lower()
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def transition_problem(current: LifecycleState, target: LifecycleState) -> str | None:
    """Why ``current → target`` is not allowed, or None if it is."""
    if target == current:
        return f"machine is already {current.value}"
    if current == _S.DISCOVERED and target == _S.REGISTERED:
        return "a discovered machine is registered by claiming it (location and label serial)"
    allowed = TRANSITIONS[current]
    if target in allowed:
        return None
    if not allowed:
        return f"{current.value} is final; no transition leaves it"
    if current == _S.DISCOVERED:
        return "a discovered machine must be claimed before its lifecycle can change"
    options = ", ".join(sorted(s.value for s in allowed))
    return f"cannot go from {current.value} to {target.value} (allowed: {options})"


@dataclass(frozen=True)
class SerialVerdict:
    """Whether a label serial may be accepted, and if so whether it carries a mismatch flag."""

    accepted: bool
    mismatch: bool


def judge_serial(label: str, reported: str | None, override_reason: str | None) -> SerialVerdict:
    """A label serial must match the reported one unless a reason to override is given."""
    if reported is None or not reported.strip():
        return SerialVerdict(accepted=True, mismatch=False)
    if normalize_serial(label) == normalize_serial(reported):
        return SerialVerdict(accepted=True, mismatch=False)
    return SerialVerdict(accepted=bool(override_reason), mismatch=True)


# --- request and response models ---------------------------------------------------------------

Text64 = Annotated[str, Field(min_length=1, max_length=64)]


class _Request(BaseModel):
    model_config = ConfigDict(str_strip_whitespace=True, extra="forbid", coerce_numbers_to_str=True)


class ClaimRequest(_Request):
    """Where a technician racked the machine and what its chassis label says."""

    site: str = Field(min_length=1, max_length=128, description="site name")
    container: Text64
    rack: Text64
    shelf: Text64
    slot: Text64
    label_serial: str = Field(min_length=1, max_length=128)
    override_reason: str | None = Field(
        default=None,
        max_length=1024,
        description="accept a label serial that differs from the reported one, saying why",
    )

    @field_validator("override_reason")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value or None


class StateChangeRequest(_Request):
    state: LifecycleState
    reason: str = Field(default="", max_length=1024)

    @model_validator(mode="after")
    def _reason_when_needed(self) -> StateChangeRequest:
        if self.state in REASON_REQUIRED and not self.reason:
            raise ValueError(f"a reason is required to move a machine to {self.state.value}")
        return self


class ConfirmSerialRequest(_Request):
    serial: str = Field(min_length=1, max_length=128, description="as read from the label")
    override_reason: str | None = Field(default=None, max_length=1024)

    @field_validator("override_reason")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value or None


class StateChangePublic(BaseModel):
    from_state: str | None
    to_state: str
    at: datetime
    actor: str
    reason: str


class ObservationPublic(BaseModel):
    observed_at: datetime
    reachable: bool
    error: str | None
    is_mining: bool | None
    hashrate_ths: float | None
    power_w: float | None
    temperature_c: float | None
    pools: list[dict[str, Any]]
    ip: str | None


class MachinePublic(BaseModel):
    """A register row as the API and the CLI show it."""

    machine_id: str
    lifecycle_state: LifecycleState
    state_since: datetime
    site: str | None
    container: str | None
    rack: str | None
    shelf: str | None
    slot: str | None
    label_serial: str | None
    reported_serial: str | None
    control_board_serial: str | None
    serial_unconfirmed: bool
    flags: list[str]
    mac: str | None
    current_ip: str | None
    vendor: str | None
    model: str | None
    firmware: str | None
    firmware_version: str | None
    hostname: str | None
    hashboard_serials: list[str]
    psu_serial: str | None
    nominal_ths: float | None
    nominal_w: float | None
    agent_id: str | None
    first_seen: datetime
    last_seen: datetime | None
    commissioned_at: datetime | None
    decommissioned_at: datetime | None
    record_version: int
    updated_at: datetime

    @classmethod
    def of(cls, machine: Machine, site_name: str | None) -> MachinePublic:
        fields = {name: getattr(machine, name) for name in cls.model_fields if name != "site"}
        return cls(site=site_name, **fields)


class MachineDetail(MachinePublic):
    history: list[StateChangePublic]
    latest_observation: ObservationPublic | None


class MachinesPublic(BaseModel):
    data: list[MachinePublic]
    count: int


# --- lookups -----------------------------------------------------------------------------------


def _ref_kind(ref: str) -> Literal["ip", "mac", "machine_id"]:
    try:
        ipaddress.ip_address(ref.strip())
        return "ip"
    except ValueError:
        pass
    return "mac" if normalize_mac(ref) is not None else "machine_id"


def _mac_variants(mac: str) -> list[str]:
    """The spellings a MAC may be stored in (the index is used; no function on the column)."""
    canonical = normalize_mac(mac)
    if canonical is None:
        return [mac]
    plain = canonical.replace(":", "")
    forms = {canonical, canonical.replace(":", "-"), plain}
    return sorted(forms | {f.upper() for f in forms} | {mac.strip()})


def _candidates(session: Session, ref: str) -> tuple[str, list[Machine]]:
    kind = _ref_kind(ref)
    if kind == "ip":
        ip = str(ipaddress.ip_address(ref.strip()))
        query = select(Machine).where(Machine.current_ip == ip)
        label = f"IP {ip}"
    elif kind == "mac":
        query = select(Machine).where(col(Machine.mac).in_(_mac_variants(ref)))
        label = f"MAC {normalize_mac(ref)}"
    else:
        query = select(Machine).where(Machine.machine_id == ref.strip().upper())
        label = f"machine {ref.strip().upper()}"
    machines = list(session.exec(query.order_by(col(Machine.id))))
    if len(machines) > 1:  # a stale IP or MAC: prefer machines still in service
        live = [m for m in machines if m.lifecycle_state != _S.DECOMMISSIONED]
        machines = live or machines
    return label, machines


def find_machine(session: Session, ref: str) -> Machine:
    """A machine by ``machine_id``, MAC or current IP; 404 if none, 409 if ambiguous."""
    label, machines = _candidates(session, ref)
    if not machines:
        raise NotFound(f"no machine with {label}")
    if len(machines) > 1:
        ids = ", ".join(m.machine_id for m in machines)
        raise Conflict(f"{label} matches several machines ({ids}); use a machine_id")
    return machines[0]


def _site_by_name(session: Session, name: str) -> Site:
    site = session.exec(select(Site).where(Site.name == name)).first()
    if site is None:
        raise NotFound(f"no site named {name!r}")
    return site


def _site_names(session: Session) -> dict[int, str]:
    return {s.id: s.name for s in session.exec(select(Site)) if s.id is not None}


# --- reading -----------------------------------------------------------------------------------


def list_machines(
    session: Session,
    *,
    state: LifecycleState | None = None,
    site: str | None = None,
    offset: int = 0,
    limit: int | None = 100,
) -> MachinesPublic:
    """Machines ordered by when they were first recorded; ``count`` ignores the page."""
    conditions = []
    if state is not None:
        conditions.append(col(Machine.lifecycle_state) == state)
    if site is not None:
        conditions.append(col(Machine.site_id) == _site_by_name(session, site).id)
    count = session.exec(select(func.count()).select_from(Machine).where(*conditions)).one()
    query = select(Machine).where(*conditions).order_by(col(Machine.id)).offset(offset)
    if limit is not None:
        query = query.limit(limit)
    names = _site_names(session)
    data = [
        MachinePublic.of(m, names.get(m.site_id) if m.site_id else None)
        for m in session.exec(query)
    ]
    return MachinesPublic(data=data, count=count)


def machine_detail(session: Session, ref: str) -> MachineDetail:
    """One machine with its lifecycle history and latest observation."""
    machine = find_machine(session, ref)
    return _detail(session, machine)


def _detail(session: Session, machine: Machine) -> MachineDetail:
    site = session.get(Site, machine.site_id) if machine.site_id else None
    history = session.exec(
        select(MachineStateChange)
        .where(MachineStateChange.machine_pk == machine.id)
        .order_by(col(MachineStateChange.at), col(MachineStateChange.id))
    )
    latest = session.get(LatestObservation, machine.id)
    base = MachinePublic.of(machine, site.name if site else None)
    return MachineDetail(
        **base.model_dump(),
        history=[StateChangePublic.model_validate(h, from_attributes=True) for h in history],
        latest_observation=(
            ObservationPublic.model_validate(latest, from_attributes=True) if latest else None
        ),
    )


# --- changing ----------------------------------------------------------------------------------


def _snapshot(machine: Machine, site_name: str | None) -> dict[str, Any]:
    """The register fields an auditor cares about, before or after a change."""
    return {
        "machine_id": machine.machine_id,
        "lifecycle_state": LifecycleState(machine.lifecycle_state).value,
        "site": site_name,
        "container": machine.container,
        "rack": machine.rack,
        "shelf": machine.shelf,
        "slot": machine.slot,
        "label_serial": machine.label_serial,
        "reported_serial": machine.reported_serial,
        "serial_unconfirmed": machine.serial_unconfirmed,
        "flags": list(machine.flags),
        "record_version": machine.record_version,
    }


def _take(session: Session, machine: Machine) -> None:
    """Optimistic lock: bump ``record_version`` only if nobody changed the row since we read it.

    Works alike on both backends (on PostgreSQL it also row-locks until commit), so two
    technicians claiming the same machine at once get one success and one 409.
    """
    seen = machine.record_version
    result = session.connection().execute(
        update(_MACHINE)
        .where(_MACHINE.c.id == machine.id, _MACHINE.c.record_version == seen)
        .values(record_version=seen + 1)
    )
    if result.rowcount != 1:
        raise Conflict(f"machine {machine.machine_id} was changed meanwhile; try again")
    machine.record_version = seen + 1


def _flush_versions(session: Session, machines: Iterable[Machine]) -> None:
    """Write the changes, then append each changed machine's new version to its history."""
    session.flush()
    machine_versions.snapshot(session.connection(), [m.id for m in machines if m.id is not None])


def _set_state(
    session: Session,
    actor: Actor,
    machine: Machine,
    target: LifecycleState,
    reason: str,
    now: datetime,
) -> None:
    assert machine.id is not None
    session.add(
        MachineStateChange(
            machine_pk=machine.id,
            from_state=LifecycleState(machine.lifecycle_state).value,
            to_state=target.value,
            at=now,
            actor=actor.name,
            reason=reason,
        )
    )
    machine.lifecycle_state = target
    machine.state_since = now
    if target == _S.REGISTERED:
        machine.commissioned_at = now
    if target == _S.DECOMMISSIONED:
        machine.decommissioned_at = now


@dataclass
class _Registry:
    """What a batch of claims must not collide with: taken locations and label serials.

    Loaded once per batch for the sites and serials involved (a full container claimed
    in one file costs a handful of queries, not one scan per row), then updated as rows
    are accepted so that rows of one file cannot collide with each other either.
    """

    sites: dict[str, Site] = field(default_factory=dict)
    locations: dict[tuple[int, str, str, str, str], str] = field(default_factory=dict)
    serials: dict[str, str] = field(default_factory=dict)
    claimed: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, session: Session, site_names: Iterable[str], serials: Iterable[str]) -> _Registry:
        reg = cls()
        names = sorted(set(site_names))
        for site in session.exec(select(Site).where(col(Site.name).in_(names))):
            reg.sites[site.name] = site
        site_ids = [s.id for s in reg.sites.values()]
        if site_ids:
            rows = session.exec(
                select(Machine).where(
                    col(Machine.site_id).in_(site_ids),
                    col(Machine.lifecycle_state) != _S.DECOMMISSIONED,
                    col(Machine.slot).is_not(None),
                )
            )
            for m in rows:
                key = _location_key(m.site_id, m.container, m.rack, m.shelf, m.slot)
                if key is not None:
                    reg.locations[key] = m.machine_id
        wanted = sorted({normalize_serial(s) for s in serials})
        for start in range(0, len(wanted), 500):
            part = wanted[start : start + 500]
            for m in session.exec(
                select(Machine).where(
                    col(Machine.label_serial).in_(part),
                    col(Machine.lifecycle_state) != _S.DECOMMISSIONED,
                )
            ):
                if m.label_serial:
                    reg.serials[normalize_serial(m.label_serial)] = m.machine_id
        return reg


def _location_key(site_id: int | None, *parts: str | None) -> tuple[int, str, str, str, str] | None:
    if site_id is None or any(p is None for p in parts):
        return None
    c, r, s, sl = (str(p).strip().upper() for p in parts)
    return (site_id, c, r, s, sl)


def _describe_location(site: str, req: ClaimRequest) -> str:
    return f"{site}/{req.container}/{req.rack}/{req.shelf}/{req.slot}"


def _claim_problems(machine: Machine, req: ClaimRequest, reg: _Registry) -> list[str]:
    """Everything that stops ``req`` from claiming ``machine`` (a SerialMismatch is raised)."""
    problems: list[str] = []
    if machine.lifecycle_state != _S.DISCOVERED:
        problems.append(
            f"machine {machine.machine_id} is already on the register "
            f"({LifecycleState(machine.lifecycle_state).value}); "
            "only discovered machines can be claimed"
        )
    if machine.machine_id in reg.claimed:
        problems.append(
            f"machine {machine.machine_id} is claimed twice in this file "
            f"(also on line {reg.claimed[machine.machine_id]})"
        )
    site = reg.sites.get(req.site)
    if site is None:
        problems.append(f"no site named {req.site!r}")
    else:
        if machine.site_id is not None and machine.site_id != site.id:
            problems.append(
                f"machine {machine.machine_id} is reported from another site than {req.site!r}"
            )
        key = _location_key(site.id, req.container, req.rack, req.shelf, req.slot)
        holder = reg.locations.get(key) if key else None
        if holder is not None and holder != machine.machine_id:
            problems.append(
                f"location {_describe_location(req.site, req)} is taken by machine {holder}"
            )
    owner = reg.serials.get(normalize_serial(req.label_serial))
    if owner is not None and owner != machine.machine_id:
        problems.append(
            f"label serial {normalize_serial(req.label_serial)!r} is already on the register "
            f"as machine {owner}"
        )
    return problems


def _reserve(reg: _Registry, machine: Machine, req: ClaimRequest, line: int) -> None:
    site = reg.sites[req.site]
    key = _location_key(site.id, req.container, req.rack, req.shelf, req.slot)
    if key is not None:
        reg.locations[key] = machine.machine_id
    reg.serials[normalize_serial(req.label_serial)] = machine.machine_id
    reg.claimed[machine.machine_id] = line


def _apply_claim(
    session: Session,
    actor: Actor,
    machine: Machine,
    site: Site,
    req: ClaimRequest,
    *,
    mismatch: bool,
    via: str,
) -> None:
    _take(session, machine)
    now = utcnow()
    known = session.get(Site, machine.site_id) if machine.site_id else None
    before = _snapshot(machine, known.name if known else None)
    machine.label_serial = normalize_serial(req.label_serial)
    machine.site_id = site.id
    machine.container = req.container
    machine.rack = req.rack
    machine.shelf = req.shelf
    machine.slot = req.slot
    if mismatch and SERIAL_MISMATCH_FLAG not in machine.flags:
        machine.flags = [*machine.flags, SERIAL_MISMATCH_FLAG]
    reason = f"serial override: {req.override_reason}" if mismatch else "claimed"
    _set_state(session, actor, machine, _S.REGISTERED, reason, now)
    machine.updated_at = now
    session.add(machine)
    after = _snapshot(machine, site.name) | {"via": via}
    if mismatch:
        after["serial_override"] = True
    record(
        session,
        actor,
        action="machine.claim",
        entity="machine",
        entity_id=machine.machine_id,
        before=before,
        after=after,
        reason=(req.override_reason or "") if mismatch else "",
    )


def claim(session: Session, actor: Actor, ref: str, req: ClaimRequest) -> MachineDetail:
    """Claim one discovered machine onto the register (refused on a serial mismatch)."""
    machine = find_machine(session, ref)
    reg = _Registry.load(session, [req.site], [req.label_serial])
    problems = _claim_problems(machine, req, reg)
    if req.site not in reg.sites:
        raise NotFound(f"no site named {req.site!r}")
    if problems:
        raise Conflict("; ".join(problems))
    verdict = judge_serial(req.label_serial, machine.reported_serial, req.override_reason)
    if not verdict.accepted:
        raise SerialMismatch(
            machine.machine_id, normalize_serial(req.label_serial), machine.reported_serial or ""
        )
    _apply_claim(
        session, actor, machine, reg.sites[req.site], req, mismatch=verdict.mismatch, via="claim"
    )
    _flush_versions(session, [machine])
    return _detail(session, machine)


def change_state(
    session: Session, actor: Actor, ref: str, req: StateChangeRequest
) -> MachineDetail:
    """Move a machine along its lifecycle; invalid moves are refused (409) with the options."""
    machine = find_machine(session, ref)
    problem = transition_problem(LifecycleState(machine.lifecycle_state), req.state)
    if problem is not None:
        raise Conflict(f"machine {machine.machine_id}: {problem}")
    _take(session, machine)
    site = session.get(Site, machine.site_id) if machine.site_id else None
    site_name = site.name if site else None
    before = _snapshot(machine, site_name)
    now = utcnow()
    _set_state(session, actor, machine, req.state, req.reason, now)
    machine.updated_at = now
    session.add(machine)
    record(
        session,
        actor,
        action="machine.state",
        entity="machine",
        entity_id=machine.machine_id,
        before=before,
        after=_snapshot(machine, site_name),
        reason=req.reason,
    )
    _flush_versions(session, [machine])
    return _detail(session, machine)


def confirm_serial(
    session: Session, actor: Actor, ref: str, req: ConfirmSerialRequest
) -> MachineDetail:
    """A technician read the label of a machine whose serial the agent could not read."""
    machine = find_machine(session, ref)
    serial = normalize_serial(req.serial)
    if not machine.serial_unconfirmed:
        raise Conflict(f"machine {machine.machine_id}: its serial is not awaiting confirmation")
    recorded = normalize_serial(machine.label_serial) if machine.label_serial else None
    if recorded is not None and recorded != serial and not req.override_reason:
        raise SerialMismatch(machine.machine_id, serial, recorded, other="recorded_label_serial")
    verdict = judge_serial(serial, machine.reported_serial, req.override_reason)
    if not verdict.accepted:
        raise SerialMismatch(machine.machine_id, serial, machine.reported_serial or "")
    reg = _Registry.load(session, [], [serial])
    owner = reg.serials.get(serial)
    if owner is not None and owner != machine.machine_id:
        raise Conflict(f"label serial {serial!r} is already on the register as machine {owner}")
    _take(session, machine)
    site = session.get(Site, machine.site_id) if machine.site_id else None
    site_name = site.name if site else None
    before = _snapshot(machine, site_name)
    overridden = verdict.mismatch or (recorded is not None and recorded != serial)
    machine.label_serial = serial
    machine.serial_unconfirmed = False
    flags = [f for f in machine.flags if f not in CONFIRMATION_CLEARS]
    if verdict.mismatch and SERIAL_MISMATCH_FLAG not in flags:
        flags.append(SERIAL_MISMATCH_FLAG)
    machine.flags = flags
    machine.updated_at = utcnow()
    session.add(machine)
    after = _snapshot(machine, site_name)
    if overridden:
        after["serial_override"] = True
    record(
        session,
        actor,
        action="machine.confirm_serial",
        entity="machine",
        entity_id=machine.machine_id,
        before=before,
        after=after,
        reason=(req.override_reason or "") if overridden else "",
    )
    _flush_versions(session, [machine])
    return _detail(session, machine)


# --- bulk claims from CSV ----------------------------------------------------------------------

ID_COLUMNS = ("machine_id", "mac", "ip")
REQUIRED_COLUMNS = ("site", "container", "rack", "shelf", "slot", "label_serial")
OPTIONAL_COLUMNS = ("override_reason",)


class ClaimRowResult(BaseModel):
    """One CSV row: which machine it names and whether it was (or would be) claimed."""

    line: int
    ref: str
    machine_id: str | None = None
    status: Literal["ok", "claimed", "error"]
    errors: list[str] = Field(default_factory=list)
    label_serial: str | None = None
    reported_serial: str | None = None
    override: bool = False


class ImportResult(BaseModel):
    """The outcome of a CSV import: all rows claimed, or none (with every bad row and why)."""

    ok: bool
    imported: int
    dry_run: bool = False
    file_errors: list[str] = Field(default_factory=list)
    rows: list[ClaimRowResult] = Field(default_factory=list)

    @property
    def bad_rows(self) -> list[ClaimRowResult]:
        return [r for r in self.rows if r.status == "error"]


@dataclass(frozen=True)
class CsvRow:
    """A syntactically valid CSV row: who it names and the claim it asks for."""

    line: int
    ref: str
    ids: dict[str, str]
    claim: ClaimRequest


@dataclass
class ParsedCsv:
    rows: list[CsvRow] = field(default_factory=list)
    bad: list[ClaimRowResult] = field(default_factory=list)
    file_errors: list[str] = field(default_factory=list)


def _delimiter(header_line: str) -> str:
    """Comma by default; semicolon or tab when that is what the header uses (Excel locales)."""
    counts = {d: header_line.count(d) for d in (",", ";", "\t")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def parse_claims_csv(text: str) -> ParsedCsv:
    """Check the file's shape and every row's fields (no database): pure."""
    parsed = ParsedCsv()
    text = text.removeprefix("\ufeff")
    first_line = next((line for line in text.splitlines() if line.strip()), "")
    if not first_line:
        parsed.file_errors.append("the file is empty (expected a header line)")
        return parsed
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(first_line))
    header: list[str] | None = None
    header_line = 0
    last_line = 0
    try:
        for values in reader:
            line = last_line + 1
            last_line = reader.line_num
            if not values or all(not v.strip() for v in values):
                continue
            if header is None:
                header = [v.strip().lower() for v in values]
                header_line = line
                problems = _header_problems(header)
                if problems:
                    parsed.file_errors.extend(f"line {line}: {p}" for p in problems)
                    return parsed
                continue
            _parse_row(parsed, header, values, line)
    except csv.Error as exc:
        parsed.file_errors.append(f"line {reader.line_num}: not valid CSV: {exc}")
        return parsed
    if header is not None and not parsed.rows and not parsed.bad:
        parsed.file_errors.append(f"line {header_line}: a header but no rows to claim")
    return parsed


def _header_problems(header: Sequence[str]) -> list[str]:
    problems = []
    known = set(ID_COLUMNS) | set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    unknown = [h for h in header if h not in known]
    if unknown:
        problems.append(
            f"unknown column(s) {', '.join(repr(u) for u in unknown)} "
            f"(expected mac or ip, {', '.join(REQUIRED_COLUMNS)}, optional override_reason)"
        )
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        problems.append(f"missing column(s): {', '.join(missing)}")
    if not any(c in header for c in ID_COLUMNS):
        problems.append("needs a mac or an ip column to say which machine each row is")
    duplicated = sorted({h for h in header if header.count(h) > 1})
    if duplicated:
        problems.append(f"column(s) given twice: {', '.join(duplicated)}")
    return problems


def _parse_row(parsed: ParsedCsv, header: list[str], values: list[str], line: int) -> None:
    cells = {h: v.strip() for h, v in zip(header, values, strict=False)}
    ids = {c: cells[c] for c in ID_COLUMNS if cells.get(c)}
    ref = next(iter(ids.values()), "")
    errors: list[str] = []
    if len(values) != len(header):
        errors.append(f"expected {len(header)} fields, found {len(values)}")
    if not ids:
        errors.append("no mac or ip to identify the machine")
    if "mac" in ids and normalize_mac(ids["mac"]) is None:
        errors.append(f"mac {ids['mac']!r} is not a MAC address")
    if "ip" in ids:
        try:
            ipaddress.ip_address(ids["ip"])
        except ValueError:
            errors.append(f"ip {ids['ip']!r} is not an IP address")
    claim: ClaimRequest | None = None
    try:
        claim = ClaimRequest.model_validate(
            {k: cells.get(k, "") for k in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if k in cells}
        )
    except ValidationError as exc:
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]) or "row"
            msg = "is empty" if err["type"] == "string_too_short" else err["msg"]
            errors.append(f"{name} {msg}")
    if errors or claim is None:
        parsed.bad.append(ClaimRowResult(line=line, ref=ref, status="error", errors=errors))
        return
    parsed.rows.append(CsvRow(line=line, ref=ref, ids=ids, claim=claim))


def _resolve(session: Session, row: CsvRow) -> tuple[Machine | None, list[str]]:
    """The one machine a row's mac/ip/machine_id name (all of them must agree)."""
    found: dict[str, Machine] = {}
    errors = []
    for column, value in row.ids.items():
        label, machines = _candidates(session, value)
        if not machines:
            errors.append(f"no machine with {label}")
        elif len(machines) > 1:
            ids = ", ".join(m.machine_id for m in machines)
            errors.append(f"{label} matches several machines ({ids})")
        else:
            found[column] = machines[0]
    distinct = {m.machine_id for m in found.values()}
    if len(distinct) > 1:
        named = ", ".join(f"{c} {row.ids[c]} is {m.machine_id}" for c, m in found.items())
        errors.append(f"the row names different machines ({named})")
    if errors:
        return None, errors
    return next(iter(found.values())), []


def import_claims(
    session: Session, actor: Actor, text: str, *, dry_run: bool = False, source_name: str = ""
) -> ImportResult:
    """Validate the whole file first; claim every row in the caller's transaction, or none."""
    parsed = parse_claims_csv(text)
    if parsed.file_errors:
        return ImportResult(ok=False, imported=0, dry_run=dry_run, file_errors=parsed.file_errors)
    reg = _Registry.load(
        session, [r.claim.site for r in parsed.rows], [r.claim.label_serial for r in parsed.rows]
    )
    results: list[ClaimRowResult] = list(parsed.bad)
    accepted: list[tuple[CsvRow, Machine, bool]] = []
    for row in parsed.rows:
        machine, errors = _resolve(session, row)
        result = ClaimRowResult(
            line=row.line,
            ref=row.ref,
            status="ok",
            label_serial=normalize_serial(row.claim.label_serial),
        )
        if machine is not None:
            result.machine_id = machine.machine_id
            result.reported_serial = machine.reported_serial
            errors = _claim_problems(machine, row.claim, reg)
            verdict = judge_serial(
                row.claim.label_serial, machine.reported_serial, row.claim.override_reason
            )
            result.override = verdict.mismatch and verdict.accepted
            if not verdict.accepted:
                errors.append(
                    f"label serial {normalize_serial(row.claim.label_serial)!r} differs from the "
                    f"reported serial {machine.reported_serial!r} (give override_reason to claim "
                    "it anyway)"
                )
            if not errors:
                _reserve(reg, machine, row.claim, row.line)
                accepted.append((row, machine, verdict.mismatch))
        if errors:
            result.status = "error"
            result.errors = errors
        results.append(result)
    results.sort(key=lambda r: r.line)
    if any(r.status == "error" for r in results):
        return ImportResult(ok=False, imported=0, dry_run=dry_run, rows=results)
    if dry_run:
        return ImportResult(ok=True, imported=0, dry_run=True, rows=results)
    for row, machine, mismatch in accepted:
        _apply_claim(
            session,
            actor,
            machine,
            reg.sites[row.claim.site],
            row.claim,
            mismatch=mismatch,
            via=f"import line {row.line}",
        )
    for result in results:
        result.status = "claimed"
    record(
        session,
        actor,
        action="machine.import_claims",
        entity="machine",
        after={
            "rows": len(accepted),
            "machines": [m.machine_id for _, m, _ in accepted],
            "file": source_name,
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
        },
    )
    _flush_versions(session, [m for _, m, _ in accepted])
    return ImportResult(ok=True, imported=len(accepted), rows=results)
