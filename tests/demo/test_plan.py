"""The demo's pure decisions: farm subnet, who is tampered with, compliance by true state."""

from __future__ import annotations

import ipaddress

import pytest

from asicfleet.demo.plan import (
    DEMO_ACCOUNT,
    DEMO_POOLS,
    choose_tampering,
    expected_worker,
    farm_subnet,
    summarise_truth,
)
from simulator.farm import host_capacity


@pytest.mark.parametrize("miners", [1, 200, 253, 254, 1000, 5000])
def test_farm_subnet_is_the_smallest_that_fits(miners: int) -> None:
    subnet = farm_subnet(miners)
    assert subnet.subnet_of(ipaddress.IPv4Network("127.0.0.0/8"))
    assert host_capacity(subnet) >= miners
    smaller = ipaddress.IPv4Network(f"{subnet.network_address}/{subnet.prefixlen + 1}")
    assert subnet.prefixlen == 30 or host_capacity(smaller) < miners


def test_tampering_is_disjoint_deterministic_and_sized() -> None:
    ips = [f"127.77.0.{n}" for n in range(2, 202)]
    plan = choose_tampering(ips, seed=7)
    assert len(plan.foreign) == 20 and len(plan.malware) == 4
    assert not set(plan.foreign) & set(plan.malware)
    assert plan == choose_tampering(ips, seed=7)
    assert plan != choose_tampering(ips, seed=8)


def _miner(ip: str, url: str, user: str, faults: dict[str, object] | None = None) -> dict:
    urls = [url, *DEMO_POOLS[1:]]
    pools = [{"url": u, "user": user} for u in urls]
    return {"ip": ip, "runtime_pools": pools, "faults": faults or {}}


def test_truth_counts_only_writable_miners_on_the_approved_pools_with_their_worker() -> None:
    register = {
        "127.77.0.2": {"machine_id": "M1", "reported_serial": "SN1"},
        "127.77.0.3": {"machine_id": "M2", "reported_serial": None},  # Avalon: label only
        "127.77.0.4": {"machine_id": "M3", "reported_serial": "SN3"},
        "127.77.0.5": {"machine_id": "M4", "reported_serial": "SN4"},
    }
    miners = [
        _miner("127.77.0.2", DEMO_POOLS[0], f"{DEMO_ACCOUNT}.SN1"),
        _miner("127.77.0.3", DEMO_POOLS[0], f"{DEMO_ACCOUNT}.M2"),
        _miner("127.77.0.4", "stratum+tcp://pool.hijack.example:3333", f"{DEMO_ACCOUNT}.SN3"),
        _miner("127.77.0.5", "stratum+tcp://x.example:1", "x", {"password_changed": {}}),
        _miner("127.77.0.6", DEMO_POOLS[0], f"{DEMO_ACCOUNT}.SN6"),  # not registered yet
    ]
    truth = summarise_truth(miners, register)
    assert (truth.miners, truth.writable, truth.writable_compliant) == (5, 4, 2)
    assert truth.registered == 4
    assert truth.off_pool == ("127.77.0.4", "127.77.0.6")
    assert not truth.all_compliant
    assert expected_worker(register["127.77.0.3"]) == f"{DEMO_ACCOUNT}.M2"
