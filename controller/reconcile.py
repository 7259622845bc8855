"""Reconciling what agents report with the machine register: pure decisions, no I/O.

The ingestion service loads a snapshot of the register entries a batch could touch
(:class:`RegisterView`), calls :func:`reconcile`, and applies the returned decisions in one
transaction. Identity is the chassis serial, then the MAC; never the IP.

First the batch as a whole: serials and MACs are normalised (``AA-BB-…`` → ``aa:bb:…``;
blank or placeholder serials such as ``""``, ``"unknown"``, ``"0000"`` are unreadable), a
record missing its serial (or MAC) borrows it when the batch names exactly one for its MAC
(or serial), and the batch's own duplicates are noted: a serial on two MACs, a MAC with two
serials. Every serial and MAC in the batch counts as alive. Then each record, oldest
first, against the register *as changed by the records before it* (one batch may report a
machine twice):

1. Neither a serial nor a MAC → ``identity_unusable`` alert; nothing changes.
2. Serial on the register (reported or label serial):
   - one machine, same MAC (or a MAC missing on either side) → that machine;
   - one machine, another MAC that is gone (not in this batch, not seen at another IP
     within ``live_window``) → that machine: ``control_board_swap``;
   - otherwise (several machines, the serial on two MACs in this batch, or the old MAC
     still alive) → ``duplicate_serial`` on every holder, never merged: the record goes to
     the machine with its MAC (or IP, or an unread serial behind its MAC), else a new one.
3. Serial unreadable, MAC on the register → that machine, flagged ``serial_unreadable``
   and ``serial_unconfirmed`` until a technician confirms (the stored serial is kept).
4. New serial, MAC on the register:
   - the machine with that MAC has no serial yet → it, serial filled in;
   - one machine whose serial is gone → it: ``serial_changed`` (chassis or board replaced
     behind the MAC), flagged ``serial_unconfirmed``;
   - otherwise (a cloned MAC) → ``duplicate_mac`` on all; the record gets a new machine.
5. Nothing known → a new machine in state *discovered* (``machine_discovered``).

Each record then updates its machine: address (holders of that IP before lose it), MAC
(a machine that held it loses it unless the MAC is cloned), board, hashboard, PSU serials
(a board that stops reporting is kept), firmware, ``last_seen`` (capped at reception).
What changed is judged once per batch against the register — ``machine_moved``,
``site_changed``, ``control_board_swap``, ``hashboard_swap``, ``psu_swap``,
``firmware_changed`` — so a value that flaps within a batch is not two swaps. A
decommissioned machine seen again is flagged (``decommissioned_reappeared``; only people
change the lifecycle), a missing one returns (``machine_returned``).

Ongoing conditions are machine ``flags`` named after their finding kind and count by their
net change per batch: an open alert is not raised again on every report, and one that came
and went within a batch is no news. Reconciling the same batch twice changes nothing.
:func:`find_missing` (registered but unseen) and :func:`check_observation` (hashing but
unregistered; a missing machine answering) complete the picture.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from contract import EventSeverity, IdentityRecord, Observation
from controller.models import LifecycleState, new_machine_id


class FindingKind(StrEnum):
    """What reconciliation noticed; also the ``RegisterEvent.kind`` it is recorded as."""

    DISCOVERED = "machine_discovered"
    MOVED = "machine_moved"
    SITE_CHANGED = "site_changed"
    CONTROL_BOARD_SWAP = "control_board_swap"
    HASHBOARD_SWAP = "hashboard_swap"
    PSU_SWAP = "psu_swap"
    SERIAL_CHANGED = "serial_changed"
    MAC_REASSIGNED = "mac_reassigned"
    DUPLICATE_SERIAL = "duplicate_serial"
    DUPLICATE_MAC = "duplicate_mac"
    SERIAL_UNREADABLE = "serial_unreadable"
    IDENTITY_UNUSABLE = "identity_unusable"
    FIRMWARE_CHANGED = "firmware_changed"
    DECOMMISSIONED_REAPPEARED = "decommissioned_reappeared"
    MISSING = "machine_missing"
    RETURNED = "machine_returned"
    UNREGISTERED_HASHING = "unregistered_hashing"


# Conditions that persist on the machine as a flag (same name) until resolved.
FLAG_KINDS = frozenset(
    {
        FindingKind.DUPLICATE_SERIAL,
        FindingKind.DUPLICATE_MAC,
        FindingKind.SERIAL_UNREADABLE,
        FindingKind.SERIAL_CHANGED,
        FindingKind.DECOMMISSIONED_REAPPEARED,
        FindingKind.MISSING,
        FindingKind.UNREGISTERED_HASHING,
    }
)

# States in which a machine is expected to answer; only these can go missing.
EXPECTED_ONLINE = frozenset({LifecycleState.REGISTERED, LifecycleState.ACTIVE})

_W = EventSeverity.WARNING
SEVERITY: Mapping[FindingKind, EventSeverity] = {
    FindingKind.DISCOVERED: EventSeverity.INFO,
    FindingKind.MOVED: EventSeverity.INFO,
    FindingKind.SITE_CHANGED: _W,
    FindingKind.CONTROL_BOARD_SWAP: _W,
    FindingKind.HASHBOARD_SWAP: _W,
    FindingKind.PSU_SWAP: EventSeverity.INFO,
    FindingKind.SERIAL_CHANGED: _W,
    FindingKind.MAC_REASSIGNED: _W,
    FindingKind.DUPLICATE_SERIAL: EventSeverity.CRITICAL,
    FindingKind.DUPLICATE_MAC: _W,
    FindingKind.SERIAL_UNREADABLE: _W,
    FindingKind.IDENTITY_UNUSABLE: _W,
    FindingKind.FIRMWARE_CHANGED: _W,
    FindingKind.DECOMMISSIONED_REAPPEARED: _W,
    FindingKind.MISSING: _W,
    FindingKind.RETURNED: EventSeverity.INFO,
    FindingKind.UNREGISTERED_HASHING: EventSeverity.CRITICAL,
}

# --- normalisation -------------------------------------------------------------------------------

_HEX = re.compile(r"^[0-9a-f]+$")
_CANONICAL_MAC = re.compile(r"^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$")
_PLACEHOLDER_MACS = frozenset({"00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff"})
_PLACEHOLDER_SERIALS = frozenset(
    {"UNKNOWN", "N/A", "NA", "NONE", "NULL", "NIL", "DEFAULT", "SN", "SERIAL", "TBD", "UNDEFINED"}
)
_JUNK_SERIAL = re.compile(r"^[\s0\-?*.xX_]*$")


def normalize_mac(value: str | None) -> str | None:
    """``aa:bb:cc:dd:ee:ff`` from any common spelling; None when absent, invalid or all 0/F."""
    if value is None:
        return None
    if _CANONICAL_MAC.match(value):  # the common case, on every observation
        return None if value in _PLACEHOLDER_MACS else value
    text = value.strip().lower()
    groups = re.split(r"[:\-]", text)
    if len(groups) == 6 and all(1 <= len(g) <= 2 and _HEX.match(g) for g in groups):
        digits = "".join(g.zfill(2) for g in groups)
    else:
        digits = text.replace(".", "").replace(" ", "")
        if len(digits) != 12 or not _HEX.match(digits):
            return None
    mac = ":".join(digits[i : i + 2] for i in range(0, 12, 2))
    return None if mac in _PLACEHOLDER_MACS else mac


def normalize_serial(value: str | None) -> str | None:
    """Upper-case, trimmed serial; None for blanks and placeholders (``unknown``, ``0000``…)."""
    if value is None:
        return None
    text = value.strip().upper()
    if not text or text in _PLACEHOLDER_SERIALS or _JUNK_SERIAL.match(text):
        return None
    return text


def normalize_serials(values: Iterable[str]) -> tuple[str, ...]:
    """Readable serials in reported order, without duplicates."""
    seen: dict[str, None] = {}
    for value in values:
        serial = normalize_serial(value)
        if serial is not None:
            seen.setdefault(serial, None)
    return tuple(seen)


# --- inputs and outputs ------------------------------------------------------------------------


@dataclass(frozen=True)
class RegisterView:
    """What reconciliation needs to know about one register entry."""

    machine_pk: int
    machine_id: str
    lifecycle_state: LifecycleState = LifecycleState.DISCOVERED
    reported_serial: str | None = None
    label_serial: str | None = None
    mac: str | None = None
    control_board_serial: str | None = None
    hashboard_serials: tuple[str, ...] = ()
    psu_serial: str | None = None
    vendor: str | None = None
    model: str | None = None
    firmware: str | None = None
    firmware_version: str | None = None
    hostname: str | None = None
    current_ip: str | None = None
    site_id: int | None = None
    agent_id: str | None = None
    last_seen: datetime | None = None
    serial_unconfirmed: bool = False
    flags: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Finding:
    """One thing worth an event. ``data`` is JSON-ready."""

    kind: FindingKind
    severity: EventSeverity
    ip: str | None = None
    detail: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CreateMachine:
    """Insert a machine (state *discovered*); ``fields`` are Machine columns."""

    machine_id: str
    fields: Mapping[str, Any]
    findings: tuple[Finding, ...]


@dataclass(frozen=True)
class UpdateMachine:
    """Change an existing machine.

    ``before``/``after`` hold only the columns that change (they are audited);
    ``last_seen`` is bookkeeping (not audited); ``resolves`` are finding kinds whose open
    events are now over (their flags are already dropped in ``after``).
    """

    machine_pk: int
    machine_id: str
    before: Mapping[str, Any]
    after: Mapping[str, Any]
    last_seen: datetime | None
    findings: tuple[Finding, ...]
    resolves: frozenset[FindingKind] = frozenset()


@dataclass(frozen=True)
class Alert:
    """A finding about no particular machine (e.g. an identity that cannot be placed)."""

    finding: Finding


Decision = CreateMachine | UpdateMachine | Alert


def _finding(kind: FindingKind, ip: str | None, detail: str, /, **data: Any) -> Finding:
    return Finding(kind=kind, severity=SEVERITY[kind], ip=ip, detail=detail, data=data)


# --- the working register ----------------------------------------------------------------------

_FIELDS = (
    "mac",
    "reported_serial",
    "control_board_serial",
    "hashboard_serials",
    "psu_serial",
    "vendor",
    "model",
    "firmware",
    "firmware_version",
    "hostname",
    "current_ip",
    "site_id",
    "agent_id",
    "serial_unconfirmed",
    "flags",
)


@dataclass(eq=False)  # compared and hashed by identity
class _Work:
    """A register entry as this batch changes it."""

    view: RegisterView | None
    machine_id: str
    state: dict[str, Any]
    label_serial: str | None
    lifecycle_state: LifecycleState
    last_seen: datetime | None
    first_seen: datetime | None = None
    findings: list[Finding] = field(default_factory=list)
    raised: list[Finding] = field(default_factory=list)
    resolves: set[FindingKind] = field(default_factory=set)
    touched: bool = False

    @property
    def name(self) -> str:
        return self.machine_id

    @property
    def mac(self) -> str | None:
        value: str | None = self.state["mac"]
        return value

    @property
    def serial(self) -> str | None:
        value: str | None = self.state["reported_serial"]
        return value

    @property
    def ip(self) -> str | None:
        value: str | None = self.state["current_ip"]
        return value

    @property
    def flags(self) -> frozenset[str]:
        value: frozenset[str] = self.state["flags"]
        return value

    def note(self, finding: Finding) -> None:
        self.findings.append(finding)
        self.touched = True

    def raise_flag(self, kind: FindingKind, ip: str | None, detail: str, /, **data: Any) -> None:
        """Flag an ongoing condition and record it, unless it is already flagged."""
        if kind in self.flags:
            return
        self.state["flags"] = self.flags | {kind.value}
        finding = _finding(kind, ip, detail, **data)
        self.raised.append(finding)
        self.note(finding)

    def resolve(self, kind: FindingKind) -> bool:
        if kind not in self.flags:
            return False
        self.state["flags"] = self.flags - {kind.value}
        self.resolves.add(kind)
        self.touched = True
        return True


def _initial_state(view: RegisterView) -> dict[str, Any]:
    return {
        "mac": normalize_mac(view.mac) or view.mac,
        "reported_serial": normalize_serial(view.reported_serial),
        "control_board_serial": normalize_serial(view.control_board_serial),
        "hashboard_serials": normalize_serials(view.hashboard_serials),
        "psu_serial": normalize_serial(view.psu_serial),
        "vendor": view.vendor,
        "model": view.model,
        "firmware": view.firmware,
        "firmware_version": view.firmware_version,
        "hostname": view.hostname,
        "current_ip": view.current_ip,
        "site_id": view.site_id,
        "agent_id": view.agent_id,
        "serial_unconfirmed": view.serial_unconfirmed,
        "flags": frozenset(view.flags),
    }


@dataclass(frozen=True)
class _Reading:
    """One identity record, normalised."""

    ip: str
    seen: datetime
    mac: str | None
    serial: str | None
    control_board_serial: str | None
    hashboard_serials: tuple[str, ...]
    psu_serial: str | None
    record: IdentityRecord

    @classmethod
    def of(cls, record: IdentityRecord, received_at: datetime) -> _Reading:
        return cls(
            ip=str(record.ip),
            # A clock running ahead must not make a machine look seen in the future.
            seen=min(record.observed_at, received_at),
            mac=normalize_mac(record.mac),
            serial=normalize_serial(record.serial),
            control_board_serial=normalize_serial(record.control_board_serial),
            hashboard_serials=normalize_serials(record.hashboard_serials),
            psu_serial=normalize_serial(record.psu_serial),
            record=record,
        )


class _Register:
    """The working set with indexes by serial, MAC and IP that follow every change."""

    def __init__(self, views: Iterable[RegisterView], new_id: Callable[[], str]) -> None:
        self.works: list[_Work] = []
        self.new_id = new_id
        self._by_serial: dict[str, list[_Work]] = {}
        self._by_mac: dict[str, list[_Work]] = {}
        self._by_ip: dict[str, list[_Work]] = {}
        for view in views:
            work = _Work(
                view=view,
                machine_id=view.machine_id,
                state=_initial_state(view),
                label_serial=normalize_serial(view.label_serial),
                lifecycle_state=LifecycleState(view.lifecycle_state),
                last_seen=view.last_seen,
            )
            self._add(work)

    def _add(self, work: _Work) -> None:
        self.works.append(work)
        for serial in {work.serial, work.label_serial} - {None}:
            self._by_serial.setdefault(str(serial), []).append(work)
        if work.mac:
            self._by_mac.setdefault(work.mac, []).append(work)
        if work.ip:
            self._by_ip.setdefault(work.ip, []).append(work)

    def create(self, reading: _Reading) -> _Work:
        work = _Work(
            view=None,
            machine_id=self.new_id(),
            state={name: None for name in _FIELDS},
            label_serial=None,
            lifecycle_state=LifecycleState.DISCOVERED,
            last_seen=None,
            first_seen=reading.seen,
            touched=True,
        )
        work.state.update(hashboard_serials=(), serial_unconfirmed=False, flags=frozenset())
        self._add(work)
        work.note(
            _finding(FindingKind.DISCOVERED, reading.ip, "new machine discovered", **_ids(reading))
        )
        return work

    def with_serial(self, serial: str) -> list[_Work]:
        return list(self._by_serial.get(serial, ()))

    def with_mac(self, mac: str | None) -> list[_Work]:
        return list(self._by_mac.get(mac, ())) if mac else []

    def with_ip(self, ip: str) -> list[_Work]:
        return list(self._by_ip.get(ip, ()))

    def set(self, work: _Work, name: str, value: Any) -> None:
        """Change one field, keeping the indexes right."""
        old = work.state[name]
        if old == value:
            return
        index = {
            "reported_serial": self._by_serial,
            "mac": self._by_mac,
            "current_ip": self._by_ip,
        }.get(name)
        if index is not None:
            if old is not None and not (name == "reported_serial" and old == work.label_serial):
                index[old].remove(work)
            if value is not None and work not in index.get(value, ()):
                index.setdefault(value, []).append(work)
        work.state[name] = value
        work.touched = True


def _ids(reading: _Reading) -> dict[str, Any]:
    return {"mac": reading.mac, "serial": reading.serial, "ip": reading.ip}


def _alive_elsewhere(work: _Work, reading: _Reading, window: timedelta) -> bool:
    """Was ``work`` seen at another IP close to when ``reading`` was taken?"""
    return (
        work.last_seen is not None
        and work.ip is not None
        and work.ip != reading.ip
        and abs(reading.seen - work.last_seen) < window
    )


def _prefer(works: Sequence[_Work], reading: _Reading) -> _Work:
    """Among candidates: the one at this IP, then in service, then the most recently seen."""

    def rank(work: _Work) -> tuple[bool, bool, float]:
        seen = work.last_seen.timestamp() if work.last_seen else float("-inf")
        in_service = work.lifecycle_state != LifecycleState.DECOMMISSIONED
        return (work.ip == reading.ip, in_service, seen)

    return max(works, key=rank)


def _describe(works: Iterable[_Work]) -> list[dict[str, Any]]:
    return [{"machine": w.name, "mac": w.mac, "ip": w.ip} for w in works]


# --- matching ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _BatchDuplicates:
    """What the whole batch says, before any record is taken on its own."""

    serials: frozenset[str]  # serials reported on two or more MACs
    macs: frozenset[str]  # MACs reported with two or more serials
    read: frozenset[str]  # MACs whose serial was read at least once
    seen_serials: frozenset[str]  # every serial and MAC in the batch: those are alive
    seen_macs: frozenset[str]

    @classmethod
    def of(cls, readings: Iterable[_Reading]) -> _BatchDuplicates:
        macs_of: dict[str, set[str]] = {}
        serials_of: dict[str, set[str]] = {}
        for r in readings:
            if r.serial and r.mac:
                macs_of.setdefault(r.serial, set()).add(r.mac)
                serials_of.setdefault(r.mac, set()).add(r.serial)
        return cls(
            serials=frozenset(s for s, m in macs_of.items() if len(m) > 1),
            macs=frozenset(m for m, s in serials_of.items() if len(s) > 1),
            read=frozenset(serials_of),
            seen_serials=frozenset(r.serial for r in readings if r.serial),
            seen_macs=frozenset(r.mac for r in readings if r.mac),
        )


def _completed(readings: list[_Reading]) -> list[_Reading]:
    """Fill a reading's missing serial (or MAC) from the batch when the batch names exactly
    one for its MAC (or serial): a read that failed once among good ones is not news, and
    the order of readings cannot then decide which machine a half-identity lands on."""
    serials_of: dict[str, set[str]] = {}
    macs_of: dict[str, set[str]] = {}
    for r in readings:
        if r.serial and r.mac:
            serials_of.setdefault(r.mac, set()).add(r.serial)
            macs_of.setdefault(r.serial, set()).add(r.mac)
    out = []
    for r in readings:
        if r.serial is None and r.mac and len(known := serials_of.get(r.mac, ())) == 1:
            r = replace(r, serial=next(iter(known)))
        elif r.mac is None and r.serial and len(known := macs_of.get(r.serial, ())) == 1:
            r = replace(r, mac=next(iter(known)))
        out.append(r)
    return out


def _match(reg: _Register, r: _Reading, dups: _BatchDuplicates, window: timedelta) -> _Work | None:
    """The register entry ``r`` belongs to (created if need be), or None if it cannot be placed."""
    by_mac = reg.with_mac(r.mac)
    if r.serial is None:
        if by_mac:
            return _prefer(by_mac, r)
        return reg.create(r) if r.mac else None

    by_serial = reg.with_serial(r.serial)
    if by_serial:
        if len(by_serial) == 1 and r.serial not in dups.serials:
            work = by_serial[0]
            if r.mac is None or work.mac is None or work.mac == r.mac:
                return work
            if not _alive_elsewhere(work, r, window) and work.mac not in dups.seen_macs:
                return work  # control-board swap (the old MAC is gone), judged at the end
        return _duplicate_serial(reg, r, by_serial, by_mac)

    if by_mac:
        unread = [w for w in by_mac if w.serial is None]
        if unread:
            return _prefer(unread, r)
        if (
            len(by_mac) == 1
            and r.mac not in dups.macs
            and by_mac[0].serial not in dups.seen_serials
            and not _alive_elsewhere(by_mac[0], r, window)
        ):
            return by_mac[0]  # serial changed behind the same MAC (the old serial is gone)
        work = reg.create(r)
        others = [*by_mac, work]
        for w in others:
            w.raise_flag(
                FindingKind.DUPLICATE_MAC,
                r.ip,
                f"MAC {r.mac} is reported by machines with different serials",
                mac=r.mac,
                machines=_describe(others),
            )
        return work
    return reg.create(r)


def _duplicate_serial(
    reg: _Register, r: _Reading, by_serial: list[_Work], by_mac: list[_Work]
) -> _Work:
    """One serial on two MACs: flag every holder, merge nothing."""
    assert r.serial is not None
    same_mac = [w for w in by_serial if r.mac is not None and w.mac == r.mac]
    same_ip = [w for w in by_serial if w.ip == r.ip and (w.mac is None or w.mac == r.mac)]
    unread = [w for w in by_mac if w.serial is None]
    if same_mac:
        work = same_mac[0]
    elif same_ip:
        work = same_ip[0]
    elif r.mac is None:
        work = _prefer(by_serial, r)
    elif unread:
        work = _prefer(unread, r)  # known by this MAC, serial never read: it is this one
    else:
        work = reg.create(r)  # never take over a machine that reports another serial
    holders = list(dict.fromkeys([*by_serial, work]))
    for w in holders:
        w.raise_flag(
            FindingKind.DUPLICATE_SERIAL,
            r.ip,
            f"serial {r.serial} is reported by more than one MAC",
            serial=r.serial,
            machines=_describe(holders),
        )
    return work


# --- applying a reading -------------------------------------------------------------------------


def _apply(
    reg: _Register,
    work: _Work,
    r: _Reading,
    site_id: int | None,
    agent_id: str | None,
    dups: _BatchDuplicates,
    window: timedelta,
) -> None:
    """Bring ``work`` up to date with ``r`` and note what that means."""
    work.touched = True
    state = work.state
    if r.serial is not None or r.mac not in dups.read:  # a failed read among good ones: no news
        _apply_serial(reg, work, r)

    # Component changes are only recorded here; what they mean (swaps, firmware) is judged
    # once per batch against the register (``_component_findings``), so a value that flaps
    # within one batch is not reported as two swaps.
    if r.mac and work.mac != r.mac:
        _take_mac(reg, work, r, dups, window)
    if r.control_board_serial:
        reg.set(work, "control_board_serial", r.control_board_serial)
    boards: tuple[str, ...] = state["hashboard_serials"]
    if any(s not in boards for s in r.hashboard_serials):  # a board that stops reporting is no news
        reg.set(work, "hashboard_serials", r.hashboard_serials)
    for name, value in (
        ("psu_serial", r.psu_serial),
        ("firmware", r.record.firmware),
        ("firmware_version", r.record.firmware_version),
        ("vendor", r.record.make),
        ("model", r.record.model),
        ("hostname", r.record.hostname),
    ):
        if value:
            reg.set(work, name, value)

    _take_ip(reg, work, r.ip)
    if site_id is not None:
        reg.set(work, "site_id", site_id)
    if agent_id is not None:
        reg.set(work, "agent_id", agent_id)
    if work.last_seen is None or r.seen > work.last_seen:
        work.last_seen = r.seen

    if work.resolve(FindingKind.MISSING):
        work.note(_finding(FindingKind.RETURNED, r.ip, "missing machine is reporting again"))
    if work.lifecycle_state == LifecycleState.DECOMMISSIONED:
        work.raise_flag(
            FindingKind.DECOMMISSIONED_REAPPEARED,
            r.ip,
            "a decommissioned machine is on the network again",
            **_ids(r),
        )


def _apply_serial(reg: _Register, work: _Work, r: _Reading) -> None:
    if r.serial is None:
        # Only when it starts: a technician's confirmation (which leaves this flag, as the
        # agent still cannot read the serial) must not be undone by the next report.
        if FindingKind.SERIAL_UNREADABLE not in work.flags:
            work.raise_flag(
                FindingKind.SERIAL_UNREADABLE,
                r.ip,
                "serial could not be read; matched by MAC until a technician confirms",
                mac=r.mac,
            )
        return
    work.resolve(FindingKind.SERIAL_UNREADABLE)
    current = work.serial
    if current != r.serial:
        matches_label = work.label_serial is not None and work.label_serial == r.serial
        if current is not None or (work.label_serial is not None and not matches_label):
            kind = FindingKind.SERIAL_CHANGED
            detail = (
                f"reported serial changed {current} → {r.serial} behind MAC {r.mac}"
                if current is not None
                else f"reported serial {r.serial} differs from label {work.label_serial}"
            )
            data = {"serial": [current, r.serial], "label_serial": work.label_serial, "mac": r.mac}
            if matches_label:
                work.note(Finding(kind, EventSeverity.INFO, r.ip, detail, data))
            elif kind in work.flags:
                work.note(_finding(kind, r.ip, detail, **data))  # another change, same open flag
            else:
                reg.set(work, "serial_unconfirmed", True)
                work.raise_flag(kind, r.ip, detail, **data)
        reg.set(work, "reported_serial", r.serial)
    if work.label_serial is not None and work.label_serial == r.serial:
        # The label was read by a technician: the machine's identity is confirmed again.
        reg.set(work, "serial_unconfirmed", False)
        work.resolve(FindingKind.SERIAL_CHANGED)


def _take_mac(
    reg: _Register, work: _Work, r: _Reading, dups: _BatchDuplicates, window: timedelta
) -> None:
    """Give ``work`` the MAC. A machine that held it loses it (its board moved here), unless
    the MAC is cloned (known, in this batch with other serials, or live at another address):
    then both keep it, flagged."""
    assert r.mac is not None
    for other in reg.with_mac(r.mac):
        if other is work or FindingKind.DUPLICATE_MAC in other.flags:
            continue  # a known clone keeps it
        if r.mac in dups.macs or _alive_elsewhere(other, r, window):
            for w in (other, work):
                w.raise_flag(
                    FindingKind.DUPLICATE_MAC,
                    r.ip,
                    f"MAC {r.mac} is reported by machines with different serials",
                    mac=r.mac,
                    machines=_describe([other, work]),
                )
            continue
        reg.set(other, "mac", None)
        other.note(
            _finding(
                FindingKind.MAC_REASSIGNED,
                r.ip,
                f"MAC {r.mac} now belongs to {work.name} (serial {r.serial or 'unread'})",
                mac=r.mac,
                to_machine=work.name,
            )
        )
    reg.set(work, "mac", r.mac)


def _take_ip(reg: _Register, work: _Work, ip: str) -> None:
    """An IP belongs to one machine: whoever held it before no longer has a known address."""
    for other in reg.with_ip(ip):
        if other is not work:
            reg.set(other, "current_ip", None)
    reg.set(work, "current_ip", ip)


# --- entry points --------------------------------------------------------------------------------


def reconcile(
    identities: Sequence[IdentityRecord],
    register: Iterable[RegisterView],
    *,
    received_at: datetime,
    site_id: int | None = None,
    agent_id: str | None = None,
    live_window: timedelta = timedelta(minutes=15),
    new_id: Callable[[], str] = new_machine_id,
) -> list[Decision]:
    """Decide what ``identities`` mean for the ``register`` entries they could touch.

    ``register`` must hold every machine sharing a serial, MAC or IP with a record.
    ``received_at`` caps observation times (an agent clock running fast cannot make a
    machine seen in the future); ``live_window`` is how recently a machine must have been
    seen elsewhere for a conflicting identity to count as a duplicate rather than a swap;
    ``new_id`` names new machines (injected so tests are deterministic).
    """
    reg = _Register(register, new_id)
    ordered = sorted(enumerate(identities), key=lambda pair: (pair[1].observed_at, pair[0]))
    readings = _completed([_Reading.of(record, received_at) for _, record in ordered])
    dups = _BatchDuplicates.of(readings)
    alerts: list[Alert] = []
    unusable: set[str] = set()
    for reading in readings:
        work = _match(reg, reading, dups, live_window)
        if work is None:
            if reading.ip not in unusable:
                unusable.add(reading.ip)
                alerts.append(
                    Alert(
                        _finding(
                            FindingKind.IDENTITY_UNUSABLE,
                            reading.ip,
                            "identity has neither a readable serial nor a MAC; not placed",
                            ip=reading.ip,
                        )
                    )
                )
            continue
        _apply(reg, work, reading, site_id, agent_id, dups, live_window)
    decisions: list[Decision] = [_decide(work) for work in reg.works if work.touched]
    decisions.extend(alerts)
    return decisions


def _jsonable_state(state: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(state)
    out["hashboard_serials"] = list(out["hashboard_serials"])
    out["flags"] = sorted(out["flags"])
    return out


def _component_findings(
    initial: Mapping[str, Any], final: Mapping[str, Any], ip: str | None
) -> list[Finding]:
    """Swaps and firmware changes: the batch's net change to a machine's parts."""

    def changed(name: str) -> list[Any] | None:
        old, new = initial[name], final[name]
        return [old, new] if old and new and old != new else None

    out: list[Finding] = []
    swap = {name: pair for name in ("mac", "control_board_serial") if (pair := changed(name))}
    if swap:
        text = ", ".join(f"{k} {a} → {b}" for k, (a, b) in swap.items())
        out.append(
            _finding(FindingKind.CONTROL_BOARD_SWAP, ip, f"control board replaced: {text}", **swap)
        )
    old_boards, new_boards = initial["hashboard_serials"], final["hashboard_serials"]
    added = [s for s in new_boards if s not in old_boards]
    if old_boards and added:
        removed = [s for s in old_boards if s not in new_boards]
        text = f"in {', '.join(added)}; out {', '.join(removed) or '-'}"
        out.append(
            _finding(
                FindingKind.HASHBOARD_SWAP,
                ip,
                f"hashboards changed: {text}",
                added=added,
                removed=removed,
            )
        )
    if pair := changed("psu_serial"):
        out.append(
            _finding(
                FindingKind.PSU_SWAP, ip, f"PSU replaced: {pair[0]} → {pair[1]}", psu_serial=pair
            )
        )
    firmware = {name: pair for name in ("firmware", "firmware_version") if (pair := changed(name))}
    if firmware:
        text = ", ".join(f"{k} {a} → {b}" for k, (a, b) in firmware.items())
        out.append(
            _finding(FindingKind.FIRMWARE_CHANGED, ip, f"firmware changed: {text}", **firmware)
        )
    return out


def _net_findings(work: _Work) -> tuple[list[Finding], frozenset[FindingKind]]:
    """Flags count by their net change over the batch: a condition already open is not
    alerted again, and one that came and went within the batch (a serial read failing once
    among good reads) is no news."""
    before = work.view.flags if work.view else frozenset()
    after = work.flags
    raised = {id(f) for f in work.raised}
    findings: list[Finding] = []
    for finding in work.findings:
        if id(finding) in raised and (finding.kind in before or finding.kind not in after):
            continue
        findings.append(finding)
    resolves = frozenset(k for k in work.resolves if k in before and k not in after)
    return findings, resolves


def _decide(work: _Work) -> CreateMachine | UpdateMachine:
    findings, resolves = _net_findings(work)
    newly_unreadable = FindingKind.SERIAL_UNREADABLE in work.flags and (
        work.view is None or FindingKind.SERIAL_UNREADABLE not in work.view.flags
    )
    if newly_unreadable:  # matched by MAC only: a technician must confirm the serial
        work.state["serial_unconfirmed"] = True
    if work.view is None:
        fields = _jsonable_state(work.state)
        fields.update(
            lifecycle_state=LifecycleState.DISCOVERED,
            first_seen=work.first_seen,
            last_seen=work.last_seen,
        )
        fields["machine_id"] = work.machine_id
        return CreateMachine(machine_id=work.machine_id, fields=fields, findings=tuple(findings))
    view = work.view
    initial = _jsonable_state(_initial_state(view))
    final = _jsonable_state(work.state)
    changed = [name for name in _FIELDS if final[name] != initial[name]]
    findings[:0] = _component_findings(initial, final, work.ip)
    if view.current_ip and work.ip and work.ip != view.current_ip:
        findings.insert(
            0,
            _finding(
                FindingKind.MOVED,
                work.ip,
                f"moved {view.current_ip} → {work.ip}",
                from_ip=view.current_ip,
                to_ip=work.ip,
            ),
        )
    if view.site_id is not None and work.state["site_id"] != view.site_id:
        findings.insert(
            0,
            _finding(
                FindingKind.SITE_CHANGED,
                work.ip,
                "machine is now reported from another site",
                from_site=view.site_id,
                to_site=work.state["site_id"],
            ),
        )
    last_seen = work.last_seen if work.last_seen != view.last_seen else None
    return UpdateMachine(
        machine_pk=view.machine_pk,
        machine_id=view.machine_id,
        before={name: initial[name] for name in changed},
        after={name: final[name] for name in changed},
        last_seen=last_seen,
        findings=tuple(findings),
        resolves=resolves,
    )


def find_missing(
    register: Iterable[RegisterView], *, now: datetime, after: timedelta
) -> list[UpdateMachine]:
    """Machines in service that have not been seen for ``after``: flag each once."""
    decisions: list[UpdateMachine] = []
    for view in register:
        if view.lifecycle_state not in EXPECTED_ONLINE or FindingKind.MISSING in view.flags:
            continue
        if view.last_seen is not None and now - view.last_seen < after:
            continue
        seen = view.last_seen.isoformat() if view.last_seen else None
        flags = sorted(view.flags)
        decisions.append(
            UpdateMachine(
                machine_pk=view.machine_pk,
                machine_id=view.machine_id,
                before={"flags": flags},
                after={"flags": sorted({*flags, FindingKind.MISSING.value})},
                last_seen=None,
                findings=(
                    _finding(
                        FindingKind.MISSING,
                        view.current_ip,
                        f"not seen since {seen or 'ever'} (threshold {after})",
                        last_seen=seen,
                        ip=view.current_ip,
                    ),
                ),
            )
        )
    return decisions


def observation_may_matter(state: LifecycleState, flags: frozenset[str]) -> bool:
    """Cheap pre-test: False means :func:`check_observation` would return None for any poll."""
    return bool(flags) or state in (LifecycleState.DISCOVERED, LifecycleState.DECOMMISSIONED)


def check_observation(view: RegisterView, observation: Observation) -> UpdateMachine | None:
    """What one poll says about a known machine: back from missing, hashing unregistered.

    Returns None in the common case (nothing to flag or resolve).
    """
    ip = str(observation.ip)
    flags = set(view.flags)
    findings: list[Finding] = []
    resolves: set[FindingKind] = set()

    def resolve(kind: FindingKind) -> None:
        if kind in flags:
            flags.discard(kind)
            resolves.add(kind)

    def flag(kind: FindingKind, detail: str, **data: Any) -> None:
        if kind not in flags:
            flags.add(kind.value)
            findings.append(_finding(kind, ip, detail, **data))

    if observation.reachable and FindingKind.MISSING in flags:
        resolve(FindingKind.MISSING)
        findings.append(_finding(FindingKind.RETURNED, ip, "missing machine is reporting again"))
    hashing = bool(observation.is_mining)
    if view.lifecycle_state == LifecycleState.DISCOVERED and hashing:
        flag(
            FindingKind.UNREGISTERED_HASHING,
            "machine is hashing but has not been claimed into the register",
            hashrate_ths=observation.hashrate_ths,
        )
    elif FindingKind.UNREGISTERED_HASHING in flags and (
        view.lifecycle_state != LifecycleState.DISCOVERED or observation.is_mining is False
    ):
        resolve(FindingKind.UNREGISTERED_HASHING)
    if view.lifecycle_state == LifecycleState.DECOMMISSIONED and hashing:
        flag(
            FindingKind.DECOMMISSIONED_REAPPEARED,
            "a decommissioned machine is hashing",
            hashrate_ths=observation.hashrate_ths,
        )
    if not findings and not resolves:
        return None
    before = sorted(view.flags)
    after = sorted(flags)
    return UpdateMachine(
        machine_pk=view.machine_pk,
        machine_id=view.machine_id,
        before={"flags": before} if before != after else {},
        after={"flags": after} if before != after else {},
        last_seen=None,
        findings=tuple(findings),
        resolves=frozenset(resolves),
    )
