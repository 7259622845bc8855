"""Farm descriptions: parsing, validation, determinism (no sockets)."""

from __future__ import annotations

import ipaddress

import pytest

from simulator.errors import FarmSpecError
from simulator.farm import apportion, build_farm, farm_spec, host_addresses, host_capacity
from simulator.faults import parse_fault_spec
from simulator.state import Fault

NOW = 1_790_000_000.0


def test_same_seed_same_farm() -> None:
    spec = farm_spec(miners=60, seed=11, faults="malware=5%,blackhole=2")
    first = [m.as_dict(NOW) for m in build_farm(spec, now=NOW)]
    second = [m.as_dict(NOW) for m in build_farm(spec, now=NOW)]
    assert first == second


def test_other_seed_other_farm() -> None:
    a = build_farm(farm_spec(miners=20, seed=1), now=NOW)
    b = build_farm(farm_spec(miners=20, seed=2), now=NOW)
    assert [m.serial for m in a] != [m.serial for m in b]


def test_mix_is_honoured_exactly() -> None:
    miners = build_farm(farm_spec(miners=200, mix="antminer=60,whatsminer=25,avalon=10,vnish=5"))
    counts = {p: sum(1 for m in miners if m.personality == p) for p in ("antminer", "whatsminer")}
    assert counts == {"antminer": 120, "whatsminer": 50}
    assert sum(1 for m in miners if m.personality == "avalon") == 20
    assert sum(1 for m in miners if m.personality == "vnish") == 10


def test_serials_and_macs_are_unique_without_clone_faults() -> None:
    miners = build_farm(farm_spec(miners=500, seed=3))
    assert len({m.serial for m in miners}) == 500
    assert len({m.mac for m in miners}) == 500
    boards = [b.serial for m in miners for b in m.hashboards]
    assert len(set(boards)) == len(boards)


def test_addresses_are_sequential_loopback_and_skip_localhost() -> None:
    spec = farm_spec(miners=3, subnet="127.0.0.0/29")
    assert [m.ip for m in build_farm(spec)] == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert host_capacity(ipaddress.IPv4Network("127.10.0.0/16")) == 65534
    assert host_addresses(ipaddress.IPv4Network("127.10.0.0/30"), 5) == ["127.10.0.1", "127.10.0.2"]


def test_fault_fractions_and_counts() -> None:
    miners = build_farm(farm_spec(miners=200, faults="blackhole=1%,malware=2%,offline=3"))
    assert sum(Fault.BLACKHOLE in m.faults for m in miners) == 2
    assert sum(Fault.MALWARE in m.faults for m in miners) == 4
    assert sum(Fault.OFFLINE in m.faults for m in miners) == 3


def test_duplicate_serial_clones_another_miner() -> None:
    miners = build_farm(farm_spec(miners=30, faults="duplicate_serial=1"))
    clone = next(m for m in miners if Fault.DUPLICATE_SERIAL in m.faults)
    assert sum(1 for m in miners if m.serial == clone.serial) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"subnet": "10.0.0.0/24"}, "not inside 127.0.0.0/8"),
        ({"subnet": "192.168.1.0/24"}, "not inside 127.0.0.0/8"),
        ({"subnet": "banana"}, "is not a subnet"),
        ({"mix": "antminer=1,bitaxe=2"}, "unknown personality 'bitaxe'"),
        ({"mix": "antminer=0"}, "positive weight"),
        ({"miners": 300, "subnet": "127.10.0.0/24"}, "do not fit"),
        ({"miners": 0}, "at least 1"),
        ({"faults": "meteor=1%"}, "unknown fault 'meteor'"),
        ({"faults": "blackhole"}, "needs an amount"),
        ({"faults": "blackhole=150%"}, "0-100%"),
    ],
)
def test_bad_farm_descriptions_say_why(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"miners": 10} | kwargs
    with pytest.raises(FarmSpecError, match=message):
        farm_spec(**arguments)  # type: ignore[arg-type]


def test_fault_spec_accepts_dashes_and_counts() -> None:
    assert parse_fault_spec("serial-missing=2, slow=10%") == {
        Fault.SERIAL_MISSING: 2.0,
        Fault.SLOW: 0.1,
    }


def test_apportion_sums_exactly() -> None:
    assert sum(apportion(10_001, {"a": 1, "b": 1, "c": 1}).values()) == 10_001
