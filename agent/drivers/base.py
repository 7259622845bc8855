"""The one interface the agent uses to talk to miners, and the typed snapshots it returns.

Everything above ``agent/drivers`` sees :class:`MinerDriver` and these frozen dataclasses;
nothing above it imports pyasic or opens a socket. The small pure helpers here (MAC and pool
normalisation, the is-mining rule) are shared by every backend so that the pyasic path and the
fast path cannot drift apart.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from ipaddress import IPv4Address

from agent.errors import DriverError, Unsupported
from contract.compliance import DEVFEE_URL, bare_host
from contract.reports import IdentityRecord, Observation, PoolReading
from contract.text import clean_text, max_length
from firmware_profiles import ResolvedProfile

DEVFEE = "devfee"
USER = "user"
DEFAULT_SCHEME = "stratum+tcp://"
_HEX12 = re.compile(r"^[0-9A-Fa-f]{12}$")
_POOL_URL_MAX = max_length(PoolReading, "url")
_POOL_USER_MAX = max_length(PoolReading, "user")
_ERROR_MAX = max_length(Observation, "error")
_SERIAL_MAX = max_length(IdentityRecord, "serial")
_MAX_POOLS = max_length(Observation, "pools")
_MAX_BOARDS = max_length(IdentityRecord, "hashboard_serials")
_MAX_FANS = max_length(Observation, "fan_rpm")
_MAX_RPM = 1_000_000
_MAX_READING = 1e12  # no hashrate (TH/s), power (W) or temperature (°C) comes near this
_IDENTITY_TEXT = {
    name: max_length(IdentityRecord, name)
    for name in (
        "make", "model", "firmware", "firmware_version", "mac", "serial", "serial_source",
        "control_board_serial", "psu_serial", "hostname",
    )
}  # fmt: skip


def utcnow() -> datetime:
    return datetime.now(UTC)


# --- miner strings are data -----------------------------------------------------------------
# Every string a miner supplies passes through :func:`_clean` when a snapshot is built (in
# ``__post_init__``, so no backend can skip it): bounded to the contract's limit, NUL and
# invalid code points replaced, and each change noted in the snapshot's ``cleaned``.


def _clean(owner: object, name: str, limit: int, notes: list[str]) -> None:
    value = getattr(owner, name)
    if value is None:
        return
    result = clean_text(value if isinstance(value, str) else str(value), limit)
    notes.extend(f"{name}: {note}" for note in result.notes)
    if result.text != value:
        object.__setattr__(owner, name, result.text)


def _plausible(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and abs(value) < _MAX_READING


def _clean_tuple(
    values: Sequence[str], limit: int, notes: list[str], label: str
) -> tuple[str, ...]:
    out = []
    for n, value in enumerate(values, start=1):
        result = clean_text(value if isinstance(value, str) else str(value), limit)
        notes.extend(f"{label} {n}: {note}" for note in result.notes)
        out.append(result.text)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class MinerLogin:
    """Credentials for one firmware family (``password`` is its write login)."""

    username: str | None = None
    password: str | None = None


Credentials = Mapping[str, MinerLogin]
"""Logins keyed by credentials family: ``antminer``, ``whatsminer``, ``avalon``, ``vnish``."""


@dataclass(frozen=True, slots=True)
class PoolTarget:
    """A pool to write into one slot (passwords are written, never read back)."""

    url: str
    user: str
    password: str = "x"


@dataclass(frozen=True, slots=True)
class PoolStatus:
    """One pool as the miner reports it at run time."""

    url: str
    user: str
    status: str | None = None  # "alive" | "dead"
    active: bool | None = None
    kind: str = USER  # "user" | "devfee"
    cleaned: tuple[str, ...] = ()
    """What cleaning the miner's strings took (see :mod:`contract.text`); empty: nothing."""

    def __post_init__(self) -> None:
        notes = list(self.cleaned)
        _clean(self, "url", _POOL_URL_MAX, notes)
        _clean(self, "user", _POOL_USER_MAX, notes)
        object.__setattr__(self, "cleaned", tuple(dict.fromkeys(notes)))

    def to_reading(self) -> PoolReading:
        return PoolReading(
            url=self.url, user=self.user, status=self.status, active=self.active, kind=self.kind
        )


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a miner is. ``serial_source`` says where the serial came from (None: unreadable)."""

    ip: str
    make: str
    model: str
    firmware: str
    firmware_version: str | None
    mac: str | None
    serial: str | None
    serial_source: str | None
    family: str
    control_board_serial: str | None = None
    hashboard_serials: tuple[str, ...] = ()
    psu_serial: str | None = None
    hostname: str | None = None
    cleaned: tuple[str, ...] = ()
    """What cleaning the miner's strings took (see :mod:`contract.text`); empty: nothing."""

    def __post_init__(self) -> None:
        notes = list(self.cleaned)
        for name, limit in _IDENTITY_TEXT.items():
            _clean(self, name, limit, notes)
        boards = _clean_tuple(
            self.hashboard_serials[:_MAX_BOARDS], _SERIAL_MAX, notes, "hashboard serial"
        )
        object.__setattr__(self, "hashboard_serials", boards)
        object.__setattr__(self, "cleaned", tuple(dict.fromkeys(notes)))

    def to_record(self, observed_at: datetime | None = None) -> IdentityRecord:
        return IdentityRecord(
            ip=IPv4Address(self.ip),
            observed_at=observed_at or utcnow(),
            mac=self.mac,
            serial=self.serial,
            serial_source=self.serial_source,
            control_board_serial=self.control_board_serial,
            hashboard_serials=list(self.hashboard_serials),
            psu_serial=self.psu_serial,
            make=self.make,
            model=self.model,
            firmware=self.firmware,
            firmware_version=self.firmware_version,
            hostname=self.hostname,
        )


