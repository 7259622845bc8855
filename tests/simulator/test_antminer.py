"""Stock Antminer personality, checked with unmodified pyasic 0.79.0 as the client.

Every assertion compares what pyasic reports with the simulator's true state: a fleet
tool built on pyasic must not be able to tell these miners from real S19j Pro / S19 XP /
S21 / T21 units on stock firmware.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pyasic
import pytest
from pyasic.config import MinerConfig, PoolConfig
from pyasic.errors import APIError

from simulator import faults as fault_ops
from simulator.personalities.antminer import REALM
from simulator.state import Fault, MinerState, Mode
from tests.conftest import FarmFactory, first

# model -> (pyasic class, pyasic model string, chips per board)
EXPECTED = {
    "Antminer S19j Pro": ("BMMinerS19jPro", "S19j Pro", 126),
    "Antminer S19 XP": ("BMMinerS19XP", "S19 XP", 110),
    "Antminer S21": ("BMMinerS21", "S21", 108),
    "Antminer T21": ("BMMinerT21", "T21", 108),
}
NEW_POOLS = [
    {"url": f"stratum+tcp://{host}.approved.example:3333", "user": "farm7.rig01", "password": "x"}
    for host in ("btc", "btc-eu")
]
MINERS = 12  # with the fixture's seed this farm holds every model


async def antminer(farm: FarmFactory, model: str | None = None) -> tuple[MinerState, Any]:
    """A stock Antminer from a fresh farm and the pyasic object that identified it."""
    shard = await farm(miners=MINERS, mix="antminer=1", restart_seconds=2.0)
    miner = first(shard, personality="antminer", model=model)
    client = await pyasic.get_miner(miner.ip)
    assert client is not None, f"pyasic did not identify {miner.ip}"
    return miner, client


def true_pools(miner: MinerState) -> list[tuple[str, str]]:
    return [(p.url, p.user) for p in miner.pools]


def reported_pools(data: Any) -> list[tuple[str, str]]:
    return [(str(p.url), p.user) for p in data.pools if p.url is not None]


async def rpc(ip: str, request: dict[str, Any]) -> dict[str, Any]:
    """One raw cgminer request, read to EOF as pyasic does."""
    reader, writer = await asyncio.open_connection(ip, 4028)
    writer.write(json.dumps(request).encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    reply: dict[str, Any] = json.loads(raw.rstrip(b"\x00"))
    return reply


# --- identification and reads ---------------------------------------------------------------------


@pytest.mark.parametrize("model", list(EXPECTED))
async def test_get_data_matches_true_state(farm: FarmFactory, model: str) -> None:
    miner, client = await antminer(farm, model)
    cls, short_model, chips = EXPECTED[model]

    data = await client.get_data()
    truth = miner.as_dict(time.time())

    assert type(client).__name__ == cls
    assert (data.make, data.model, data.firmware) == ("AntMiner", short_model, "Stock")
    assert data.serial_number == miner.serial
    assert data.mac == miner.mac
    assert data.hostname == miner.hostname
    assert data.fw_ver == miner.firmware_version
    assert reported_pools(data) == true_pools(miner)
    assert [p.active for p in data.pools] == [True, False, False]
    assert float(data.hashrate) == pytest.approx(truth["hashrate_ths"], rel=0.07)
    assert float(data.expected_hashrate) == pytest.approx(miner.nominal_ths, rel=0.01)
    assert [b.serial_number for b in data.hashboards] == [b.serial for b in miner.hashboards]
    assert [b.chips for b in data.hashboards] == [chips] * 3
    assert data.is_mining is truth["is_mining"] is True
    assert len(data.fans) == 4 and all(f.speed and f.speed > 1000 for f in data.fans)
    assert data.uptime == pytest.approx(truth["uptime_s"], abs=2)
    assert data.errors == []
    assert data.fault_light is False


# --- writes through the web UI --------------------------------------------------------------------


async def test_pool_write_applies_and_restarts_the_mining_process(farm: FarmFactory) -> None:
    miner, client = await antminer(farm)
    config = await client.get_config()  # read-modify-write keeps fan and work mode
    config.pools = PoolConfig.simple(NEW_POOLS)

    await client.send_config(config)

    assert true_pools(miner) == [(p["url"], p["user"]) for p in NEW_POOLS]
    assert miner.mode is Mode.NORMAL
    assert miner.is_restarting(time.time()) and not miner.is_hashing(time.time())
    during = await client.get_data(include=["pools", "hashrate", "hashboards", "is_mining"])
    assert reported_pools(during) == true_pools(miner)
    assert float(during.hashrate) == 0
    # pyasic derives is_mining from bitmain-work-mode only, so a restarting miner still says True
    assert during.is_mining is True

    await asyncio.sleep(miner.restart_seconds + 0.3)
    after = await client.get_data(include=["hashrate", "is_mining"])
    assert miner.is_hashing(time.time())
    truth = miner.telemetry(time.time()).hashrate_ths
    assert float(after.hashrate) == pytest.approx(truth, rel=0.07)
    assert after.is_mining is True


async def test_wrong_password_rejects_the_write_and_keeps_state(farm: FarmFactory) -> None:
    miner, _ = await antminer(farm)
    fault_ops.inject(miner, Fault.PASSWORD_CHANGED, {"password": "n0t-root"}, time.time())
    before, writes = true_pools(miner), miner.writes

    client = await pyasic.get_miner(miner.ip)  # still identified: 401 realm + RPC version
    assert type(client).__name__ == EXPECTED[miner.model][0]
    await client.send_config(MinerConfig(pools=PoolConfig.simple(NEW_POOLS)))

    assert true_pools(miner) == before
    assert miner.writes == writes
    assert miner.is_hashing(time.time())
    data = await client.get_data(include=["serial_number", "pools"])
    assert data.serial_number is None  # get_system_info.cgi answers 401
    assert reported_pools(data) == before  # RPC needs no password

    client.web.pwd = "n0t-root"  # the real password makes the same write go through
    await client.send_config(MinerConfig(pools=PoolConfig.simple(NEW_POOLS)))
    assert true_pools(miner) == [(p["url"], p["user"]) for p in NEW_POOLS]


async def test_sleep_and_resume(farm: FarmFactory) -> None:
    miner, client = await antminer(farm)
    pools = true_pools(miner)

    assert await client.stop_mining()
    assert miner.mode is Mode.SLEEP and not miner.is_hashing(time.time())
    asleep = await client.get_data(include=["is_mining", "hashrate", "config"])
    assert asleep.is_mining is False
    assert float(asleep.hashrate) == 0
    assert asleep.config.mining_mode.mode == "sleep"
    assert true_pools(miner) == pools

    assert await client.resume_mining()
    assert miner.as_dict(time.time())["mode"] == Mode.NORMAL
    assert miner.is_restarting(time.time())
    await asyncio.sleep(miner.restart_seconds + 0.3)
    awake = await client.get_data(include=["is_mining", "hashrate"])
    assert miner.is_hashing(time.time())
    assert awake.is_mining is True and float(awake.hashrate) > 0.9 * miner.nominal_ths


async def test_fault_light(farm: FarmFactory) -> None:
    miner, client = await antminer(farm)
    assert await client.fault_light_on() is True
    assert miner.blinking
    fresh = await pyasic.get_miner(miner.ip)
    assert (await fresh.get_data(include=["fault_light"])).fault_light is True
    assert await client.fault_light_off() is False
    assert not miner.blinking


async def test_reboot(farm: FarmFactory) -> None:
    miner, client = await antminer(farm)
    assert await client.reboot() is True
    assert miner.as_dict(time.time())["up"] is False


# --- state faults as pyasic sees them ------------------------------------------------------------


async def test_serial_missing(farm: FarmFactory) -> None:
    miner, client = await antminer(farm)
    fault_ops.inject(miner, Fault.SERIAL_MISSING, {}, time.time())
    data = await client.get_data(include=["serial_number", "mac"])
    assert not data.serial_number
    assert data.mac == miner.mac


async def test_hidden_pool_shows_only_in_runtime_pools(farm: FarmFactory) -> None:
    miner, client = await antminer(farm)
    fault_ops.inject(miner, Fault.HIDDEN_POOL, {}, time.time())
    hidden = miner.faults[Fault.HIDDEN_POOL]["pool"]

    data = await client.get_data(include=["pools", "config"])

    assert len(data.pools) == 4  # stock always has 3 slots: a 4th is the malware signature
    assert reported_pools(data)[-1] == (hidden["url"], hidden["user"])
    assert [p.active for p in data.pools] == [False, False, False, True]
    configured = [(p.url, p.user) for p in data.config.pools.groups[0].pools if p.url]
    assert configured == true_pools(miner)


async def test_dead_hashboard(farm: FarmFactory) -> None:
    miner, client = await antminer(farm)
    fault_ops.inject(miner, Fault.DEAD_HASHBOARD, {"board": 1}, time.time())

    data = await client.get_data(include=["hashboards", "hashrate", "errors"])

    dead = data.hashboards[1]
    assert (dead.chips, float(dead.hashrate)) == (0, 0)
    assert dead.serial_number == miner.hashboards[1].serial
    assert all(b.chips and float(b.hashrate) > 0 for b in (data.hashboards[0], data.hashboards[2]))
    truth = miner.telemetry(time.time()).hashrate_ths
    assert float(data.hashrate) == pytest.approx(truth, rel=0.07)
    assert [e.error_message for e in data.errors] == ["Low hashrate"]


# --- wire quirks pyasic depends on (or tolerates) ------------------------------------------------


async def test_rpc_access_control_and_quirks(farm: FarmFactory) -> None:
    miner, client = await antminer(farm, "Antminer S21")

    with pytest.raises(APIError, match="Access denied to 'devdetails' command"):
        await client.rpc.send_command("devdetails")
    with pytest.raises(APIError, match="Access denied to 'addpool' command"):
        await client.rpc.send_command("addpool", parameter="stratum+tcp://x.example:3333,u,p")
    with pytest.raises(APIError, match="Invalid command"):
        await client.rpc.send_command("estatz")

    devs = await client.rpc.devs()
    assert "Tenperature" in devs["DEVS"][0]

    await client.send_config(MinerConfig(pools=PoolConfig.simple(NEW_POOLS[:1])))
    pools = (await client.rpc.pools())["POOLS"]
    assert len(pools) == 3 and all("Pool Stale%%" in p for p in pools)
    assert [(p["URL"], p["Status"]) for p in pools[1:]] == [("", "Deed"), ("", "Deed")]

    legacy = await rpc(miner.ip, {"command": "stats", "parameter": {"new_api": True}})
    assert legacy["STATUS"][0]["Msg"] == "CGMiner stats" and len(legacy["STATS"]) == 2
    assert legacy["STATS"][0]["Type"] == miner.model
    new = await client.rpc.stats(new_api=True)
    assert [c["sn"] for c in new["STATS"][0]["chain"]] == [b.serial for b in miner.hashboards]

    joined = await rpc(miner.ip, {"command": "version+devdetails"})
    assert joined["version"][0]["VERSION"][0]["Type"] == miner.model
    assert joined["devdetails"][0]["STATUS"][0]["Code"] == 45


async def test_web_digest_and_probe_paths(farm: FarmFactory) -> None:
    miner, _ = await antminer(farm)
    base = f"http://{miner.ip}"
    async with httpx.AsyncClient() as http:
        index = await http.get(f"{base}/")
        assert index.status_code == 401
        assert f'realm="{REALM}"' in index.headers["www-authenticate"]
        assert 'qop="auth"' in index.headers["www-authenticate"]

        root = httpx.DigestAuth("root", "root")
        brief = await http.get(f"{base}/kaonsu/v1/brief", auth=root)
        assert brief.status_code == 404
        with pytest.raises(ValueError):
            brief.json()

        info = await http.get(f"{base}/cgi-bin/get_system_info.cgi", auth=root)
        assert info.json()["serinum"] == miner.serial

        wrong = await http.get(
            f"{base}/cgi-bin/get_system_info.cgi", auth=httpx.DigestAuth("root", "admin")
        )
        assert wrong.status_code == 401 and "www-authenticate" in wrong.headers
