"""Drivers: the only code in the agent that speaks miner protocols.

Use :class:`DriverFactory` (or :func:`identify`) to get a :class:`MinerDriver` for an IP;
everything it returns is a typed snapshot and everything it raises is a DriverError.
"""

from agent.drivers.base import (
    Credentials,
    Identity,
    MinerDriver,
    MinerLogin,
    PollSnapshot,
    PoolStatus,
    PoolTarget,
)
from agent.drivers.factory import DriverFactory, identify
from agent.drivers.options import DriverOptions
from agent.drivers.pyasic_backend import HOT_FIELDS, PyasicDriver

__all__ = [
    "HOT_FIELDS",
    "Credentials",
    "DriverFactory",
    "DriverOptions",
    "Identity",
    "MinerDriver",
    "MinerLogin",
    "PollSnapshot",
    "PoolStatus",
    "PoolTarget",
    "PyasicDriver",
    "identify",
]
