"""The simulator's exception hierarchy."""


class SimulatorError(Exception):
    """Base class for every error the simulator raises on purpose."""


class FarmSpecError(SimulatorError):
    """A farm description (size, mix, subnet, faults) is invalid; the message says why."""


class UnknownMinerError(SimulatorError):
    """No virtual miner lives at the given address."""


class StartupError(SimulatorError):
    """The farm could not start listening (a port in use, no permission, too many files)."""