@dataclass(frozen=True, slots=True)
class PollSnapshot:
    """The hot fields of one poll. ``reachable=False`` or ``error`` set means it failed."""

    ip: str
    observed_at: datetime
    reachable: bool
    error: str | None = None
    is_mining: bool | None = None
    hashrate_ths: float | None = None
    power_w: float | None = None
    temperature_c: float | None = None
    fan_rpm: tuple[int, ...] = ()
    pools: tuple[PoolStatus, ...] = field(default_factory=tuple)
    cleaned: tuple[str, ...] = ()
    """What cleaning the miner's strings took, pools included (see :mod:`contract.text`)."""

    def __post_init__(self) -> None:
        notes = list(self.cleaned)
        _clean(self, "error", _ERROR_MAX, notes)
        for name in ("hashrate_ths", "power_w", "temperature_c"):
            value = getattr(self, name)
            if value is not None and not (
                isinstance(value, int | float)
                and math.isfinite(value)
                and abs(value) < _MAX_READING
            ):
                notes.append(f"{name}: {str(value)[:32]!r} is not a plausible number, ignored")
                object.__setattr__(self, name, None)
        fans = tuple(
            f for f in self.fan_rpm[:_MAX_FANS] if isinstance(f, int) and 0 <= f < _MAX_RPM
        )
        if len(fans) != len(self.fan_rpm):
            notes.append(f"fan_rpm: {len(self.fan_rpm) - len(fans)} implausible reading(s) ignored")
            object.__setattr__(self, "fan_rpm", fans)
        pools = tuple(self.pools[:_MAX_POOLS])
        if len(self.pools) > _MAX_POOLS:
            notes.append(f"pools: {len(self.pools)} reported, the first {_MAX_POOLS} kept")
        for n, pool in enumerate(pools, start=1):
            notes.extend(f"pool {n} {note}" for note in pool.cleaned)
        object.__setattr__(self, "pools", pools)
        object.__setattr__(self, "cleaned", tuple(dict.fromkeys(notes)))

    @classmethod
    def failed(
        cls, ip: str, error: DriverError, observed_at: datetime | None = None
    ) -> PollSnapshot:
        """A poll that produced no data; a malformed or refused reply still means 'reachable'."""
        reachable = error.kind in ("malformed", "auth_failed", "unsupported")
        return cls(
            ip=ip,
            observed_at=observed_at or utcnow(),
            reachable=reachable,
            error=f"{error.kind}: {error.reason}",
        )

    def to_observation(self, identity: Identity | None = None) -> Observation:
        return Observation(
            ip=IPv4Address(self.ip),
            observed_at=self.observed_at,
            reachable=self.reachable,
            error=self.error,
            mac=identity.mac if identity else None,
            serial=identity.serial if identity else None,
            is_mining=self.is_mining,
            hashrate_ths=None if self.hashrate_ths is None else max(0.0, self.hashrate_ths),
            power_w=None if self.power_w is None else max(0.0, self.power_w),
            temperature_c=self.temperature_c,
            fan_rpm=list(self.fan_rpm),
            pools=[p.to_reading() for p in self.pools],
        )


