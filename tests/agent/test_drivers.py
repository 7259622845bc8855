"""The driver layer against the real simulator and unmodified pyasic 0.79.

Every check compares what a driver reports with the simulator's true state (``shard.miner``),
for both poll paths: the fast path (one multi-command parsed by us) and the pyasic path
(``get_data`` with our fixes). Faults come from the simulator's fault modes.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from pyasic.errors import APIError
from pyasic.miners.factory import MinerFactory, MinerTypes

from agent.drivers import (
    DriverFactory,
    DriverOptions,
    MinerLogin,
    PollSnapshot,
    PoolTarget,
    PyasicDriver,
)
from agent.drivers.base import normalise_mac, normalise_pool_url
from agent.drivers.factory import cross_check
from agent.errors import AuthFailed, DriverError, Timeout, Unreachable
from contract.reports import IdentityRecord, Observation
from simulator.shard import Shard
from simulator.state import Fault, MinerState, Mode
from tests.conftest import FarmFactory, first

MIX = "antminer=1,whatsminer=1,avalon=1,vnish=1"
FAMILY = {
    "antminer": "antminer_stock",
    "whatsminer": "whatsminer_v2",
    "avalon": "avalon",
    "vnish": "vnish",
}
TOLERANCE = 0.07  # sensor noise is redrawn every 5 s (±3 %); a read may straddle two draws
NEW_POOLS = [
    PoolTarget("stratum+tcp://approved.dmp.example:3333", "kzfarm01.rig7"),
    PoolTarget("btc-backup.approved.example:3333", "kzfarm01.rig7"),  # no scheme: normalised
]
WEIRD_POOLS = [
    {"url": "stratum+tls://evil.example:443", "user": "thief.1", "password": "x"},
    {"url": "ssl://evil.example:3334", "user": "thief.2", "password": "x"},
]


def options(timeout: float = 3.0, fast_path: bool = True) -> DriverOptions:
    return DriverOptions(timeout=timeout, write_timeout=10.0, fast_path=fast_path)


async def driver(shard: Shard, personality: str, **kwargs: Any) -> tuple[MinerState, PyasicDriver]:
    miner = first(shard, personality=personality)
    factory = DriverFactory(options=kwargs.pop("opts", options()), **kwargs)
    return miner, await factory.create(miner.ip)


def user_pools(snapshot: PollSnapshot) -> list[tuple[str, str]]:
    return [(p.url, p.user) for p in snapshot.pools if p.kind == "user"]


def true_runtime_pools(miner: MinerState) -> list[tuple[str, str]]:
    return [(p.url, p.user) for p in miner.runtime_pools() if p.url]


def assert_matches_truth(snapshot: PollSnapshot, miner: MinerState) -> None:
    truth = miner.as_dict(time.time())
    assert snapshot.reachable and snapshot.error is None, snapshot.error
    assert user_pools(snapshot) == true_runtime_pools(miner)
    assert snapshot.hashrate_ths == pytest.approx(truth["hashrate_ths"], rel=TOLERANCE)
    assert snapshot.is_mining is truth["is_mining"]
    assert snapshot.observed_at.tzinfo is not None
    if snapshot.power_w is not None:
        assert snapshot.power_w == pytest.approx(truth["power_w"], rel=TOLERANCE)
    if snapshot.temperature_c is not None:  # board or chip sensors, as each firmware reports
        tel = miner.telemetry(time.time())
        assert min(tel.board_temps) - 5 <= snapshot.temperature_c <= max(tel.chip_temps) + 5


def assert_paths_agree(fast: PollSnapshot, slow: PollSnapshot) -> None:
    assert fast.pools == slow.pools
    assert fast.is_mining is slow.is_mining
    assert fast.hashrate_ths == pytest.approx(slow.hashrate_ths, rel=TOLERANCE)
    for a, b, tolerance in (
        (fast.power_w, slow.power_w, 0.05 * (slow.power_w or 0)),
        (fast.temperature_c, slow.temperature_c, 3.0),
    ):
        if b is not None:  # pyasic's generic Avalon class reads no boards, fans or temps
            assert a == pytest.approx(b, abs=tolerance)
    if slow.fan_rpm:
        assert len(fast.fan_rpm) == len(slow.fan_rpm)


# --- identify and poll every personality ---------------------------------------------------------


async def test_identify_and_poll_every_personality(farm: FarmFactory) -> None:
    shard = await farm(miners=12, mix=MIX, seed=7)
    assert {m.model for m in shard.miners.values()} >= {"AvalonMiner 1366", "AvalonMiner 1246"}
    factory = DriverFactory(options=options())
    for miner in shard.miners.values():
        drv = await factory.driver_for(miner.ip)
        assert await factory.driver_for(miner.ip) is drv  # kept between cycles
        assert drv.family == FAMILY[miner.personality]
        assert drv.fast_path

        identity = await drv.identify()
        assert (identity.make, identity.model, identity.firmware) == (
            miner.make, miner.model, miner.firmware,
        )  # fmt: skip
        assert identity.firmware_version == miner.firmware_version
        assert identity.mac == normalise_mac(miner.mac)
        assert identity.hashboard_serials == tuple(b.serial for b in miner.hashboards)
        if miner.personality == "avalon":
            assert identity.serial is None and identity.serial_source is None
            assert identity.control_board_serial == miner.control_board_serial
        else:
            assert identity.serial == miner.serial and identity.serial_source
        if miner.personality in ("whatsminer", "vnish"):
            assert identity.psu_serial == miner.psu_serial
        assert drv.profile is not None and drv.profile.nominal_ths == miner.nominal_ths

        fast = await drv.poll_fast()
        slow = await drv.poll_pyasic()
        assert_matches_truth(fast, miner)
        assert_matches_truth(slow, miner)
        assert_paths_agree(fast, slow)
        if miner.personality == "vnish":
            assert [p.kind for p in fast.pools][-1] == "devfee"

        observation = fast.to_observation(identity)
        assert isinstance(observation, Observation) and observation.serial == identity.serial
        record = identity.to_record()
        assert isinstance(record, IdentityRecord) and record.mac == identity.mac


# --- faults: offline, blackhole, garbage ---------------------------------------------------------


async def test_offline_miner_is_not_reported_as_mining(farm: FarmFactory) -> None:
    shard = await farm(miners=4, mix=MIX)
    for personality in ("antminer", "avalon"):
        miner, drv = await driver(shard, personality)
        await shard.inject_fault(miner.ip, Fault.OFFLINE, {})
        for snapshot in (await drv.poll_fast(), await drv.poll_pyasic()):
            assert snapshot.reachable is False
            assert snapshot.is_mining is None and snapshot.hashrate_ths is None
            assert snapshot.error is not None and snapshot.error.startswith("unreachable")
        with pytest.raises(Unreachable, match="nothing listens"):
            await DriverFactory(options=options()).create(miner.ip)


async def test_blackhole_times_out_within_the_per_miner_timeout(farm: FarmFactory) -> None:
    shard = await farm(miners=4, mix=MIX)
    miner, drv = await driver(shard, "whatsminer", opts=options(timeout=1.0))
    await shard.inject_fault(miner.ip, Fault.BLACKHOLE, {})
    for snapshot in (await drv.poll_fast(), await drv.poll_pyasic()):
        assert snapshot.reachable is False
        assert snapshot.error == "timeout: no complete reply within 1 s"
    with pytest.raises(Timeout):
        await DriverFactory(options=options(timeout=1.0), identify_timeout=1.5).create(miner.ip)


@pytest.mark.parametrize("fault", [Fault.MALFORMED, Fault.TRUNCATED, Fault.OVERSIZED])
async def test_garbage_replies_are_reported_not_raised(farm: FarmFactory, fault: Fault) -> None:
    shard = await farm(miners=4, mix=MIX)
    for personality in ("antminer", "whatsminer"):
        miner, drv = await driver(shard, personality)
        await shard.inject_fault(miner.ip, fault, {"bytes": 2_000_000})
        fast, slow = await drv.poll_fast(), await drv.poll_pyasic()
        assert fast.error is not None and fast.error.startswith("malformed"), fast.error
        assert slow.error is not None and slow.error.startswith("malformed"), slow.error
        if fault is Fault.OVERSIZED:  # pyasic would read it whole; our cap on its sockets stops it
            assert "oversized" in fast.error and "oversized" in slow.error, slow.error
        assert slow.is_mining is None  # not pyasic's default "mining"
        await shard.clear_fault(miner.ip, fault)
        assert (await drv.poll()).error is None


async def test_unfamiliar_pool_urls_do_not_abort_the_read(farm: FarmFactory) -> None:
    shard = await farm(miners=4, mix=MIX)
    for personality in ("antminer", "whatsminer", "avalon"):
        miner, drv = await driver(shard, personality)
        await shard.tamper_pools(miner.ip, WEIRD_POOLS, actor="malware")
        expected = [(p["url"], p["user"]) for p in WEIRD_POOLS]
        with pytest.raises(APIError, match="pools"):  # what pyasic alone does with them
            await drv.miner.get_data(include=["pools", "hashrate"])
        fast, slow = await drv.poll_fast(), await drv.poll_pyasic()
        assert user_pools(fast) == user_pools(slow) == expected
        assert slow.hashrate_ths is not None  # the rest of the read survived too


# --- writes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("personality", ["antminer", "whatsminer", "vnish", "avalon"])
async def test_set_pools_changes_the_true_state(farm: FarmFactory, personality: str) -> None:
    shard = await farm(miners=4, mix=MIX, restart_seconds=30)
    miner, drv = await driver(shard, personality)
    await drv.set_pools(NEW_POOLS)
    wanted = [(normalise_pool_url(p.url), p.user) for p in NEW_POOLS]
    assert [(p.url, p.user) for p in shard.miner(miner.ip).pools if p.url] == wanted
    for snapshot in (await drv.poll_fast(), await drv.poll_pyasic()):
        assert user_pools(snapshot) == wanted
        # the mining process restarts after a pool change: not hashing, whatever pyasic says
        assert snapshot.is_mining is False is miner.as_dict(time.time())["is_mining"]


@pytest.mark.parametrize("personality", ["antminer", "whatsminer", "vnish", "avalon"])
async def test_sleep_and_wake(farm: FarmFactory, personality: str) -> None:
    shard = await farm(miners=4, mix=MIX, restart_seconds=0)
    miner, drv = await driver(shard, personality)
    await drv.sleep()
    assert shard.miner(miner.ip).mode is Mode.SLEEP
    assert (await drv.poll_fast()).is_mining is False
    assert (await drv.poll_pyasic()).is_mining is False  # pyasic alone: True on Avalon
    await drv.wake()
    assert shard.miner(miner.ip).mode is not Mode.SLEEP


async def test_wrong_credentials_raise_auth_failed_and_wipe_nothing(farm: FarmFactory) -> None:
    shard = await farm(miners=4, mix=MIX)
    for personality in ("antminer", "whatsminer", "vnish", "avalon"):
        miner, drv = await driver(shard, personality)
        before = [(p.url, p.user) for p in shard.miner(miner.ip).pools]
        await shard.inject_fault(miner.ip, Fault.PASSWORD_CHANGED, {"password": "hunter2"})
        with pytest.raises(AuthFailed):
            await drv.set_pools(NEW_POOLS)
        assert [(p.url, p.user) for p in shard.miner(miner.ip).pools] == before, personality
        if personality == "antminer":  # serial and MAC live behind the web login
            with pytest.raises(AuthFailed):
                await drv.identify()
        else:  # reads that need no login still identify the miner
            assert (await drv.identify()).mac == normalise_mac(miner.mac)
        assert (await drv.poll()).error is None  # the hot poll needs no login


async def test_per_family_credentials_are_used(farm: FarmFactory) -> None:
    shard = await farm(miners=4, mix=MIX)
    logins = {
        "antminer": MinerLogin(password="hunter2"),
        "whatsminer": MinerLogin(password="hunter2"),
        "avalon": MinerLogin(username="root", password="hunter2"),
    }
    for personality in ("antminer", "whatsminer", "avalon"):
        miner = first(shard, personality=personality)
        await shard.inject_fault(miner.ip, Fault.PASSWORD_CHANGED, {"password": "hunter2"})
        _, drv = await driver(shard, personality, credentials=logins)
        if personality == "antminer":
            assert (await drv.identify()).serial == miner.serial
        await drv.set_pools(NEW_POOLS[:1])
        assert shard.miner(miner.ip).pools[0].url == NEW_POOLS[0].url


# --- identification cross-check ------------------------------------------------------------------


async def test_vnish_taken_for_stock_is_corrected(farm: FarmFactory) -> None:
    """The race pyasic can lose: its socket probe says ANTMINER before it checks VNISH."""
    shard = await farm(miners=4, mix=MIX)
    vnish, stock = first(shard, personality="vnish"), first(shard, personality="antminer")
    model = vnish.model.upper()
    lost_race = MinerFactory._select_miner_from_classes(
        vnish.ip, miner_model=model, miner_type=MinerTypes.ANTMINER
    )
    assert str(lost_race.firmware) == "Stock"
    fixed = await cross_check(vnish.ip, lost_race, 2.0)
    assert str(fixed.firmware) == "VNish" and type(fixed).__name__.startswith("VNish")
    identity = await PyasicDriver(vnish.ip, fixed, "vnish", options=options()).identify()
    assert identity.serial == vnish.serial and identity.firmware == "vnish"

    real_stock = MinerFactory._select_miner_from_classes(
        stock.ip, miner_model=stock.model.upper(), miner_type=MinerTypes.ANTMINER
    )
    assert await cross_check(stock.ip, real_stock, 2.0) is real_stock


async def test_poll_never_raises_on_a_closed_address(farm: FarmFactory) -> None:
    shard = await farm(miners=4, mix=MIX)
    miner, drv = await driver(shard, "vnish")
    await shard.inject_fault(miner.ip, Fault.OFFLINE, {})
    assert (await drv.poll()).error is not None
    with pytest.raises(DriverError):
        await drv.set_pools(NEW_POOLS)


async def test_garbled_antminer_fails_identification_as_malformed(farm: FarmFactory) -> None:
    shard = await farm(miners=2, mix="antminer=1")
    miner = first(shard, personality="antminer")
    await shard.inject_fault(miner.ip, Fault.MALFORMED, {})
    drv = await DriverFactory(options=options(timeout=2.0), identify_timeout=5).create(miner.ip)
    with pytest.raises(DriverError) as info:
        await drv.identify()
    assert info.value.kind == "malformed", info.value
    assert "AttributeError" not in str(info.value)  # a reason a person can act on
