"""The true state of one virtual miner, and how it evolves over time.

Everything a client can observe is derived from :class:`MinerState`. Personalities only
*render* it; they change it through the methods here (``write_pools``, ``set_mode``,
``reboot`` …) so that faults such as "write silently ignored" apply to every protocol
alike. Time is always passed in (``now``, seconds since the epoch) so that the
transitions are deterministic and testable without sleeping.
"""

from __future__ import annotations

import copy
import random
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

REQUEST_LOG_LENGTH = 500


class Mode(StrEnum):
    """Operating mode as the firmware understands it."""

    NORMAL = "normal"
    LOW = "low"
    HIGH = "high"
    SLEEP = "sleep"


class Fault(StrEnum):
    """Fault modes a miner can be given at start or at run time."""

    OFFLINE = "offline"
    BLACKHOLE = "blackhole"
    SLOW = "slow"
    FLAPPING = "flapping"
    MALFORMED = "malformed"
    TRUNCATED = "truncated"
    OVERSIZED = "oversized"
    PASSWORD_CHANGED = "password_changed"
    WRITE_IGNORED = "write_ignored"
    WRITE_AFTER_REBOOT = "write_after_reboot"
    MALWARE = "malware"
    HIDDEN_POOL = "hidden_pool"
    SERIAL_MISSING = "serial_missing"
    DUPLICATE_SERIAL = "duplicate_serial"
    MAC_CHANGE = "mac_change"
    DEAD_HASHBOARD = "dead_hashboard"
    HOSTILE_STRINGS = "hostile_strings"


# Mode -> (hashrate factor, power factor) relative to the model's nominal figures.
MODE_FACTORS: dict[Mode, tuple[float, float]] = {
    Mode.NORMAL: (1.0, 1.0),
    Mode.LOW: (0.72, 0.66),
    Mode.HIGH: (1.12, 1.2),
    Mode.SLEEP: (0.0, 0.0),
}
IDLE_POWER_W = 18.0  # control board and PSU standby while not hashing
RESTARTING_POWER_W = 160.0  # fans spun up while the mining process restarts
NOISE_BUCKET_S = 5.0  # telemetry noise is constant within a bucket, so reads agree


@dataclass
class Pool:
    """One pool slot as configured on the miner."""

    url: str
    user: str
    password: str = "x"

    def as_dict(self) -> dict[str, str]:
        return {"url": self.url, "user": self.user, "password": self.password}


@dataclass
class Hashboard:
    """A hashboard with its own serial, as the chassis carries it."""

    index: int
    serial: str
    chips: int
    nominal_ths: float


@dataclass
class Credentials:
    """What each protocol of the firmware asks for. Defaults are the vendor defaults."""

    web_user: str = "root"
    web_password: str = "root"
    api_password: str = "admin"


@dataclass(frozen=True)
class Telemetry:
    """What the sensors say at one instant."""

    hashing: bool
    hashrate_ths: float
    board_ths: tuple[float, ...]
    power_w: float
    board_temps: tuple[float, ...]
    chip_temps: tuple[float, ...]
    env_temp: float
    fan_rpms: tuple[int, ...]


@dataclass
class WriteOutcome:
    """What became of a configuration write, for the request log and the reply."""

    accepted: bool
    applied: bool
    detail: str


