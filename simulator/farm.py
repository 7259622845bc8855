"""Describe a farm and build it: pure and deterministic (same seed, same farm)."""

from __future__ import annotations

import ipaddress
import itertools
import math
import random
import time
from dataclasses import dataclass, field

from simulator import faults as fault_ops
from simulator import personalities
from simulator.errors import FarmSpecError
from simulator.state import Fault, MinerState, Pool

LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
RESERVED = {ipaddress.ip_address("127.0.0.1")}  # control API and everything else on the host
DEFAULT_MIX = "antminer=60,whatsminer=25,avalon=10,vnish=5"
DEFAULT_ACCOUNT = "kzfarm01"
WORKER_NAMING = ("ip", "serial")
"""How the farm's pool workers are named at start: ``<account>.<ip octets>`` or
``<account>.<chassis serial>`` (a farm already on a ``{account}.{serial}`` worker rule)."""
DEFAULT_POOLS = (
    "stratum+tcp://btc.dmp-alpha.example:3333",
    "stratum+tcp://btc-backup.dmp-alpha.example:3333",
    "stratum+tcp://btc.dmp-alpha.example:443",
)


@dataclass(frozen=True)
class FarmSpec:
    """What to simulate. Validated on construction with :func:`farm_spec`."""

    miners: int
    mix: dict[str, float]
    subnet: ipaddress.IPv4Network
    seed: int
    faults: dict[Fault, float] = field(default_factory=dict)
    restart_seconds: float = 20.0
    reboot_seconds: float = 30.0
    account: str = DEFAULT_ACCOUNT
    worker_names: str = "ip"


def parse_mix(text: str) -> dict[str, float]:
    """``"antminer=60,whatsminer=25"`` -> weights per personality (any positive numbers)."""
    mix: dict[str, float] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        name, sep, weight = item.strip().partition("=")
        name = name.strip()
        personalities.get(name)  # raises FarmSpecError for an unknown one
        try:
            value = float(weight.rstrip("%")) if sep else 1.0
        except ValueError:
            raise FarmSpecError(f"bad weight {weight!r} for {name!r} in --mix") from None
        if value < 0:
            raise FarmSpecError(f"weight for {name!r} must not be negative")
        mix[name] = value
    if not mix or sum(mix.values()) <= 0:
        raise FarmSpecError("--mix needs at least one personality with a positive weight")
    return mix


def parse_subnet(text: str) -> ipaddress.IPv4Network:
    try:
        subnet = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise FarmSpecError(f"{text!r} is not a subnet like 127.10.0.0/16") from None
    if not isinstance(subnet, ipaddress.IPv4Network) or not subnet.subnet_of(LOOPBACK):
        raise FarmSpecError(
            f"subnet {text} is not inside 127.0.0.0/8; the simulator only listens on loopback"
        )
    return subnet


def farm_spec(
    miners: int,
    mix: str = DEFAULT_MIX,
    subnet: str = "127.10.0.0/16",
    seed: int = 7,
    faults: str = "",
    restart_seconds: float = 20.0,
    reboot_seconds: float = 30.0,
    worker_names: str = "ip",
) -> FarmSpec:
    """Parse and validate the command-line description of a farm."""
    if miners < 1:
        raise FarmSpecError("--miners must be at least 1")
    network = parse_subnet(subnet)
    capacity = host_capacity(network)
    if miners > capacity:
        raise FarmSpecError(f"{miners} miners do not fit in {network} (room for {capacity})")
    if restart_seconds < 0 or reboot_seconds < 0:
        raise FarmSpecError("restart and reboot delays must not be negative")
    if worker_names not in WORKER_NAMING:
        raise FarmSpecError(
            f"worker naming {worker_names!r} is not one of {', '.join(WORKER_NAMING)}"
        )
    return FarmSpec(
        miners=miners,
        mix=parse_mix(mix),
        subnet=network,
        seed=seed,
        faults=fault_ops.parse_fault_spec(faults),
        restart_seconds=restart_seconds,
        reboot_seconds=reboot_seconds,
        worker_names=worker_names,
    )


def host_addresses(subnet: ipaddress.IPv4Network, count: int) -> list[str]:
    """The first ``count`` miner addresses; 127.0.0.1 stays free for the host's own services."""
    hosts = subnet.hosts() if subnet.prefixlen < 31 else iter(subnet)
    usable = (str(a) for a in hosts if a not in RESERVED)
    return list(itertools.islice(usable, count))


def host_capacity(subnet: ipaddress.IPv4Network) -> int:
    """How many miners fit in ``subnet`` (without enumerating it)."""
    usable = subnet.num_addresses - (2 if subnet.prefixlen < 31 else 0)
    return usable - sum(1 for address in RESERVED if address in subnet)


def apportion(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Split ``total`` by ``weights`` with the largest-remainder method (sums exactly)."""
    weight_sum = sum(weights.values())
    quotas = {k: total * w / weight_sum for k, w in weights.items()}
    counts = {k: math.floor(q) for k, q in quotas.items()}
    leftover = total - sum(counts.values())
    for name in sorted(quotas, key=lambda k: quotas[k] - counts[k], reverse=True)[:leftover]:
        counts[name] += 1
    return counts


def build_farm(spec: FarmSpec, now: float | None = None) -> list[MinerState]:
    """Every miner's initial true state; the same spec always gives the same farm."""
    now = time.time() if now is None else now
    rng = random.Random(spec.seed)
    counts = apportion(spec.miners, spec.mix)
    kinds = [name for name, count in counts.items() for _ in range(count)]
    rng.shuffle(kinds)
    addresses = host_addresses(spec.subnet, spec.miners)
    miners: list[MinerState] = []
    for index, (ip, kind) in enumerate(zip(addresses, kinds, strict=True)):
        personality = personalities.get(kind)
        model = personality.models[rng.randrange(len(personality.models))]
        worker = f"{spec.account}.{ip.split('.', 1)[1].replace('.', 'x')}"
        pools = [Pool(url, worker, "x") for url in DEFAULT_POOLS]
        miner = personality.new_miner(rng, ip, model, pools, now)
        if spec.worker_names == "serial":  # as a farm whose worker rule is {account}.{serial}
            for pool in miner.pools:
                pool.user = f"{spec.account}.{miner.serial}"
        miner.restart_seconds = spec.restart_seconds
        miner.reboot_seconds = spec.reboot_seconds
        miner.extra["index"] = index
        miners.append(miner)
    _assign_start_faults(spec, miners, rng, now)
    return miners


def _assign_start_faults(
    spec: FarmSpec, miners: list[MinerState], rng: random.Random, now: float
) -> None:
    for fault, amount in spec.faults.items():
        count = round(amount * len(miners)) if amount < 1 else int(amount)
        if amount > 0 and count == 0:
            count = 1
        count = min(count, len(miners))
        for miner in rng.sample(miners, count):
            params = fault_ops.default_params(fault, rng, miner)
            if fault is Fault.DUPLICATE_SERIAL:
                donors = [m for m in miners if m is not miner]
                if not donors:
                    continue
                params["serial"] = rng.choice(donors).serial
            fault_ops.inject(miner, fault, params, now)
    for miner in miners:
        miner.request_log.clear()
