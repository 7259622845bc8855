"""Hostile miners: their strings are data, their replies are bounded (issue 10, items 3 and 8).

Each test first mounts the attack — through the simulator's ``hostile_strings`` and
``oversized`` faults (so it arrives over the real protocols, JSON escapes and all) or through a
raw hostile TCP peer on a loopback address of its own (an endless stream, a 100 MB reply,
binary garbage) — and then shows that it fails that one miner alone, with a named cause, while
the other miners of the same scan or cycle are still observed, and that no task of the hostile
miner's work outlives its budget.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig
from agent.daemon import FleetAgent
from agent.drivers import DriverFactory, DriverOptions, fastpath
from agent.drivers.base import Identity, PollSnapshot, PoolStatus
from agent.errors import DriverError, MalformedReply
from agent.outbox import Outbox
from contract.compliance import assess_pools
from contract.policy import ApprovedPoolSet
from contract.reports import Event, IdentityRecord, Observation
from contract.text import MARK, clean_text
from simulator.farm import DEFAULT_POOLS
from simulator.shard import Shard
from simulator.state import Fault
from tests.agent.test_enforce import Site, SiteFactory, site  # noqa: F401 (the fixture)
from tests.conftest import FarmFactory, first

MIX = "antminer=1,whatsminer=1,avalon=1,vnish=1"
LONG_SERIAL = "S" * 300 + "\ud800"
HOSTILE = {
    # personality: (field, value) — one attack per protocol the simulator speaks
    "antminer": ("serial", LONG_SERIAL),  # web JSON (get_system_info)
    "whatsminer": ("hostname", "rig\x00=cmd|' /C calc'!A0"),  # btminer RPC
    "vnish": ("serial", '\ud800\ud800=HYPERLINK("x")'),  # VNish REST
    "avalon": ("worker", "kzfarm01.\ud800"),  # cgminer RPC pools
}
PEER_NET = "127.83.0"
"""Raw hostile peers live here (no other test uses 127.83.0.0/16)."""
ASICFLEET = str(Path(sys.executable).with_name("asicfleet"))
SAFETY_S = 120.0
"""Only so that a regression fails the test instead of hanging it; nothing is timed."""


# --- helpers -------------------------------------------------------------------------------------


def outbox_items(outbox: Outbox) -> tuple[list[IdentityRecord], list[Observation], list[Event]]:
    batches = outbox.peek(100_000)
    return (
        [i for b in batches for i in b.identities],
        [o for b in batches for o in b.observations],
        [e for b in batches for e in b.events],
    )


def agent_for(net: str, tmp_path: Path, outbox: Outbox) -> FleetAgent:
    config = AgentConfig.model_validate(
        {
            "segments": [net],
            "data_dir": str(tmp_path),
            "controller": {"url": "http://127.0.0.1:9"},
            "polling": {"poll_interval_s": 20.0, "miner_timeout_s": 2.0},
        }
    )
    return FleetAgent(config, outbox)


def segment_of(shard: Shard) -> str:
    some = min(shard.miners, key=ipaddress.IPv4Address)
    return str(ipaddress.ip_network(f"{some}/24", strict=False))


def driver_tasks() -> set[asyncio.Task[Any]]:
    """Tasks still running on the agent's side: everything but this test, the simulated farm
    (aiohttp, simulator) and the hostile peer's own handlers."""
    left = set()
    for task in asyncio.all_tasks():
        if task is asyncio.current_task() or task.get_name().startswith("hostile-peer"):
            continue
        code = getattr(task.get_coro(), "cr_code", None)
        where = code.co_filename if code is not None else ""
        if "/aiohttp/" in where or f"{os.sep}simulator{os.sep}" in where:
            continue
        left.add(task)
    return left


async def inject_hostile(shard: Shard) -> dict[str, tuple[str, str]]:
    """The HOSTILE attack on the first miner of each personality: {ip: (field, value)}."""
    attacked = {}
    for personality, (field, value) in HOSTILE.items():
        miner = first(shard, personality=personality)
        await shard.inject_fault(miner.ip, Fault.HOSTILE_STRINGS, {"field": field, "value": value})
        attacked[miner.ip] = (field, value)
    return attacked


