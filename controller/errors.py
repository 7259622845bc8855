"""The controller's exception hierarchy. API handlers turn these into 4xx answers."""


class ControllerError(Exception):
    """Base class for errors the controller raises on purpose."""


class ConfigError(ControllerError):
    """Settings are invalid (bad TOML, bad URL, unwritable data directory)."""


class NotFound(ControllerError):
    """The thing asked for does not exist."""


class Conflict(ControllerError):
    """The request contradicts the current state (duplicate name, used token …)."""


class Refused(ControllerError):
    """The request is understood but not allowed (outside segments, needs an override …)."""
