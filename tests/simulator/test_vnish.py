"""VNish (AnthillOS) on Antminer, checked with unmodified pyasic 0.79.0 as the client.

Every assertion compares what pyasic (or a raw HTTP/RPC call a user would make) reports
with the simulator's true state. pyasic quirks that real VNish triggers are asserted as such:
no serial number, no hostname, and ``stop_mining``/``resume_mining`` raising although the
miner obeyed (the firmware answers those with an empty 200 body).
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
from pyasic.device.firmware import MinerFirmware
from pyasic.errors import APIError
from pyasic.miners.factory import MinerFactory, MinerTypes

from simulator import faults as fault_ops
from simulator.personalities.vnish import DEVFEE_KEY
from simulator.state import Fault, MinerState, Mode
from tests.conftest import FarmFactory, first

# model -> (pyasic class, chips per board, firmware version)
EXPECTED = {
    "Antminer S19j Pro": ("VNishS19jPro", 126, "1.2.6"),
    "Antminer S19 XP": ("VNishS19XP", 110, "1.2.6"),
    "Antminer S21": ("VNishS21", 108, "1.2.7"),
}
MINERS, SEED = 6, 7  # this farm holds every model (asserted in vnish())
NEW_POOLS = [
    {"url": "stratum+tcp://btc.approved-pool.example:3333", "user": "farm7.rig01", "password": "x"},
    # VNish's own UI form: host:port, the scheme implied
    {"url": "btc-eu.approved-pool.example:3333", "user": "farm7.rig01", "password": "x"},
]
CANONICAL_NEW = [
    ("stratum+tcp://btc.approved-pool.example:3333", "farm7.rig01"),
    ("stratum+tcp://btc-eu.approved-pool.example:3333", "farm7.rig01"),
]


async def vnish(farm: FarmFactory, model: str | None = None) -> tuple[MinerState, Any]:
    """A VNish miner from a fresh farm and the pyasic object that identified it."""
    shard = await farm(miners=MINERS, mix="vnish=1", seed=SEED, restart_seconds=2.0)
    assert {m.model for m in shard.miners.values()} == set(EXPECTED)
    miner = first(shard, personality="vnish", model=model)
    client = await pyasic.get_miner(miner.ip)
    assert client is not None, f"pyasic did not identify {miner.ip}"
    return miner, client


def true_pools(miner: MinerState) -> list[tuple[str, str]]:
    return [(p.url, p.user) for p in miner.pools]


def reported_user_pools(data: Any) -> list[tuple[str, str]]:
    return [(str(p.url), p.user) for p in data.pools if p.url is not None]


async def rpc_raw(ip: str, command: str) -> str:
    """One raw cgminer request read to EOF, as pyasic's socket probe does."""
    reader, writer = await asyncio.open_connection(ip, 4028)
    writer.write(json.dumps({"command": command}).encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return raw.rstrip(b"\x00").decode()


async def unlock(http: httpx.AsyncClient, ip: str, password: str) -> httpx.Response:
    return await http.post(f"http://{ip}/api/v1/unlock", json={"pw": password})


# --- identification ---------------------------------------------------------------------------


async def test_every_model_is_identified_as_vnish_every_time(farm: FarmFactory) -> None:
    shard = await farm(miners=MINERS, mix="vnish=1", seed=SEED)
    for model, (cls, _, _) in EXPECTED.items():
        miner = first(shard, model=model)
        # repeated, concurrent identifications: the web/socket race must never pick "stock"
        clients = await asyncio.gather(*(pyasic.get_miner(miner.ip) for _ in range(6)))
        assert [type(c).__name__ for c in clients] == [cls] * 6
        assert all(c.firmware == MinerFirmware.VNISH for c in clients)

        # both race arms classify as VNish: the socket arm cannot see "Antminer"
        version = await rpc_raw(miner.ip, "version")
        devdetails = await rpc_raw(miner.ip, "devdetails")
        assert "ANTMINER" not in version.upper() and "ANTMINER" not in devdetails.upper()
        assert MinerFactory._parse_socket_type(version) is MinerTypes.VNISH
        async with httpx.AsyncClient() as http:
            index = await http.get(f"http://{miner.ip}/")
        assert index.status_code == 200 and "AnthillOS" in index.text


# --- reads --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", list(EXPECTED))
async def test_get_data_matches_true_state(farm: FarmFactory, model: str) -> None:
    miner, client = await vnish(farm, model)
    _, chips, fw = EXPECTED[model]

    data = await client.get_data()
    now = time.time()
    truth = miner.as_dict(now)
    tel = miner.telemetry(now)

    assert (data.make, data.firmware, data.fw_ver) == ("AntMiner", "VNish", fw)
    assert data.mac == miner.mac  # /summary has no network block since 1.2.x; pyasic uses /info
    assert data.hostname is None  # pyasic quirk: _get_hostname never falls back to /info
    assert data.serial_number is None  # pyasic reads no serial for VNish (see test below)
    assert reported_user_pools(data) == true_pools(miner)
    assert [p.active for p in data.pools][:3] in ([True, False, False], [False, False, False])
    # the dev-fee slot shows as a 4th RPC pool with URL "DevFee" (PoolUrl None); it is not
    # one of the user's pools, and the simulator keeps it in extra
    fee = [p for p in data.pools if p.url is None]
    assert [(p.user, p.index) for p in fee] == [("DevFee", 3)]
    assert "DevFee" not in {p.url for p in miner.pools}
    assert miner.extra[DEVFEE_KEY]["pool_type"] == "DevFee"

    assert float(data.hashrate) == pytest.approx(truth["hashrate_ths"], rel=0.07)
    assert [b.chips for b in data.hashboards] == [chips] * 3
    board_rates = [float(b.hashrate) for b in data.hashboards]
    assert board_rates == pytest.approx(list(tel.board_ths), rel=0.07)
    assert data.wattage == pytest.approx(truth["power_w"], rel=0.05)
    assert data.wattage_limit is None  # preset "disabled" = stock clocks
    assert data.is_mining is truth["is_mining"] is True
    assert data.uptime == pytest.approx(truth["uptime_s"], abs=2)  # cgminer Elapsed
    assert len(data.fans) == 4 and all(f.speed and f.speed > 1000 for f in data.fans)
    assert data.errors == []


async def test_serial_numbers_are_on_the_rest_api(farm: FarmFactory) -> None:
    miner, client = await vnish(farm)
    assert (await client.get_data(include=["serial_number"])).serial_number is None

    base = f"http://{miner.ip}/api/v1"
    async with httpx.AsyncClient() as http:
        info = (await http.get(f"{base}/info")).json()  # no token needed
        assert info["serial"] == miner.serial
        assert info["system"]["network_status"]["mac"] == miner.mac
        assert (await http.get(f"{base}/model")).json()["serial"] == miner.serial
        factory = (await http.get(f"{base}/chains/factory-info")).json()
        assert factory["psu_serial"] == miner.psu_serial
        assert [c["serial"] for c in factory["chains"]] == [b.serial for b in miner.hashboards]

        fault_ops.inject(miner, Fault.SERIAL_MISSING, {}, time.time())
        assert (await http.get(f"{base}/info")).json()["serial"] == "N/A"


async def test_rest_auth_and_summary_shape(farm: FarmFactory) -> None:
    miner, _ = await vnish(farm, "Antminer S19j Pro")
    base = f"http://{miner.ip}/api/v1"
    async with httpx.AsyncClient() as http:
        denied = await http.get(f"{base}/summary")
        assert (denied.status_code, denied.content) == (401, b"")
        assert (await unlock(http, miner.ip, "root")).status_code == 403
        token = (await unlock(http, miner.ip, "admin")).json()["token"]
        assert len(token) == 32

        for header in (token, f"Bearer {token}"):  # pyasic sends it raw, the UI as Bearer
            ok = await http.get(f"{base}/summary", headers={"Authorization": header})
            assert ok.status_code == 200
        bad = await http.get(f"{base}/summary", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401

        summary = ok.json()
        assert list(summary) == ["miner"]
        body = summary["miner"]
        assert body["miner_type"] == "Antminer S19j Pro (Vnish 1.2.6)"
        assert body["miner_status"]["miner_state"] == "mining"
        assert [(p["url"], p["user"]) for p in body["pools"] if p["pool_type"] == "UserPool"] == [
            (url.removeprefix("stratum+tcp://"), user) for url, user in true_pools(miner)
        ]
        assert [p["pool_type"] for p in body["pools"]][-1] == "DevFee"
        assert body["devfee_percent"] == miner.extra[DEVFEE_KEY]["percent"]


async def test_rpc_shapes(farm: FarmFactory) -> None:
    miner, client = await vnish(farm, "Antminer S21")
    stats = await client.rpc.stats()
    assert stats["STATS"][0]["Type"] == "Antminer S21 (Vnish 1.2.7)"
    assert stats["STATUS"][0]["Description"] == "cgminer 4.11.1"
    pools = (await client.rpc.pools())["POOLS"]
    assert [(p["URL"], p["User"], p["Type"]) for p in pools] == [
        *((url, user, 0) for url, user in true_pools(miner)),
        ("DevFee", "DevFee", 1),
    ]
    with pytest.raises(APIError, match="Access denied to 'addpool' command"):
        await client.rpc.send_command("addpool", parameter="stratum+tcp://x.example:3333,u,p")


# --- writes -------------------------------------------------------------------------------------


async def test_send_config_rewrites_pools_and_restarts_mining(farm: FarmFactory) -> None:
    miner, client = await vnish(farm)
    config = await client.get_config()
    assert [(p.url, p.user) for p in config.pools.groups[0].pools] == true_pools(miner)
    config.pools = PoolConfig.simple(NEW_POOLS)

    await client.send_config(config)

    # the firmware stores host:port; the true state (and the RPC) keep the canonical URL
    assert true_pools(miner) == CANONICAL_NEW
    assert miner.is_restarting(time.time()) and not miner.is_hashing(time.time())
    async with httpx.AsyncClient() as http:
        token = (await unlock(http, miner.ip, "admin")).json()["token"]
        http.headers["Authorization"] = token
        settings = (await http.get(f"http://{miner.ip}/api/v1/settings")).json()
        summary = (await http.get(f"http://{miner.ip}/api/v1/summary")).json()
    assert [p["url"] for p in settings["miner"]["pools"]] == [
        "btc.approved-pool.example:3333",
        "btc-eu.approved-pool.example:3333",
        "",
    ]
    assert summary["miner"]["miner_status"]["miner_state"] == "restarting"
    during = await client.get_data(include=["pools", "hashrate", "is_mining"])
    assert reported_user_pools(during) == CANONICAL_NEW
    assert float(during.hashrate) == 0
    assert during.is_mining is True  # pyasic: only stopped/shutting-down/failure count as idle
    reread = await client.get_config()  # Pool.from_vnish re-adds the scheme: a clean round trip
    assert [(p.url, p.user) for p in reread.pools.groups[0].pools] == CANONICAL_NEW

    await asyncio.sleep(miner.restart_seconds + 0.3)
    after = await client.get_data(include=["hashrate", "is_mining"])
    assert miner.is_hashing(time.time()) and after.is_mining is True
    truth = miner.telemetry(time.time()).hashrate_ths
    assert float(after.hashrate) == pytest.approx(truth, rel=0.07)

    writes = miner.writes
    await client.send_config(reread)  # same pools again: saved, nothing to restart
    assert miner.writes == writes and not miner.is_restarting(time.time())


async def test_wrong_password_fails_the_write_and_keeps_state(farm: FarmFactory) -> None:
    miner, client = await vnish(farm)
    async with httpx.AsyncClient() as http:
        old_token = (await unlock(http, miner.ip, "admin")).json()["token"]
        fault_ops.inject(miner, Fault.PASSWORD_CHANGED, {"password": "n3w-pw"}, time.time())
        before, writes = true_pools(miner), miner.writes

        with pytest.raises(APIError, match="Could not authenticate"):
            await client.send_config(MinerConfig(pools=PoolConfig.simple(NEW_POOLS)))
        assert true_pools(miner) == before and miner.writes == writes
        assert miner.is_hashing(time.time())
        # the web half of get_data fails, and pyasic then fails the whole call
        with pytest.raises(APIError):
            await client.get_data()

        # sessions opened under the old password die with it; the new one unlocks
        summary = f"http://{miner.ip}/api/v1/summary"
        stale = await http.get(summary, headers={"Authorization": old_token})
        assert stale.status_code == 401
        assert (await unlock(http, miner.ip, "admin")).status_code == 403
        assert (await unlock(http, miner.ip, "n3w-pw")).status_code == 200

    client.web.pwd = "n3w-pw"
    await client.send_config(MinerConfig(pools=PoolConfig.simple(NEW_POOLS)))
    assert true_pools(miner) == CANONICAL_NEW


async def test_stop_and_resume_mining(farm: FarmFactory) -> None:
    miner, client = await vnish(farm)
    pools = true_pools(miner)

    # VNish answers /mining/stop with 200 and an empty body; pyasic's response.json() raises
    with pytest.raises(APIError, match="empty response"):
        await client.stop_mining()
    assert miner.mode is Mode.SLEEP and not miner.is_hashing(time.time())
    stopped = await client.get_data(include=["is_mining", "hashrate", "wattage"])
    assert stopped.is_mining is miner.as_dict(time.time())["is_mining"] is False
    assert float(stopped.hashrate) == 0
    assert stopped.wattage == round(miner.telemetry(time.time()).power_w)
    assert true_pools(miner) == pools

    with pytest.raises(APIError, match="empty response"):
        await client.resume_mining()
    assert miner.as_dict(time.time())["mode"] == Mode.NORMAL and miner.is_restarting(time.time())
    await asyncio.sleep(miner.restart_seconds + 0.3)
    running = await client.get_data(include=["is_mining", "hashrate"])
    assert miner.is_hashing(time.time())
    assert running.is_mining is True and float(running.hashrate) > 0.9 * miner.nominal_ths


# --- state faults as pyasic sees them -------------------------------------------------------------


async def test_dead_hashboard_and_hidden_pool(farm: FarmFactory) -> None:
    miner, client = await vnish(farm)
    fault_ops.inject(miner, Fault.DEAD_HASHBOARD, {"board": 1}, time.time())
    fault_ops.inject(miner, Fault.HIDDEN_POOL, {}, time.time())
    hidden = miner.faults[Fault.HIDDEN_POOL]["pool"]

    data = await client.get_data(include=["hashboards", "hashrate", "errors", "pools", "config"])

    dead = data.hashboards[1]  # chain_acn 0 / chain_rate 0: pyasic leaves them unset
    assert dead.missing is True and not dead.chips and not dead.hashrate
    assert all(b.chips and float(b.hashrate) > 0 for b in (data.hashboards[0], data.hashboards[2]))
    truth = miner.telemetry(time.time()).hashrate_ths
    assert float(data.hashrate) == pytest.approx(truth, rel=0.07)
    assert [e.error_message for e in data.errors] == ["Chain 2 failed: no chips found"]
    # the mining process runs the hidden pool; the saved settings do not show it
    assert reported_user_pools(data) == [*true_pools(miner), (hidden["url"], hidden["user"])]
    assert [(p.url, p.user) for p in data.config.pools.groups[0].pools] == true_pools(miner)