# --- the cleaning rule ---------------------------------------------------------------------------


def test_cleaning_is_bounded_marked_and_named() -> None:
    cleaned = clean_text("A\x00B\ud800" + "x" * 200, 128)
    assert len(cleaned.text) == 128 and cleaned.text.startswith(f"A{MARK}B{MARK}")
    assert cleaned.text.endswith(MARK)  # a cut value is marked too: it cannot pass as clean
    assert cleaned.notes == (
        "2 invalid character(s) replaced (NUL, lone surrogate)",
        "cut from 204 to 128 characters",
    )
    assert clean_text("=cmd|' /C calc'!A0", 64).notes == ()  # formula text is data, not ours
    identity = Identity(
        ip="127.0.0.1", make="AntMiner", model="S19\x00", firmware="stock",
        firmware_version=None, mac=None, serial=LONG_SERIAL, serial_source="web", family="x",
        hashboard_serials=("\ud800",),
    )  # fmt: skip
    assert identity.cleaned == (
        "model: 1 invalid character(s) replaced (NUL)",
        "serial: 1 invalid character(s) replaced (lone surrogate)",
        "serial: cut from 301 to 128 characters",
        "hashboard serial 1: 1 invalid character(s) replaced (lone surrogate)",
    )
    identity.to_record()  # the contract takes it (it refused the raw values)
    # The contract applies the same rule to whatever reaches it unbounded: cut, marked, noted.
    raw = IdentityRecord(ip="127.0.0.1", observed_at="2026-01-01T00:00Z", serial=LONG_SERIAL)  # type: ignore[arg-type]
    assert raw.serial == identity.serial
    assert raw.cleaned == [
        "serial: 1 invalid character(s) replaced (lone surrogate)",
        "serial: cut from 301 to 128 characters",
    ]


# --- item 3: miner strings are data --------------------------------------------------------------


async def test_hostile_strings_fail_no_scan_and_no_cycle(farm: FarmFactory, tmp_path: Path) -> None:
    shard = await farm(miners=8, mix=MIX)
    attacked = await inject_hostile(shard)
    with Outbox(tmp_path / "outbox.sqlite3") as outbox:
        agent = agent_for(segment_of(shard), tmp_path, outbox)
        scan = await agent.discover()
        assert scan.identified == 8 and scan.unidentified == 0  # nobody lost to one bad miner
        cycle = await agent.poll_cycle()
        assert (cycle.ok, cycle.failed, cycle.errors) == (8, 0, {})
        identities, observations, events = outbox_items(outbox)

    assert {str(i.ip) for i in identities} == set(shard.miners)
    assert {str(o.ip) for o in observations} == set(shard.miners)
    by_ip = {str(i.ip): i for i in identities}
    antminer = by_ip[first(shard, personality="antminer").ip]
    assert antminer.serial is not None and len(antminer.serial) == 128
    assert antminer.serial.startswith("S" * 100) and antminer.serial.endswith(MARK)
    vnish = by_ip[first(shard, personality="vnish").ip]
    assert vnish.serial == f'{MARK}{MARK}=HYPERLINK("x")'
    whatsminer = by_ip[first(shard, personality="whatsminer").ip]
    assert whatsminer.hostname == f"rig{MARK}=cmd|' /C calc'!A0"
    avalon_ip = first(shard, personality="avalon").ip
    (avalon,) = [o for o in observations if str(o.ip) == avalon_ip]
    assert avalon.pools[0].user == f"kzfarm01.{MARK}"

    # the cleaning is recorded: one event per attacked miner, naming the field and what was done
    cleaned = {str(e.ip): e for e in events if e.kind == "miner_data_cleaned"}
    assert set(cleaned) == set(attacked)
    for ip, (field, _) in attacked.items():
        notes = cleaned[ip].data["cleaned"]
        label = "pool 1 user" if field == "worker" else field
        assert any(n.startswith(f"{label}: ") for n in notes), notes
    assert "lone surrogate" in cleaned[antminer.ip.exploded].detail
    assert "cut from 301 to 128" in cleaned[antminer.ip.exploded].detail


