"""Per-miner timeouts and switches every driver takes: backend-neutral, so code above
``agent.drivers`` configures drivers without importing a backend module."""

from __future__ import annotations

from dataclasses import dataclass

MAX_REPLY_BYTES = 1 << 20  # a full stats reply is ~5-11 KB; anything near a MiB is garbage


@dataclass(frozen=True, slots=True)
class DriverOptions:
    """Per-miner timeouts and the fast-path switch."""

    timeout: float = 5.0
    write_timeout: float = 20.0
    fast_path: bool = True
    max_reply_bytes: int = MAX_REPLY_BYTES
