"""One backoff rule for the agent: double the wait after each failure, up to a cap.

Used for miners that fail their polls (in cycles), rewrites after failed pool writes (in
cycles), action retries (in seconds) and deliveries to the controller (in seconds, with full
jitter so that a fleet of agents does not come back in the same second after an outage).
"""

from __future__ import annotations

import random


def doubling(attempt: int, initial: float, cap: float) -> float:
    """The wait before retry ``attempt`` (1-based): ``initial``, 2×, 4× … never above ``cap``;
    an attempt below 1 waits ``initial``."""
    return float(min(cap, initial * 2 ** min(max(attempt - 1, 0), 62)))


def doubling_cycles(failures: int, cap: int) -> int:
    """Whole cycles to wait after ``failures`` failures in a row: 1, 1, 2, 4 … ``cap`` (at
    least 1, whatever the cap)."""
    return max(1, int(doubling(failures, 1, cap)))


def full_jitter(attempt: int, initial: float, cap: float, rng: random.Random) -> float:
    """Uniform in [0, :func:`doubling`]; no wait before a first attempt (``attempt`` ≤ 0)."""
    if attempt <= 0:
        return 0.0
    return rng.uniform(0.0, doubling(attempt, initial, cap))