async def test_cleaning_is_reported_once_not_every_cycle(farm: FarmFactory, tmp_path: Path) -> None:
    shard = await farm(miners=2, mix="avalon=1")
    miner = first(shard)
    await shard.inject_fault(miner.ip, Fault.HOSTILE_STRINGS, {"field": "worker", "value": "w\x00"})
    with Outbox(tmp_path / "outbox.sqlite3") as outbox:
        agent = agent_for(segment_of(shard), tmp_path, outbox)
        await agent.discover()
        for _ in range(3):
            await agent.poll_cycle()
        _, observations, events = outbox_items(outbox)
    assert [e.kind for e in events if e.ip is not None and str(e.ip) == miner.ip] == [
        "miner_data_cleaned"
    ]
    assert all(o.pools[0].user == f"w{MARK}" for o in observations if str(o.ip) == miner.ip)


async def test_unusable_kept_identity_fails_that_miner_alone(
    farm: FarmFactory, tmp_path: Path
) -> None:
    """The old crash: _failed() built a report from the bad identity outside the guard."""
    shard = await farm(miners=3, mix="antminer=1")
    with Outbox(tmp_path / "outbox.sqlite3") as outbox:
        agent = agent_for(segment_of(shard), tmp_path, outbox)
        await agent.discover()
        victim = first(shard).ip
        record = agent.coordinator.record_of(victim)
        assert record is not None and record.identity is not None
        # an identity that bypassed the boundary (e.g. a future backend's bug)
        object.__setattr__(record.identity, "serial", LONG_SERIAL)
        await shard.inject_fault(victim, Fault.OFFLINE, {})
        cycle = await agent.poll_cycle()
        assert cycle.ok == 2 and cycle.failed == 1
        # The contract cleans what the boundary missed: the miner's failure is its real cause.
        assert cycle.errors[victim].startswith("unreachable: "), cycle.errors[victim]
        assert "\n" not in cycle.errors[victim]
        _, observations, _ = outbox_items(outbox)
    assert {str(o.ip) for o in observations} == set(shard.miners)


async def test_lone_surrogate_worker_is_non_compliant_not_an_error(
    site: SiteFactory,  # noqa: F811 (the fixture imported above)
) -> None:
    s: Site = await site(miners=4)
    avalon = s.ips("avalon")[0]
    await s.shard.inject_fault(
        avalon, Fault.HOSTILE_STRINGS, {"field": "worker", "value": "kzfarm01.\ud800"}
    )
    await s.enforce()
    cycle = await s.cycle()  # the poll, then the enforcement pass over what it stored
    assert cycle.failed == 0 and cycle.errors == {}
    (drift,) = s.events("pool_drift", avalon)  # judged on its pools: it hides nothing
    assert any("worker" in p and MARK in p for p in drift.data["problems"]), drift.data
    polled = [o for b in s.outbox.peek(1000) for o in b.observations if str(o.ip) == avalon]
    approved = ApprovedPoolSet(name="DMP", urls=list(DEFAULT_POOLS), account="kzfarm01")
    verdict = assess_pools(approved, s.machines[avalon].worker, polled[0].pools)
    assert not verdict.compliant  # the controller's own rule says the same
    assert s.true_pools(avalon) == s.approved(avalon)  # and enforcement put it right


def test_a_cleaned_pool_reading_never_counts_as_compliant() -> None:
    approved = ApprovedPoolSet(name="DMP", urls=["stratum+tcp://dmp.example:3333"], account="a")
    for user in ("a.rig1\x00", "a.rig1\ud800", "a.rig1" + " " * 600 + "x"):
        pool = PoolStatus(url="stratum+tcp://dmp.example:3333", user=user)
        snapshot = PollSnapshot("127.0.0.1", datetime.now(UTC), reachable=True, pools=(pool,))
        assert snapshot.cleaned and snapshot.cleaned[0].startswith("pool 1 user: ")
        reading = snapshot.to_observation().pools
        assert not assess_pools(approved, "a.rig1", reading).compliant


# --- item 8: hostile replies bounded -------------------------------------------------------------


PeerMode = str  # "endless" | "huge" | "garbage"
HUGE_BYTES = 100 * 1024 * 1024
CHUNK = b"A" * 65536