class MinerDriver(ABC):
    """One miner. Reads never raise from :meth:`poll`; everything else raises DriverError."""

    ip: str
    family: str
    profile: ResolvedProfile | None = None
    """What this miner's firmware (and model, once identified) can do; None when no profile
    matches its family: callers then assume no write is known to work."""

    @abstractmethod
    async def identify(self) -> Identity:
        """Read identity (serial, MAC, board serials …): the slow cadence."""

    @abstractmethod
    async def poll(self) -> PollSnapshot:
        """Read the hot fields; failures come back as a snapshot with ``error`` set."""

    async def set_pools(self, pools: Sequence[PoolTarget]) -> None:
        raise Unsupported(f"{self.family} cannot set pools", ip=self.ip)

    async def set_power_target(self, watts: int) -> None:
        raise Unsupported(f"{self.family} has no power target", ip=self.ip)

    async def sleep(self) -> None:
        raise Unsupported(f"{self.family} cannot sleep", ip=self.ip)

    async def wake(self) -> None:
        raise Unsupported(f"{self.family} cannot wake", ip=self.ip)

    async def reboot(self) -> None:
        raise Unsupported(f"{self.family} cannot reboot", ip=self.ip)

    async def locate(self, on: bool) -> None:
        raise Unsupported(f"{self.family} has no locate light", ip=self.ip)


# --- pure helpers shared by every backend ------------------------------------------------------


def normalise_mac(raw: object) -> str | None:
    """``b4a2eb132cde`` / ``b4-a2-…`` / ``B4:A2:…`` -> ``B4:A2:EB:13:2C:DE``; junk -> None."""
    if not isinstance(raw, str):
        return None
    hexdigits = re.sub(r"[^0-9A-Fa-f]", "", raw)
    if not _HEX12.match(hexdigits) or len(raw.strip()) > 17:
        return None
    hexdigits = hexdigits.upper()
    return ":".join(hexdigits[i : i + 2] for i in range(0, 12, 2))


def normalise_pool_url(url: str) -> str:
    """The URL a miner will use: trimmed, ``stratum+tcp://`` when no scheme, no doubled scheme.

    VNish stores ``host:port`` and pyasic prefixes ``stratum+tcp://`` on read, which can double
    up on a read-modify-write; every write goes through here.
    """
    url = url.strip()
    if not url:
        return url
    while url.lower().startswith(DEFAULT_SCHEME + DEFAULT_SCHEME):
        url = url[len(DEFAULT_SCHEME) :]
    lowered = url.lower()
    if lowered.startswith(DEFAULT_SCHEME) and "://" in url[len(DEFAULT_SCHEME) :]:
        url = url[len(DEFAULT_SCHEME) :]  # stratum+tcp://stratum+ssl://… -> stratum+ssl://…
    if "://" not in url:
        url = DEFAULT_SCHEME + url
    return url


def pool_kind(url: str, user: str, pool_type: object = None) -> str:
    """VNish lists its dev fee as a pool whose URL is ``DevFee``. The URL alone decides (the
    same rule as :func:`contract.compliance.is_devfee`): a real URL with the user ``DevFee`` or
    a cgminer ``Type`` 1 is still a user pool, or malware could hide behind the name."""
    return DEVFEE if bare_host(url) == DEVFEE_URL else USER


def derive_is_mining(hashrate_ths: float | None, reported: bool | None) -> bool | None:
    """Hashing now = a positive current hashrate; the firmware's own flag only as a fallback.

    pyasic 0.79 reports Avalon as always mining, stock Antminer as mining while BMMiner
    restarts, and any offline miner as mining; the current hashrate does not lie that way.
    """
    if hashrate_ths is not None:
        return hashrate_ths > 0.0
    return reported


def hottest(values: Sequence[float | None]) -> float | None:
    """The hottest positive reading (0 and None mean 'no sensor')."""
    present = [float(v) for v in values if v is not None and v > 0]
    return max(present) if present else None
