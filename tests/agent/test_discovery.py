"""Discovery against a simulated farm: every live miner found and identified as it truly is,
offline ones not, vanished ones noticed; nothing outside the allowed segments is touched."""

from __future__ import annotations

from ipaddress import IPv4Network

import pytest

from agent.coordinator import PollCoordinator
from agent.discovery import Discovery, check_allowed, hosts, parse_network, probe
from agent.drivers import DriverOptions
from agent.drivers.base import normalise_mac, utcnow
from agent.drivers.factory import DriverFactory
from agent.errors import ScanRefused
from simulator.state import Fault
from tests.conftest import FarmFactory

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _network(shard_ips: list[str]) -> IPv4Network:
    return IPv4Network(shard_ips[0].rsplit(".", 1)[0] + ".0/24")


def _discovery(allowed: list[IPv4Network]) -> Discovery:
    factory = DriverFactory(options=DriverOptions(timeout=2.0), identify_timeout=4.0)
    return Discovery(factory, allowed, concurrency=64, probe_timeout_s=0.5)


async def test_scan_finds_every_live_miner_as_it_truly_is(farm: FarmFactory) -> None:
    shard = await farm(
        miners=10, mix="antminer=1,whatsminer=1,avalon=1,vnish=1", faults="offline=2"
    )
    net = _network(list(shard.miners))
    progress: list[tuple[str, int, int]] = []
    result = await _discovery([net]).scan([net], progress=lambda *a: progress.append(a))
    truth = {ip: m for ip, m in shard.miners.items()}
    offline = {ip for ip, m in truth.items() if Fault.OFFLINE in m.faults}
    assert len(offline) == 2
    assert result.probed == 254
    assert result.responded == set(truth) - offline
    assert set(result.found) == set(truth) - offline and result.failed == {}
    for ip, identity in result.found.items():
        true = truth[ip]
        assert (identity.make, identity.model, identity.firmware) == (
            true.make,
            true.model,
            true.firmware,
        ), ip
        assert normalise_mac(identity.mac) == normalise_mac(true.mac), ip
        if true.personality == "avalon":
            assert identity.serial is None  # Avalon's chassis serial is on the label only
        else:
            assert identity.serial == true.reported_serial(), ip
    assert progress[-1][0] == "identify" and progress[-1][1:] == (8, 8)
    assert ("probe", 254, 254) in progress


async def test_vanished_miners_are_reported_gone_then_dropped(farm: FarmFactory) -> None:
    shard = await farm(miners=6, mix="antminer=1,whatsminer=1")
    net = _network(list(shard.miners))
    discovery = _discovery([net])
    coordinator = PollCoordinator()
    result = await discovery.scan([net])
    decision = coordinator.apply_scan(
        [net], result.responded, result.found, result.failed, utcnow()
    )
    assert set(decision.added) == set(shard.miners) and decision.events == ()

    leaving = sorted(shard.miners)[:2]
    for ip in leaving:
        await shard.inject_fault(ip, Fault.OFFLINE.value, {})
    again = await discovery.scan([net], known=coordinator.ips)
    assert again.found == {}  # nothing new to identify: known miners are not re-identified
    decision = coordinator.apply_scan([net], again.responded, again.found, again.failed, utcnow())
    assert set(decision.gone) == set(leaving)
    assert {(e.kind, str(e.ip)) for e in decision.events} == {("miner_gone", ip) for ip in leaving}
    third = await discovery.scan([net], known=coordinator.ips)
    decision = coordinator.apply_scan([net], third.responded, third.found, third.failed, utcnow())
    assert set(decision.dropped) == set(leaving)
    assert coordinator.ips == set(shard.miners) - set(leaving)


async def test_unidentifiable_hosts_are_reported_with_the_reason(farm: FarmFactory) -> None:
    shard = await farm(miners=4, mix="antminer=1", faults="blackhole=1")
    net = _network(list(shard.miners))
    result = await _discovery([net]).scan([net])
    (blackholed,) = [ip for ip, m in shard.miners.items() if Fault.BLACKHOLE in m.faults]
    assert blackholed in result.responded  # it accepts connections ...
    assert set(result.failed) == {blackholed}  # ... but never answers
    assert result.failed[blackholed].startswith("timeout:")
    assert len(result.found) == 3


async def test_probe_tells_listening_from_closed() -> None:
    assert await probe("127.0.0.1", ports=(1,), timeout_s=0.5) is False


async def test_scan_refuses_segments_it_was_not_given() -> None:
    discovery = _discovery([IPv4Network("127.5.0.0/24")])
    with pytest.raises(ScanRefused, match="outside the allowed segments"):
        await discovery.scan([IPv4Network("127.5.1.0/24")])
    with pytest.raises(ScanRefused, match="outside"):
        await discovery.scan([IPv4Network("10.0.0.0/24")])


def test_check_allowed_and_parse_network() -> None:
    loopback = [IPv4Network("127.0.0.0/8")]
    check_allowed(IPv4Network("127.9.0.0/24"), loopback)
    check_allowed(IPv4Network("127.9.0.7/32"), loopback)
    for outside in ("10.0.0.0/24", "192.168.1.1/32", "8.8.8.0/24", "0.0.0.0/0"):
        with pytest.raises(ScanRefused):
            check_allowed(IPv4Network(outside), loopback)
    with pytest.raises(ScanRefused, match="wider than a /16"):
        check_allowed(IPv4Network("127.0.0.0/8"), loopback)
    assert parse_network("127.1.2.3") == IPv4Network("127.1.2.3/32")
    with pytest.raises(ScanRefused, match=r"did you mean 127\.1\.2\.0/24"):
        parse_network("127.1.2.3/24")
    with pytest.raises(ScanRefused, match="not an IPv4"):
        parse_network("miners.local")
    with pytest.raises(ScanRefused, match="IPv4"):
        parse_network("::1")
    assert list(hosts(IPv4Network("127.1.2.3/32"))) == ["127.1.2.3"]
    assert len(list(hosts(IPv4Network("127.1.2.0/24")))) == 254