async def _serve(
    mode: PeerMode, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    task = asyncio.current_task()
    assert task is not None
    task.set_name("hostile-peer")
    try:
        await asyncio.wait_for(reader.read(4096), timeout=2)
        if mode == "garbage":
            writer.write(bytes(range(256)) * 4)
        else:
            sent = 0
            writer.write(b'{"STATUS":[{"STATUS":"S","Msg":"')
            while mode == "endless" or sent < HUGE_BYTES:  # lazily: only what is read
                writer.write(CHUNK)
                sent += len(CHUNK)
                await writer.drain()
            writer.write(b'"}]}')
        await writer.drain()
    except (OSError, TimeoutError):
        pass
    finally:
        writer.close()


Peer = Callable[[str, PeerMode], Awaitable[str]]


@pytest.fixture
async def hostile_peer() -> AsyncIterator[Peer]:
    """``ip = await hostile_peer(ip, mode)``: a raw TCP peer on ports 4028 and 80."""
    servers: list[asyncio.Server] = []

    async def start(ip: str, mode: PeerMode) -> str:
        for port in (4028, 80):
            server = await asyncio.start_server(
                lambda r, w: _serve(mode, r, w), ip, port, reuse_address=True
            )
            servers.append(server)
        return ip

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


MODES = ["endless", "huge", "garbage"]


def peer_ip(mode: PeerMode) -> str:
    return f"{PEER_NET}.{10 + MODES.index(mode) + 10 * (os.getpid() % 20)}"


@pytest.mark.parametrize("mode", MODES)
async def test_identification_of_a_hostile_peer_ends_with_a_named_cause(
    hostile_peer: Peer, mode: PeerMode
) -> None:
    ip = await hostile_peer(peer_ip(mode), mode)
    before = driver_tasks()
    factory = DriverFactory(options=DriverOptions(timeout=1.0), identify_timeout=3.0)
    with pytest.raises(DriverError) as caught:
        await factory.create(ip)
    error = caught.value
    assert isinstance(error, MalformedReply), f"{error.kind}: {error.reason}"
    if mode != "garbage":
        assert "oversized" in error.reason
    # pyasic's probes were cancelled and their sockets closed before create() returned
    assert driver_tasks() - before == set()


async def test_oversized_simulator_miner_is_reported_oversized(farm: FarmFactory) -> None:
    shard = await farm(miners=4, mix=MIX)
    for personality in ("antminer", "whatsminer", "vnish", "avalon"):
        miner = first(shard, personality=personality)
        await shard.inject_fault(miner.ip, Fault.OVERSIZED, {"bytes": 64 * 1024 * 1024})
        factory = DriverFactory(options=DriverOptions(timeout=2.0), identify_timeout=4.0)
        with pytest.raises(MalformedReply, match="oversized"):
            await factory.create(miner.ip)
        await shard.clear_fault(miner.ip, Fault.OVERSIZED)
        drv = await factory.create(miner.ip)
        await shard.inject_fault(miner.ip, Fault.OVERSIZED, {"bytes": 64 * 1024 * 1024})
        for snapshot in (await drv.poll_fast(), await drv.poll_pyasic()):
            assert snapshot.error is not None and "oversized" in snapshot.error, snapshot.error
        with pytest.raises(MalformedReply, match="oversized"):
            await drv.identify()
        await shard.clear_fault(miner.ip, Fault.OVERSIZED)


async def _run_cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        ASICFLEET, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), SAFETY_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"asicfleet {' '.join(args)} did not return")
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("mode", MODES)
async def test_agent_poll_and_scan_return_on_a_hostile_peer(
    hostile_peer: Peer, mode: PeerMode
) -> None:
    ip = await hostile_peer(peer_ip(mode), mode)
    code, _, err = await _run_cli("agent", "poll", ip, "--timeout", "1")
    assert code != 0
    assert "Traceback" not in err
    assert err.startswith(f"error: {ip}: malformed: ")
    if mode != "garbage":
        assert "oversized" in err
    code, out, err = await _run_cli("agent", "scan", f"{ip}/32", "--timeout", "1", "--json")
    assert "Traceback" not in err
    assert out.strip() == "[]"
    assert f"{ip}: answers but could not be identified (malformed: " in err


