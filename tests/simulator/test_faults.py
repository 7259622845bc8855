"""Every fault mode, observed from a client the way it would show on real hardware."""

from __future__ import annotations

import asyncio
import json
import time

import pyasic
import pytest
from pyasic.config.pools import Pool as PyasicPool
from pyasic.config.pools import PoolConfig

from simulator.faults import FOREIGN_POOL
from simulator.shard import Shard
from simulator.state import Fault
from tests.conftest import FarmFactory, first

APPROVED = [
    {"url": "stratum+tcp://approved.dmp.example:3333", "user": "acct.w1", "password": "x"},
    {"url": "stratum+tcp://approved2.dmp.example:3333", "user": "acct.w1", "password": "x"},
    {"url": "stratum+tcp://approved3.dmp.example:3333", "user": "acct.w1", "password": "x"},
]


async def rpc(ip: str, command: str, wait: float = 2.0) -> bytes:
    """One raw cgminer request; returns the raw reply bytes."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, 4028), wait)
    writer.write(json.dumps({"command": command}).encode())
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), wait)
    finally:
        writer.close()


async def connect_state(ip: str, port: int = 4028) -> str:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), 1.0)
    except ConnectionRefusedError:
        return "refused"
    writer.close()
    return "open"


async def write_pools_with_pyasic(ip: str, pools: list[dict[str, str]]) -> None:
    miner = await pyasic.get_miner(ip)
    assert miner is not None
    config = await miner.get_config()
    config.pools = PoolConfig.simple(
        [PyasicPool(url=p["url"], user=p["user"], password=p["password"]) for p in pools]
    )
    await miner.send_config(config)


async def antminer(farm: FarmFactory, **kwargs: object) -> tuple[Shard, str]:
    shard = await farm(miners=2, mix="antminer=1", **kwargs)
    return shard, first(shard).ip


async def test_offline_refuses_connections(farm: FarmFactory) -> None:
    shard, ip = await antminer(farm)
    await shard.inject_fault(ip, Fault.OFFLINE, {})
    assert await connect_state(ip, 4028) == "refused"
    assert await connect_state(ip, 80) == "refused"
    assert await pyasic.get_miner(ip) is None
    await shard.clear_fault(ip, Fault.OFFLINE)
    assert await connect_state(ip, 4028) == "open"


async def test_blackhole_accepts_and_never_answers(farm: FarmFactory) -> None:
    shard, ip = await antminer(farm)
    await shard.inject_fault(ip, Fault.BLACKHOLE, {})
    assert await connect_state(ip) == "open"
    with pytest.raises(TimeoutError):
        await rpc(ip, "version", wait=1.0)
    miner_object = await asyncio.wait_for(pyasic.get_miner(ip), 15)
    assert miner_object is None  # pyasic's factory gives up on a silent peer


async def test_slow_answers_late_but_correctly(farm: FarmFactory) -> None:
    shard, ip = await antminer(farm)
    await shard.inject_fault(ip, Fault.SLOW, {"seconds": 0.6})
    started = time.monotonic()
    reply = await rpc(ip, "version", wait=5)
    assert time.monotonic() - started >= 0.6
    assert json.loads(reply.rstrip(b"\x00"))["STATUS"][0]["STATUS"] == "S"


async def test_flapping_comes_and_goes(farm: FarmFactory) -> None:
    shard, ip = await antminer(farm)
    await shard.inject_fault(ip, Fault.FLAPPING, {"period": 0.6})
    seen = set()
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline and len(seen) < 2:
        seen.add(await connect_state(ip))
        await asyncio.sleep(0.1)
    assert seen == {"open", "refused"}


async def test_malformed_reply_is_not_json(farm: FarmFactory) -> None:
    shard, ip = await antminer(farm)
    await shard.inject_fault(ip, Fault.MALFORMED, {})
    reply = await rpc(ip, "summary")
    with pytest.raises(ValueError):
        json.loads(reply.rstrip(b"\x00"))
    miner = await pyasic.get_miner(ip)  # identification still works over the web UI
    assert miner is not None
    data = await miner.get_data(include=["hashrate", "pools"])
    assert data.pools == []


async def test_truncated_reply_stops_mid_json(farm: FarmFactory) -> None:
    shard, ip = await antminer(farm)
    healthy = await rpc(ip, "pools")
    await shard.inject_fault(ip, Fault.TRUNCATED, {})
    cut = await rpc(ip, "pools")
    assert 0 < len(cut) < len(healthy)
    assert healthy.startswith(cut)


async def test_oversized_reply_is_huge_but_valid(farm: FarmFactory) -> None:
    shard, ip = await antminer(farm)
    await shard.inject_fault(ip, Fault.OVERSIZED, {"bytes": 2_000_000})
    reply = await rpc(ip, "summary", wait=10)
    assert len(reply) >= 2_000_000
    assert "SUMMARY" in json.loads(reply.rstrip(b"\x00"))


async def test_changed_password_locks_out_default_credentials(farm: FarmFactory) -> None:
    shard, ip = await antminer(farm)
    miner_state = first(shard)
    before = [p.url for p in miner_state.pools]
    await shard.inject_fault(ip, Fault.PASSWORD_CHANGED, {"password": "hunter2"})
    miner = await pyasic.get_miner(ip)
    assert miner is not None  # RPC still identifies it
    data = await miner.get_data(include=["serial_number"])
    assert not data.serial_number
    await write_pools_with_pyasic(ip, APPROVED)
    assert [p.url for p in shard.miner(ip).pools] == before
    miner.web.pwd = "hunter2"
    data = await miner.get_data(include=["serial_number"])
    assert data.serial_number == shard.miner(ip).serial


async def test_write_silently_ignored(farm: FarmFactory) -> None:
    shard, ip = await antminer(farm)
    before = [p.url for p in shard.miner(ip).pools]
    await shard.inject_fault(ip, Fault.WRITE_IGNORED, {})
    await write_pools_with_pyasic(ip, APPROVED)
    assert [p.url for p in shard.miner(ip).pools] == before
    log = await shard.request_log(ip)
    assert any(e["write"] and "ignored" in e["detail"] for e in log)


async def test_write_applied_only_after_reboot(farm: FarmFactory) -> None:
    shard, ip = await antminer(farm, reboot_seconds=0.5)
    before = [p.url for p in shard.miner(ip).pools]
    await shard.inject_fault(ip, Fault.WRITE_AFTER_REBOOT, {})
    await write_pools_with_pyasic(ip, APPROVED)
    assert [p.url for p in shard.miner(ip).pools] == before
    await shard.reboot(ip)
    assert [p["url"] for p in APPROVED] == [p.url for p in shard.miner(ip).pools]


async def test_malware_reverts_pools_after_a_fix(farm: FarmFactory) -> None:
    shard, ip = await antminer(farm)
    await shard.inject_fault(ip, Fault.MALWARE, {"delay": 0.5})
    await write_pools_with_pyasic(ip, APPROVED)
    assert shard.miner(ip).pools[0].url == APPROVED[0]["url"]
    await asyncio.sleep(0.7)
    miner = await pyasic.get_miner(ip)
    assert miner is not None
    data = await miner.get_data(include=["pools"])
    assert data.pools[0].url is not None
    assert str(data.pools[0].url) == FOREIGN_POOL["url"]
    assert data.pools[0].user == FOREIGN_POOL["user"]


async def test_hidden_extra_pool_shows_only_at_runtime(farm: FarmFactory) -> None:
    shard, ip = await antminer(farm)
    await shard.inject_fault(ip, Fault.HIDDEN_POOL, {})
    miner = await pyasic.get_miner(ip)
    assert miner is not None
    data = await miner.get_data(include=["pools"])
    assert [p.user for p in data.pools][-1] == FOREIGN_POOL["user"]
    config = await miner.get_config()
    users = [p.user for group in config.pools.groups for p in group.pools]
    assert FOREIGN_POOL["user"] not in users


async def test_serial_missing(farm: FarmFactory) -> None:
    shard, ip = await antminer(farm)
    await shard.inject_fault(ip, Fault.SERIAL_MISSING, {})
    miner = await pyasic.get_miner(ip)
    assert miner is not None
    data = await miner.get_data(include=["serial_number", "mac"])
    assert not data.serial_number
    assert data.mac == shard.miner(ip).mac


async def test_duplicated_serial_reads_the_same_on_two_machines(farm: FarmFactory) -> None:
    shard = await farm(miners=2, mix="antminer=1")
    original, clone = list(shard.miners)
    await shard.inject_fault(
        clone, Fault.DUPLICATE_SERIAL, {"serial": shard.miner(original).serial}
    )
    serials = []
    for ip in (original, clone):
        miner = await pyasic.get_miner(ip)
        assert miner is not None
        serials.append((await miner.get_data(include=["serial_number"])).serial_number)
    assert serials[0] == serials[1] == shard.miner(original).serial


async def test_mac_change_after_control_board_swap(farm: FarmFactory) -> None:
    shard, ip = await antminer(farm)
    old_mac = shard.miner(ip).mac
    await shard.inject_fault(ip, Fault.MAC_CHANGE, {})
    miner = await pyasic.get_miner(ip)
    assert miner is not None
    data = await miner.get_data(include=["mac", "serial_number"])
    assert data.mac != old_mac
    assert data.mac == shard.miner(ip).mac
    assert data.serial_number == shard.miner(ip).serial  # the chassis serial stays


async def test_dead_hashboard_reads_zero(farm: FarmFactory) -> None:
    shard, ip = await antminer(farm)
    await shard.inject_fault(ip, Fault.DEAD_HASHBOARD, {"board": 1})
    miner = await pyasic.get_miner(ip)
    assert miner is not None
    data = await miner.get_data(include=["hashboards", "hashrate"])
    boards = {b.slot: b for b in data.hashboards}
    assert float(boards[1].hashrate) == 0.0
    assert float(boards[0].hashrate) > 0 and float(boards[2].hashrate) > 0
    assert float(data.hashrate) == pytest.approx(
        shard.miner(ip).telemetry(time.time()).hashrate_ths, rel=0.1
    )
