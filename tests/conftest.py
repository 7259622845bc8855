"""Shared fixtures: virtual farms served in the test's own event loop."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from simulator.farm import build_farm, farm_spec
from simulator.shard import Shard
from simulator.state import MinerState

FarmFactory = Callable[..., Awaitable[Shard]]

# Each farm gets its own /24 so that leftover sockets of one test never answer another;
# the second octet depends on the process so that parallel pytest runs do not collide.
_BASE = 100 + (os.getpid() % 50) * 2
_subnets = (f"127.{_BASE + i // 250}.{i % 250}.0/24" for i in itertools.count())
# Farms of more than 250 miners get a /21 (2,046 addresses) from a range of their own.
_WIDE_BASE = 200 + os.getpid() % 50
_wide_subnets = (f"127.{_WIDE_BASE}.{(i % 32) * 8}.0/21" for i in itertools.count())


@pytest.fixture
async def farm() -> AsyncIterator[FarmFactory]:
    """Start a farm in this event loop: ``shard = await farm(miners=4, mix="antminer=1")``."""
    shards: list[Shard] = []

    async def start(
        miners: int = 4,
        mix: str = "antminer=1",
        seed: int = 7,
        faults: str = "",
        restart_seconds: float = 2.0,
        reboot_seconds: float = 2.0,
        worker_names: str = "ip",
    ) -> Shard:
        spec = farm_spec(
            miners=miners,
            mix=mix,
            subnet=next(_subnets) if miners <= 250 else next(_wide_subnets),
            seed=seed,
            faults=faults,
            restart_seconds=restart_seconds,
            reboot_seconds=reboot_seconds,
            worker_names=worker_names,
        )
        shard = Shard(build_farm(spec))
        await shard.start()
        shards.append(shard)
        return shard

    yield start
    for shard in shards:
        await shard.stop()


def first(shard: Shard, personality: str | None = None, model: str | None = None) -> MinerState:
    """The first miner of a farm matching a personality and/or model."""
    for miner in shard.miners.values():
        if personality and miner.personality != personality:
            continue
        if model and miner.model != model:
            continue
        return miner
    raise LookupError(f"no miner with personality={personality} model={model}")
