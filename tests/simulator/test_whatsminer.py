"""The Whatsminer (btminer API v2) personality, seen through unmodified pyasic 0.79.0.

Every check compares what pyasic reports or achieves with the simulator's true state.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from pyasic import get_miner
from pyasic.config import MinerConfig
from pyasic.config.pools import PoolConfig
from pyasic.errors import APIError
from pyasic.miners.backends.btminer import BTMinerV2

from simulator import faults as fault_ops
from simulator.personalities.whatsminer import PERSONALITY
from simulator.shard import WATCH_INTERVAL_S, Shard
from simulator.state import Fault, MinerState, Mode
from tests.conftest import FarmFactory, first

# Seed 2 with three Whatsminers yields one of each model (asserted below).
SEED = 2
EXPECTED_CLASSES = {
    "M30S++_VG30": "BTMinerM30SPlusPlusVG30",
    "M50S_VH30": "BTMinerM50SVH30",
    "M60S_VK10": "BTMinerM60SVK10",
}
NEW_POOLS = [
    {"url": "stratum+tcp://approved.pool.example:3333", "user": "farm.w1", "password": "x"},
    {"url": "stratum+tcp://approved-backup.pool.example:443", "user": "farm.w1", "password": "x"},
]


async def start(farm: FarmFactory, **kwargs: object) -> Shard:
    shard = await farm(miners=3, mix="whatsminer=1", seed=SEED, **kwargs)
    assert {m.model for m in shard.miners.values()} == set(EXPECTED_CLASSES)
    return shard


async def wait_for_boot(miner: MinerState) -> None:
    """Sleep through a reboot the miner started, until the shard has reopened its port."""
    await asyncio.sleep(max(0.0, miner.booted_at - time.time()) + 3 * WATCH_INTERVAL_S)
    assert miner.is_up(time.time())


async def test_each_model_is_identified_as_btminer_v2(farm: FarmFactory) -> None:
    shard = await start(farm)
    for miner in shard.miners.values():
        client = await get_miner(miner.ip)
        assert isinstance(client, BTMinerV2), miner.model
        assert type(client).__name__ == EXPECTED_CLASSES[miner.model]
        assert client.make == "WhatsMiner"
        assert str(client.model).startswith(miner.model.replace("_", " "))


@pytest.mark.parametrize("model", sorted(EXPECTED_CLASSES))
async def test_get_data_reports_the_true_state(farm: FarmFactory, model: str) -> None:
    shard = await start(farm)
    miner = first(shard, personality="whatsminer", model=model)
    client = await get_miner(miner.ip)
    data = await client.get_data()
    truth = miner.as_dict(time.time())

    assert data.serial_number == truth["serial"]
    assert data.mac == truth["mac"]
    assert [(str(p.url), p.user) for p in data.pools] == [
        (p["url"], p["user"]) for p in truth["runtime_pools"]
    ]
    assert data.hashrate is not None
    assert float(data.hashrate) == pytest.approx(truth["hashrate_ths"], rel=0.07)
    assert data.wattage == pytest.approx(truth["power_w"], rel=0.05)
    assert data.is_mining is truth["is_mining"] is True
    assert len(data.hashboards) == len(truth["hashboards"]) == 3
    assert [b.serial_number for b in data.hashboards] == [b["serial"] for b in truth["hashboards"]]
    assert data.fw_ver == truth["firmware_version"]


async def test_send_config_changes_pools_after_a_restart(farm: FarmFactory) -> None:
    shard = await start(farm, restart_seconds=2.0)
    miner = first(shard, model="M50S_VH30")
    client = await get_miner(miner.ip)

    await client.send_config(MinerConfig(pools=PoolConfig.simple(NEW_POOLS)))

    assert [(p.url, p.user) for p in miner.pools] == [(p["url"], p["user"]) for p in NEW_POOLS]
    right_after = await client.get_data(include=["hashrate", "pools", "is_mining"])
    assert right_after.hashrate is not None and float(right_after.hashrate) == 0.0
    assert miner.as_dict(time.time())["is_mining"] is False
    assert [(str(p.url), p.user) for p in right_after.pools] == [
        (p["url"], p["user"]) for p in NEW_POOLS
    ]

    await asyncio.sleep(miner.restart_seconds + 0.3)
    later = await client.get_data(include=["hashrate"])
    assert later.hashrate is not None and float(later.hashrate) > 0
    assert miner.as_dict(time.time())["is_mining"] is True


async def test_set_power_limit_applies_after_the_reboot(farm: FarmFactory) -> None:
    shard = await start(farm, reboot_seconds=1.0)
    miner = first(shard, model="M60S_VK10")
    client = await get_miner(miner.ip)

    assert await client.set_power_limit(3000) is True
    assert miner.power_limit_w == 3000

    await wait_for_boot(miner)
    for _ in range(20):  # the shard's watcher reopens the port within a few of its ticks
        data = await client.get_data(include=["wattage_limit"])
        if data.wattage_limit is not None:
            break
        await asyncio.sleep(WATCH_INTERVAL_S)
    assert data.wattage_limit == 3000


async def test_stop_and_resume_mining(farm: FarmFactory) -> None:
    shard = await start(farm, restart_seconds=1.0)
    miner = first(shard, model="M30S++_VG30")
    client = await get_miner(miner.ip)

    assert await client.stop_mining() is True
    assert miner.as_dict(time.time())["mode"] == "sleep"
    stopped = await client.get_data(include=["is_mining", "hashrate"])
    assert stopped.is_mining is miner.as_dict(time.time())["is_mining"] is False

    assert await client.resume_mining() is True
    assert miner.as_dict(time.time())["mode"] == "normal"
    await asyncio.sleep(miner.restart_seconds + 0.3)
    resumed = await client.get_data(include=["is_mining", "hashrate"])
    assert resumed.is_mining is miner.as_dict(time.time())["is_mining"] is True
    assert resumed.hashrate is not None and float(resumed.hashrate) > 0


async def test_changed_password_makes_writes_fail(farm: FarmFactory) -> None:
    shard = await start(farm)
    miner = first(shard, model="M50S_VH30")
    fault_ops.inject(miner, Fault.PASSWORD_CHANGED, {}, time.time())
    before = [(p.url, p.user) for p in miner.pools]
    client = await get_miner(miner.ip)

    await client.send_config(MinerConfig(pools=PoolConfig.simple(NEW_POOLS)))  # swallows
    assert await client.set_power_limit(3000) is False
    assert await client.stop_mining() is False
    with pytest.raises(APIError) as raised:
        await client.rpc.update_pools(NEW_POOLS[0]["url"], NEW_POOLS[0]["user"], "x")

    assert raised.value.message == "enc json load err"
    assert [(p.url, p.user) for p in miner.pools] == before
    assert miner.power_limit_w is None and miner.mode is Mode.NORMAL
    assert miner.writes == 0


async def test_disabled_write_api_refuses_writes(farm: FarmFactory) -> None:
    shard = await start(farm)
    miner = first(shard, model="M60S_VK10")
    miner.api_write_enabled = False
    before = [(p.url, p.user) for p in miner.pools]
    client = await get_miner(miner.ip)

    assert await client.set_power_limit(3000) is False
    assert await client.stop_mining() is False
    with pytest.raises(APIError) as raised:
        await client.rpc.update_pools(NEW_POOLS[0]["url"], NEW_POOLS[0]["user"], "x")

    assert raised.value.message == "can't access write cmd"
    assert [(p.url, p.user) for p in miner.pools] == before
    assert miner.power_limit_w is None and miner.mode is Mode.NORMAL
    assert miner.writes == 0
    data = await client.get_data(include=["serial_number", "hashrate"])  # reads still work
    assert data.serial_number == miner.serial


async def test_unreadable_serial_reads_as_empty(farm: FarmFactory) -> None:
    shard = await start(farm)
    miner = first(shard, model="M30S++_VG30")
    fault_ops.inject(miner, Fault.SERIAL_MISSING, {}, time.time())
    client = await get_miner(miner.ip)

    data = await client.get_data(include=["serial_number", "mac"])
    assert not data.serial_number
    assert data.mac == miner.mac


async def test_fault_light_and_dead_board(farm: FarmFactory) -> None:
    shard = await start(farm)
    miner = first(shard, model="M50S_VH30")
    fault_ops.inject(miner, Fault.DEAD_HASHBOARD, {"board": 1}, time.time())
    client = await get_miner(miner.ip)

    assert await client.fault_light_on() is True
    assert miner.blinking is True
    data = await client.get_data(include=["fault_light", "hashboards", "errors"])
    assert data.fault_light is True
    assert data.hashboards[1].hashrate is not None and float(data.hashboards[1].hashrate) == 0
    assert data.hashboards[1].chips == 0
    assert data.hashboards[1].serial_number == miner.hashboards[1].serial
    assert [e.error_code for e in data.errors] == [541]


async def test_unknown_command_gets_the_flat_error(farm: FarmFactory) -> None:
    shard = await start(farm)
    miner = first(shard, model="M60S_VK10")
    client = await get_miner(miner.ip)

    reply = await client.rpc.send_command("version", ignore_errors=True)
    assert reply["STATUS"] == "E" and reply["Code"] == 14 and reply["Msg"] == "invalid cmd"
    assert PERSONALITY.web_ports == ()
