"""The demo's pure decisions: where the farm lives, who gets tampered with, who counts as
compliant by the simulator's true state. No I/O here, so tests need no farm."""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from contract import ApprovedPoolSet, PoolReading, assess_pools
from controller.worker_names import render_worker, worker_facts
from simulator.farm import host_capacity

DEMO_SITE = "demo-site"
DEMO_LICENCE = "KZ-DM-DEMO-0001"
DEMO_ACCOUNT = "kzfarm01"
DEMO_TEMPLATE = "{account}.{serial}"
DEMO_POOLS = (
    "stratum+tcp://btc.dmp-alpha.example:3333",
    "stratum+tcp://btc-backup.dmp-alpha.example:3333",
    "stratum+tcp://btc.dmp-alpha.example:443",
)
FOREIGN_SHARE = 0.10
MALWARE_SHARE = 0.02
UNWRITABLE_FAULTS = frozenset(
    {"offline", "blackhole", "password_changed", "write_ignored", "write_after_reboot",
     "hidden_pool", "flapping"}
)  # fmt: skip
"""Faults that keep a miner from being corrected by any pool write: excluded from 'writable'."""


def farm_subnet(miners: int, base: str = "127.77.0.0") -> ipaddress.IPv4Network:
    """The smallest loopback network that holds ``miners`` (plus network, broadcast and the
    reserved 127.x.0.1 kept free for host services)."""
    if not 1 <= miners <= 60_000:
        raise ValueError("the demo runs 1 to 60,000 miners")
    for prefix in range(30, 15, -1):
        subnet = ipaddress.IPv4Network(f"{base}/{prefix}", strict=False)
        if host_capacity(subnet) >= miners:
            return subnet
    raise ValueError(f"{miners} miners do not fit in a /16")


@dataclass(frozen=True)
class Tampering:
    """Who starts on a foreign pool, and who carries persistent malware."""

    foreign: tuple[str, ...]
    malware: tuple[str, ...]


def choose_tampering(ips: Sequence[str], seed: int) -> Tampering:
    """10% on a foreign pool, 2% (at least one) with malware; disjoint, the same for a seed."""
    rng = random.Random(f"demo:{seed}")
    shuffled = list(ips)
    rng.shuffle(shuffled)
    n_malware = max(1, round(MALWARE_SHARE * len(ips))) if len(ips) >= 10 else 0
    n_foreign = max(1, round(FOREIGN_SHARE * len(ips)))
    malware = tuple(sorted(shuffled[:n_malware]))
    foreign = tuple(sorted(shuffled[n_malware : n_malware + n_foreign]))
    return Tampering(foreign=foreign, malware=malware)


def approved_set() -> ApprovedPoolSet:
    return ApprovedPoolSet(
        name="DMP Alpha", accreditation_ref="DMP-KZ-0007", urls=list(DEMO_POOLS),
        account=DEMO_ACCOUNT,
    )  # fmt: skip


@dataclass(frozen=True)
class TruthSummary:
    """The farm by the simulator's true state, against the approved set."""

    miners: int
    writable: int
    writable_compliant: int
    registered: int
    off_pool: tuple[str, ...]

    @property
    def all_compliant(self) -> bool:
        return self.writable > 0 and self.writable_compliant == self.writable

    @property
    def percent(self) -> float:
        return 100.0 * self.writable_compliant / self.writable if self.writable else 0.0


def expected_worker(machine: Mapping[str, Any] | None) -> str | None:
    """The worker the controller's rule gives a machine (None: not in the register yet)."""
    if machine is None:
        return None
    facts = worker_facts(
        account=DEMO_ACCOUNT, site=DEMO_SITE, machine_id=machine.get("machine_id"),
        reported_serial=machine.get("reported_serial"), label_serial=machine.get("label_serial"),
        rack=machine.get("rack"), container=machine.get("container"),
        shelf=machine.get("shelf"), slot=machine.get("slot"),
    )  # fmt: skip
    return render_worker(DEMO_TEMPLATE, facts)


def summarise_truth(
    true_miners: Iterable[Mapping[str, Any]], register_by_ip: Mapping[str, Mapping[str, Any]]
) -> TruthSummary:
    """Count writable miners whose *true* runtime pools pass the approved-pool rule."""
    approved = approved_set()
    total = writable = good = registered = 0
    off: list[str] = []
    for miner in true_miners:
        total += 1
        ip = str(miner["ip"])
        machine = register_by_ip.get(ip)
        registered += machine is not None
        if UNWRITABLE_FAULTS & set(miner.get("faults", {})):
            continue
        writable += 1
        worker = expected_worker(machine)
        readings = [
            PoolReading(url=p["url"], user=p["user"]) for p in miner.get("runtime_pools", [])
        ]
        if worker is not None and assess_pools(approved, worker, readings).compliant:
            good += 1
        else:
            off.append(ip)
    return TruthSummary(total, writable, good, registered, tuple(off))