async def test_daemon_cycle_survives_a_hostile_peer_in_its_segment(
    farm: FarmFactory, hostile_peer: Peer, tmp_path: Path
) -> None:
    shard = await farm(miners=3, mix="antminer=1,whatsminer=1,avalon=1")
    net = segment_of(shard)
    hostile = await hostile_peer(str(ipaddress.ip_network(net)[250]), "endless")
    with Outbox(tmp_path / "outbox.sqlite3") as outbox:
        agent = agent_for(net, tmp_path, outbox)
        scan = await agent.discover()
        assert scan.identified == 3 and scan.unidentified == 1
        before = driver_tasks()
        cycle = await agent.poll_cycle()  # the cycle tries to identify it again
        assert cycle.ok == 3 and cycle.failed == 1
        assert "oversized" in cycle.errors[hostile]
        assert driver_tasks() - before == set()  # nothing of its work left running
        _, observations, events = outbox_items(outbox)
    assert {str(o.ip) for o in observations} == set(shard.miners)
    (failed,) = [e for e in events if e.kind == "identify_failed" and str(e.ip) == hostile]
    assert "oversized" in failed.detail


async def test_a_mac_that_is_not_one_is_ignored_and_noted(farm: FarmFactory) -> None:
    shard = await farm(miners=4, mix=MIX)
    for personality in ("antminer", "whatsminer", "vnish", "avalon"):  # Avalon lowercases MACs
        miner = first(shard, personality=personality)
        await shard.inject_fault(
            miner.ip, Fault.HOSTILE_STRINGS, {"field": "mac", "value": "=cmd|\x00' /c calc'!a0"}
        )
        drv = await DriverFactory(options=DriverOptions(timeout=2.0)).create(miner.ip)
        identity = await drv.identify()
        assert identity.mac is None, personality
        assert identity.cleaned == (
            f"mac: \"=cmd|{MARK}' /c calc'!a0\" is not a MAC address, ignored",
        ), personality


def test_hostile_numbers_in_a_reply_are_bounded() -> None:
    """A fan count of 10^9 would build a billion-entry tuple; "inf" would reach int()."""
    stats = {"STATS": [{}, {"fan_num": 1e9, "fan1": "inf", "fan2": "nan", "fan3": 1e300,
                            "temp_num": "99999999", "temp2_1": "inf"}]}  # fmt: skip
    summary = {"SUMMARY": [{"GHS 5s": "nan"}]}
    pools = {"POOLS": [{"URL": "stratum+tcp://a:1", "User": "w", "Status": "Alive"}]}
    for family in ("antminer_stock", "vnish"):
        snapshot = fastpath.build_snapshot(
            "127.0.0.1", family, {"pools": pools, "summary": summary, "stats": stats},
            datetime.now(UTC),
        )  # fmt: skip
        assert len(snapshot.fan_rpm) == fastpath.MAX_COUNT
        assert snapshot.hashrate_ths is None and snapshot.temperature_c is None
        snapshot.to_observation()  # the contract takes it
    odd = PollSnapshot(
        "127.0.0.1", datetime.now(UTC), reachable=True, hashrate_ths=float("nan"),
        power_w=float("inf"), fan_rpm=(-5, 10**12, 4200),
    )  # fmt: skip
    assert (odd.hashrate_ths, odd.power_w, odd.fan_rpm) == (None, None, (4200,))
    assert odd.cleaned == (
        "hashrate_ths: 'nan' is not a plausible number, ignored",
        "power_w: 'inf' is not a plausible number, ignored",
        "fan_rpm: 2 implausible reading(s) ignored",
    )


def test_an_error_quoting_a_miner_is_clean_and_bounded() -> None:
    """Driver errors quote miners (a Msg, an exception's text) and end up in events."""
    error = MalformedReply("summary refused: \ud800\x00" + "M" * 5000, ip="127.0.0.1")
    assert error.reason.startswith(f"summary refused: {MARK}{MARK}MMM")
    assert len(error.reason) == 1000 and error.reason.endswith(MARK)
    snapshot = PollSnapshot.failed("127.0.0.1", error)
    Event(kind="identify_failed", at=datetime.now(UTC), detail=error.reason)  # contract takes it
    snapshot.to_observation()