@dataclass
class MinerState:
    """The ground truth about one virtual miner."""

    ip: str
    personality: str
    make: str
    model: str
    firmware: str
    firmware_version: str
    serial: str
    mac: str
    hostname: str
    control_board_serial: str
    psu_serial: str
    hashboards: list[Hashboard]
    pools: list[Pool]
    nominal_ths: float
    nominal_w: float
    fan_count: int
    seed: int
    booted_at: float
    credentials: Credentials = field(default_factory=Credentials)
    mode: Mode = Mode.NORMAL
    power_limit_w: int | None = None
    api_write_enabled: bool = True
    blinking: bool = False
    restart_seconds: float = 20.0
    reboot_seconds: float = 30.0
    mining_resumes_at: float = 0.0
    faults: dict[Fault, dict[str, Any]] = field(default_factory=dict)
    pending_pools: list[Pool] | None = None
    malware_revert_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    request_log: deque[dict[str, Any]] = field(
        default_factory=lambda: deque(maxlen=REQUEST_LOG_LENGTH)
    )
    writes: int = 0

    # --- time --------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Apply transitions that are due by ``now`` (lazy; called on every access)."""
        if self.malware_revert_at is not None and now >= self.malware_revert_at:
            self.malware_revert_at = None
            params = self.faults.get(Fault.MALWARE, {})
            self.pools = [Pool(**p) for p in params.get("pools", [])] or self.pools
            self.mining_resumes_at = now + self.restart_seconds
            self.log(now, "malware", "pools", write=True, detail="pools reverted to a foreign pool")

    def is_up(self, now: float) -> bool:
        """Whether the miner accepts connections at all."""
        if Fault.OFFLINE in self.faults or now < self.booted_at:
            return False
        flapping = self.faults.get(Fault.FLAPPING)
        if flapping is not None:
            period = float(flapping.get("period", 10.0))
            started = float(flapping.get("since", 0.0))
            return int((now - started) // period) % 2 == 0
        return True

    def uptime(self, now: float) -> int:
        return max(0, int(now - self.booted_at))

    def is_hashing(self, now: float) -> bool:
        if self.mode is Mode.SLEEP or now < self.mining_resumes_at:
            return False
        if self.power_limit_w is not None and self.power_limit_w <= 0:
            return False
        return any(b.index not in self.dead_boards() for b in self.hashboards)

    def is_restarting(self, now: float) -> bool:
        return self.mode is not Mode.SLEEP and now < self.mining_resumes_at

    # --- what clients read ----------------------------------------------------------------

    def dead_boards(self) -> set[int]:
        fault = self.faults.get(Fault.DEAD_HASHBOARD)
        if fault is None:
            return set()
        return {int(fault.get("board", 0))}

    def reported_serial(self) -> str:
        """The chassis serial as the firmware reports it ('' when it cannot be read)."""
        return "" if Fault.SERIAL_MISSING in self.faults else self.serial

    def configured_pools(self) -> list[Pool]:
        """The pools in the saved configuration (what a config page shows)."""
        return list(self.pools)

    def runtime_pools(self) -> list[Pool]:
        """The pools the mining process reports, including a hidden one if malware added it."""
        pools = list(self.pools)
        hidden = self.faults.get(Fault.HIDDEN_POOL)
        if hidden is not None:
            pools.append(Pool(**hidden["pool"]))
        return pools

    def active_pool_index(self) -> int:
        """Index into :meth:`runtime_pools` of the pool receiving work."""
        if Fault.HIDDEN_POOL in self.faults:
            return len(self.pools)
        for index, pool in enumerate(self.pools):
            if pool.url:
                return index
        return 0

    def telemetry(self, now: float) -> Telemetry:
        """Sensor readings with seeded noise that is stable within a few seconds."""
        rng = random.Random(f"{self.seed}:{int(now // NOISE_BUCKET_S)}")
        hashing = self.is_hashing(now)
        dead = self.dead_boards()
        hr_factor, power_factor = MODE_FACTORS[self.mode]
        if self.power_limit_w is not None and self.power_limit_w > 0:
            limit_factor = min(1.0, self.power_limit_w / self.nominal_w)
            hr_factor = min(hr_factor, limit_factor**0.85)
            power_factor = min(power_factor, limit_factor)
        live_boards = [b for b in self.hashboards if b.index not in dead]
        board_ths = tuple(
            round(b.nominal_ths * hr_factor * rng.uniform(0.97, 1.03), 3)
            if hashing and b.index not in dead
            else 0.0
            for b in self.hashboards
        )
        if hashing and self.hashboards:
            share = len(live_boards) / len(self.hashboards)
            power = self.nominal_w * power_factor * share * rng.uniform(0.98, 1.02)
        elif self.is_restarting(now):
            power = RESTARTING_POWER_W
        else:
            power = IDLE_POWER_W
        load = power / self.nominal_w
        env = round(24.0 + rng.uniform(-1.5, 1.5), 1)
        board_temps = tuple(
            round(env + (38.0 * load if b.index not in dead else 0.0) + rng.uniform(-2, 2), 1)
            for b in self.hashboards
        )
        chip_temps = tuple(
            round(t + (11.0 * load) + rng.uniform(0, 2), 1) if t > env else t for t in board_temps
        )
        if self.mode is Mode.SLEEP:
            fans = tuple(0 for _ in range(self.fan_count))
        else:
            base = 1800 + 4200 * min(load, 1.2)
            fans = tuple(
                int(base + rng.uniform(-120, 120)) // 10 * 10 for _ in range(self.fan_count)
            )
        return Telemetry(
            hashing=hashing,
            hashrate_ths=round(sum(board_ths), 3),
            board_ths=board_ths,
            power_w=round(power, 1),
            board_temps=board_temps,
            chip_temps=chip_temps,
            env_temp=env,
            fan_rpms=fans,
        )

    # --- what clients change ---------------------------------------------------------------

    def write_pools(self, pools: list[Pool], now: float, via: str) -> WriteOutcome:
        """Apply a pool write the way the firmware (and its faults) would."""
        self.writes += 1
        if Fault.WRITE_IGNORED in self.faults:
            self.log(now, via, "pools", write=True, detail="write acknowledged but ignored")
            return WriteOutcome(accepted=True, applied=False, detail="ignored")
        if Fault.WRITE_AFTER_REBOOT in self.faults:
            self.pending_pools = [copy.copy(p) for p in pools]
            self.log(now, via, "pools", write=True, detail="write saved; applies after reboot")
            return WriteOutcome(accepted=True, applied=False, detail="pending reboot")
        self.pools = [copy.copy(p) for p in pools]
        self.mining_resumes_at = now + self.restart_seconds
        malware = self.faults.get(Fault.MALWARE)
        if malware is not None and not self._is_foreign(pools, malware):
            self.malware_revert_at = now + float(malware.get("delay", 30.0))
        self.log(now, via, "pools", write=True, detail=_pools_detail(pools))
        return WriteOutcome(accepted=True, applied=True, detail="applied")

    def set_mode(self, mode: Mode, now: float, via: str) -> WriteOutcome:
        """Change the work mode; leaving or entering sleep restarts the mining process."""
        self.writes += 1
        if Fault.WRITE_IGNORED in self.faults:
            self.log(now, via, "mode", write=True, detail="write acknowledged but ignored")
            return WriteOutcome(accepted=True, applied=False, detail="ignored")
        previous = self.mode
        self.mode = mode
        if mode is not previous and mode is not Mode.SLEEP:
            self.mining_resumes_at = now + self.restart_seconds
        self.log(now, via, "mode", write=True, detail=f"{previous} -> {mode}")
        return WriteOutcome(accepted=True, applied=True, detail="applied")

    def set_power_limit(self, watts: int | None, now: float, via: str) -> WriteOutcome:
        self.writes += 1
        if Fault.WRITE_IGNORED in self.faults:
            self.log(now, via, "power_limit", write=True, detail="write acknowledged but ignored")
            return WriteOutcome(accepted=True, applied=False, detail="ignored")
        self.power_limit_w = watts
        self.log(now, via, "power_limit", write=True, detail=f"{watts} W")
        return WriteOutcome(accepted=True, applied=True, detail="applied")

    def reboot(self, now: float, via: str) -> None:
        """Go dark for ``reboot_seconds``; pending writes take effect; hashing resumes later."""
        self.log(now, via, "reboot", write=True)
        if self.pending_pools is not None:
            self.pools = self.pending_pools
            self.pending_pools = None
        self.booted_at = now + self.reboot_seconds
        self.mining_resumes_at = self.booted_at + self.restart_seconds

    def log(self, now: float, via: str, op: str, *, write: bool = False, detail: str = "") -> None:
        """Record one request in the per-miner log the control API exposes."""
        self.request_log.append(
            {"ts": round(now, 3), "via": via, "op": op, "write": write, "detail": detail}
        )

    def _is_foreign(self, pools: list[Pool], malware: dict[str, Any]) -> bool:
        foreign = {p["url"] for p in malware.get("pools", [])}
        return bool(pools) and pools[0].url in foreign

    # --- views -----------------------------------------------------------------------------

    def as_dict(self, now: float) -> dict[str, Any]:
        """The true state as the control API and the inventory file show it."""
        telemetry = self.telemetry(now)
        return {
            "ip": self.ip,
            "personality": self.personality,
            "make": self.make,
            "model": self.model,
            "firmware": self.firmware,
            "firmware_version": self.firmware_version,
            "serial": self.serial,
            "reported_serial": self.reported_serial(),
            "mac": self.mac,
            "hostname": self.hostname,
            "control_board_serial": self.control_board_serial,
            "psu_serial": self.psu_serial,
            "hashboards": [
                {
                    "index": b.index,
                    "serial": b.serial,
                    "chips": b.chips,
                    "nominal_ths": b.nominal_ths,
                    "dead": b.index in self.dead_boards(),
                }
                for b in self.hashboards
            ],
            "pools": [p.as_dict() for p in self.pools],
            "runtime_pools": [p.as_dict() for p in self.runtime_pools()],
            "pending_pools": (
                None if self.pending_pools is None else [p.as_dict() for p in self.pending_pools]
            ),
            "mode": str(self.mode),
            "power_limit_w": self.power_limit_w,
            "nominal_ths": self.nominal_ths,
            "nominal_w": self.nominal_w,
            "up": self.is_up(now),
            "is_mining": telemetry.hashing,
            "restarting": self.is_restarting(now),
            "hashrate_ths": telemetry.hashrate_ths,
            "power_w": telemetry.power_w,
            "uptime_s": self.uptime(now),
            "blinking": self.blinking,
            "api_write_enabled": self.api_write_enabled,
            "credentials": {
                "web_user": self.credentials.web_user,
                "web_password": self.credentials.web_password,
                "api_password": self.credentials.api_password,
            },
            "faults": {str(k): v for k, v in self.faults.items()},
            "writes": self.writes,
        }


def _pools_detail(pools: list[Pool]) -> str:
    return "; ".join(f"{p.url} {p.user}" for p in pools if p.url)
