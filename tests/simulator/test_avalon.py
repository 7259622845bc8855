"""Canaan Avalon personality against unmodified pyasic 0.79.0, checked against the true state.

Real pyasic behaviour these tests pin down (each would be the same with a real miner):
- An A1366 is "AVALONMINER 1366" to pyasic, which has no class for it: it warns "Partially
  supported miner found" and falls back to ``AvalonUnknown`` (model "AvalonMiner (Stock)", no
  hashboards/fans, a generic algorithm that reports hashrate in H/s).
- pyasic has no ``is_mining`` source for Avalon, so ``MinerData.is_mining`` stays True even
  while the miner sleeps; the hashrate is what shows it stopped.
- The A1246 firmware (21072802) has no ``WALLPOWER`` token, so pyasic's wattage is None there.
- ``send_config`` is not implemented for Avalon: a silent no-op that leaves the pools alone.
- pyasic's ``ascset`` drops a falsy value, so ``set_power_limit(<=80)`` sends
  ``0,worklevel,set`` with no level; the firmware refuses it and pyasic returns False.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pyasic
import pytest
from pyasic.config import MinerConfig
from pyasic.config.pools import PoolConfig
from pyasic.miners.avalonminer import CGMinerAvalon1246
from pyasic.miners.backends import AvalonMiner

from simulator.shard import Shard
from simulator.state import Fault, MinerState, Mode
from tests.conftest import FarmFactory, first

A1246 = "AvalonMiner 1246"
A1366 = "AvalonMiner 1366"
# Sensor noise is redrawn every 5 s, so a read and the later true-state check may straddle two
# draws (each within +-3 %).
TOLERANCE = 0.07


async def raw_rpc(ip: str, command: str, parameter: str | None = None) -> tuple[bytes, Any]:
    """One cgminer request the way any client sends it; returns the raw bytes and the JSON."""
    reader, writer = await asyncio.open_connection(ip, 4028)
    request: dict[str, str] = {"command": command}
    if parameter is not None:
        request["parameter"] = parameter
    writer.write(json.dumps(request).encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), timeout=5)
    writer.close()
    return data, json.loads(data.rstrip(b"\x00"))


def mode_of(miner: MinerState) -> Mode:
    """The true mode, read afresh (keeps type checkers from narrowing across awaits)."""
    return miner.mode


def pyasic_mac(miner: MinerState) -> str:
    raw = miner.mac.replace(":", "").upper()
    return ":".join(raw[i : i + 2] for i in range(0, 12, 2))


async def avalon_farm(farm: FarmFactory) -> Shard:
    shard = await farm(miners=4, mix="avalon=1", restart_seconds=2, reboot_seconds=2)
    models = {m.model for m in shard.miners.values()}
    assert {A1246, A1366} <= models, models
    return shard


async def test_a1246_is_identified_as_its_pyasic_class(farm: FarmFactory) -> None:
    truth = first(await avalon_farm(farm), model=A1246)
    miner = await pyasic.get_miner(truth.ip)
    assert isinstance(miner, CGMinerAvalon1246)
    assert str(miner.make) == "AvalonMiner"
    assert str(miner.raw_model) == "Avalon 1246"
    assert str(miner.firmware) == "Stock"

    raw, version = await raw_rpc(truth.ip, "version")
    assert raw.endswith(b"}\x00")  # cgminer sends the terminating NUL
    row = version["VERSION"][0]
    assert row["PROD"] == truth.model
    assert row["MAC"] == truth.mac.replace(":", "").lower() and len(row["MAC"]) == 12
    assert row["DNA"] == truth.control_board_serial
    assert version["STATUS"][0]["Description"] == "cgminer 4.11.1"


async def test_a1366_falls_back_to_pyasics_generic_avalon(farm: FarmFactory) -> None:
    truth = first(await avalon_farm(farm), model=A1366)
    with pytest.warns(UserWarning, match="Partially supported miner found: AVALONMINER 1366"):
        miner = await pyasic.get_miner(truth.ip)
    assert type(miner).__name__ == "AvalonUnknown"
    assert isinstance(miner, AvalonMiner)
    assert str(miner.make) == "AvalonMiner"
    assert miner.raw_model is None
    assert miner.model == "AvalonMiner (Stock)"
    assert miner.expected_hashboards is None


async def test_a1246_get_data_matches_true_state(farm: FarmFactory) -> None:
    truth = first(await avalon_farm(farm), model=A1246)
    miner = await pyasic.get_miner(truth.ip)
    data = await miner.get_data()
    state = truth.as_dict(time.time())

    assert data.mac == pyasic_mac(truth)
    assert data.serial_number is None  # no chassis serial over the API …
    assert state["serial"]  # … though the label has one
    assert [(str(p.url), p.user) for p in data.pools] == [
        (p["url"], p["user"]) for p in state["runtime_pools"]
    ]
    assert [p.active for p in data.pools] == [True, False, False]
    assert data.hashrate is not None
    assert float(data.hashrate) == pytest.approx(state["hashrate_ths"], rel=TOLERANCE)
    assert len(data.hashboards) == 3
    board_ths = truth.telemetry(time.time()).board_ths
    for board, expected in zip(data.hashboards, board_ths, strict=True):
        assert not board.missing
        assert board.chips == 120
        assert board.hashrate is not None
        assert float(board.hashrate) == pytest.approx(expected, rel=TOLERANCE)
    assert data.wattage is None  # this firmware reports wall power only inside PS[…]
    assert data.wattage_limit == 3200  # MPO, as on the captured A1246
    assert len(data.fans) == 4 and all(f.speed for f in data.fans)
    assert data.is_mining is state["is_mining"] is True
    assert data.fault_light is False
    assert data.uptime is not None and abs(data.uptime - state["uptime_s"]) <= 20


async def test_a1366_get_data_matches_true_state(farm: FarmFactory) -> None:
    truth = first(await avalon_farm(farm), model=A1366)
    with pytest.warns(UserWarning):
        miner = await pyasic.get_miner(truth.ip)
    data = await miner.get_data()
    state = truth.as_dict(time.time())

    assert data.mac == pyasic_mac(truth)
    assert data.serial_number is None
    assert [(str(p.url), p.user) for p in data.pools] == [
        (p["url"], p["user"]) for p in state["runtime_pools"]
    ]
    assert data.hashrate is not None
    # The generic class has no algorithm: its hashrate comes back in H/s.
    assert float(data.hashrate) / 1e12 == pytest.approx(state["hashrate_ths"], rel=TOLERANCE)
    # WALLPOWER on this firmware
    assert data.wattage == pytest.approx(state["power_w"], rel=TOLERANCE)
    assert data.hashboards == [] and data.fans == []  # unknown model: nothing expected
    assert data.is_mining is state["is_mining"] is True


async def test_stop_and_resume_mining_change_the_true_state(farm: FarmFactory) -> None:
    shard = await avalon_farm(farm)
    truth = first(shard, model=A1246)
    miner = await pyasic.get_miner(truth.ip)

    assert await miner.stop_mining() is True
    assert mode_of(truth) is Mode.SLEEP
    assert truth.as_dict(time.time())["is_mining"] is False
    data = await miner.get_data(include=["hashrate", "is_mining", "wattage_limit"])
    assert data.hashrate is not None and float(data.hashrate) == 0.0
    assert data.is_mining is True  # pyasic has no source for it on Avalon (default True)

    assert await miner.resume_mining() is True
    assert mode_of(truth) is Mode.NORMAL
    assert truth.as_dict(time.time())["restarting"] is True
    await asyncio.sleep(truth.restart_seconds + 0.3)
    state = truth.as_dict(time.time())
    assert state["is_mining"] is True
    data = await miner.get_data(include=["hashrate"])
    assert data.hashrate is not None
    assert float(data.hashrate) == pytest.approx(state["hashrate_ths"], rel=TOLERANCE)


async def test_send_config_is_a_silent_no_op(farm: FarmFactory) -> None:
    truth = first(await avalon_farm(farm), model=A1246)
    before = [p.as_dict() for p in truth.pools]
    writes = truth.writes
    miner = await pyasic.get_miner(truth.ip)
    config = MinerConfig(
        pools=PoolConfig.simple(
            [{"url": "stratum+tcp://other.pool.example:3333", "user": "x.y", "password": "x"}]
        )
    )
    assert await miner.send_config(config) is None
    assert [p.as_dict() for p in truth.pools] == before
    assert truth.writes == writes


async def test_setpool_over_raw_rpc_replaces_one_slot(farm: FarmFactory) -> None:
    truth = first(await avalon_farm(farm), model=A1366)
    url, worker = "stratum+tcp://approved.pool.example:3333", "kzfarm01.replaced"
    creds = truth.credentials
    _, reply = await raw_rpc(
        truth.ip, "setpool", f"{creds.web_user},{creds.web_password},1,{url},{worker},x"
    )
    assert reply["STATUS"][0]["STATUS"] == "S"
    assert (truth.pools[1].url, truth.pools[1].user) == (url, worker)
    assert truth.pools[0].url != url  # the other slots are untouched

    _, refused = await raw_rpc(truth.ip, "setpool", f"root,wrong,0,{url},{worker},x")
    assert refused["STATUS"][0]["STATUS"] == "E"
    assert truth.pools[0].url != url

    with pytest.warns(UserWarning):
        miner = await pyasic.get_miner(truth.ip)
    pools = await miner.get_pools()
    assert (str(pools[1].url), pools[1].user) == (url, worker)


async def test_setpool_fails_once_the_password_was_changed(farm: FarmFactory) -> None:
    shard = await avalon_farm(farm)
    truth = first(shard, model=A1246)
    await shard.inject_fault(truth.ip, Fault.PASSWORD_CHANGED, {})
    before = [p.url for p in truth.pools]
    _, reply = await raw_rpc(
        truth.ip, "setpool", "root,root,0,stratum+tcp://approved.pool.example:3333,w,x"
    )
    assert reply["STATUS"][0]["STATUS"] == "E"
    assert [p.url for p in truth.pools] == before


async def test_fault_light_follows_the_led(farm: FarmFactory) -> None:
    truth = first(await avalon_farm(farm), model=A1246)
    miner = await pyasic.get_miner(truth.ip)
    assert await miner.fault_light_on() is True
    assert truth.blinking is True
    assert (await miner.get_data(include=["fault_light"])).fault_light is True
    assert await miner.fault_light_off() is True
    assert truth.blinking is False
    assert (await miner.get_data(include=["fault_light"])).fault_light is False


async def test_dead_hashboard_is_visible(farm: FarmFactory) -> None:
    shard = await avalon_farm(farm)
    truth = first(shard, model=A1246)
    await shard.inject_fault(truth.ip, Fault.DEAD_HASHBOARD, {"board": 1})
    miner = await pyasic.get_miner(truth.ip)
    data = await miner.get_data(include=["hashboards", "hashrate"])
    dead = data.hashboards[1]
    assert dead.missing is True and dead.chips is None
    assert dead.hashrate is not None and float(dead.hashrate) == 0.0
    assert all(not b.missing and b.chips == 120 for i, b in enumerate(data.hashboards) if i != 1)
    assert data.hashrate is not None
    state = truth.as_dict(time.time())
    assert float(data.hashrate) == pytest.approx(state["hashrate_ths"], rel=TOLERANCE)
    assert state["hashrate_ths"] < truth.nominal_ths * 0.75


async def test_power_limit_maps_to_work_levels(farm: FarmFactory) -> None:
    truth = first(await avalon_farm(farm), model=A1246)
    miner = await pyasic.get_miner(truth.ip)
    assert await miner.set_power_limit(3000) is True  # pyasic: > 100 means level 2
    assert mode_of(truth) is Mode.HIGH
    assert await miner.set_power_limit(90) is True  # level 1
    assert mode_of(truth) is Mode.NORMAL
    assert await miner.set_power_limit(50) is False  # level 0 is dropped by pyasic's ascset
    assert mode_of(truth) is Mode.NORMAL


async def test_reboot_answers_restart_and_goes_dark(farm: FarmFactory) -> None:
    truth = first(await avalon_farm(farm), model=A1246)
    miner = await pyasic.get_miner(truth.ip)
    assert await miner.reboot() is True
    state = truth.as_dict(time.time())
    assert state["up"] is False and state["is_mining"] is False


async def test_ascset_details_follow_the_firmware(farm: FarmFactory) -> None:
    truth = first(await avalon_farm(farm), model=A1246)
    _, sn = await raw_rpc(truth.ip, "ascset", "0,hash-sn-read,2")
    assert sn["STATUS"][0]["Msg"] == f"ASC 0 set info: Hash-2 SN:{truth.hashboards[2].serial}"
    _, unknown = await raw_rpc(truth.ip, "ascset", "0,bogus")
    assert unknown["STATUS"][0]["STATUS"] == "I"
    assert unknown["STATUS"][0]["Msg"] == "ASC 0 set info: Unknown option: bogus"
    _, level = await raw_rpc(truth.ip, "ascset", "0,worklevel,get")
    assert level["STATUS"][0]["Msg"] == "ASC 0 set info: worklevel 1"
    _, softoff = await raw_rpc(truth.ip, "ascset", "0,softoff,1:1753434821")
    assert softoff["STATUS"][0]["Msg"] == "ASC 0 set info: success softoff:1753434821"
    assert mode_of(truth) is Mode.SLEEP
    _, estats = await raw_rpc(truth.ip, "estats")
    mm = estats["STATS"][0]["MM ID0"]
    assert "SoftOFF[1753434821]" in mm and "Work: In Idle" in mm
    # A level chosen while asleep is the one softon wakes up at.
    _, level_set = await raw_rpc(truth.ip, "ascset", "0,worklevel,set,2")
    assert level_set["STATUS"][0]["Msg"] == "ASC 0 set OK"
    assert mode_of(truth) is Mode.SLEEP
    _, softon = await raw_rpc(truth.ip, "ascset", "0,softon,1:1753434900")
    assert softon["STATUS"][0]["Msg"] == "ASC 0 set info: success softon:1753434900"
    assert mode_of(truth) is Mode.HIGH


async def test_addpool_and_switchpool(farm: FarmFactory) -> None:
    truth = first(await avalon_farm(farm), model=A1366)
    url = "stratum+tcp://extra.pool.example:3333"
    _, added = await raw_rpc(truth.ip, "addpool", f"{url},extra.worker,x")
    assert added["STATUS"][0]["Msg"] == f"Added pool 3: '{url}'"
    assert truth.pools[-1].url == url
    _, switched = await raw_rpc(truth.ip, "switchpool", "3")
    assert switched["STATUS"][0]["Msg"] == f"Switching to pool 3:'{url}'"
    _, pools = await raw_rpc(truth.ip, "pools")
    active = [p["URL"] for p in pools["POOLS"] if p["Stratum Active"]]
    assert active == [url]
