"""One backoff rule: every retrying part of the agent waits by the same doubling."""

from __future__ import annotations

import random

from agent.actions.runner import backoff_s
from agent.backoff import doubling, full_jitter
from agent.coordinator import backoff_cycles
from agent.enforce.executor import retry_in_cycles
from agent.uplink import backoff_delay


def test_the_doubling_and_its_cap() -> None:
    assert [doubling(n, 1.5, 10.0) for n in range(0, 6)] == [1.5, 1.5, 3.0, 6.0, 10.0, 10.0]
    assert doubling(10**9, 1.0, 30.0) == 30.0  # no overflow however long the outage


def test_polls_writes_and_actions_back_off_alike() -> None:
    for failures in range(0, 12):
        assert backoff_cycles(failures, 8) == retry_in_cycles(failures, 8)
        assert backoff_s(failures, 1.0, 8.0) == doubling(failures, 1.0, 8.0)
    assert retry_in_cycles(5, 0) == 1  # at least one cycle, whatever the cap


def test_deliveries_jitter_below_the_same_ceiling() -> None:
    rng = random.Random(7)
    assert backoff_delay(0, initial_s=1.0, max_s=60.0, rng=rng) == 0.0
    for failures in range(1, 10):
        ceiling = doubling(failures, 1.0, 60.0)
        samples = [full_jitter(failures, 1.0, 60.0, rng) for _ in range(200)]
        assert all(0.0 <= s <= ceiling for s in samples)
        assert max(samples) > ceiling / 2  # spread over the range, not pinned low
