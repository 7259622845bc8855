"""The agent's exception hierarchy: one tree, so callers can catch as broadly as they need.

AgentError
├── ConfigError                 a config or secrets file is missing, unreadable or invalid
│   └── InsecureSecretsFile     the secrets file is readable by others or owned by someone else
├── OutboxError                 the durable outbox cannot do its job
│   └── OutboxFull              the disk (or the database) is full: nothing was stored
├── UplinkError                 talking to the controller failed
│   ├── ControllerUnreachable   network error, timeout, 5xx, 408, 429: retry later
│   ├── Unauthorized            401/403: our credential is not (or no longer) accepted
│   └── RejectedBatch           the controller refused this batch for good (other 4xx)
├── DriverError                 talking to one miner failed (``reason`` is one line)
│   ├── Unreachable             nothing listens / connection refused or reset
│   ├── Timeout                 it accepted but did not answer within the per-miner timeout
│   ├── AuthFailed              the miner refused our credentials
│   ├── Unsupported             this firmware cannot do that (or we cannot do it for it)
│   └── MalformedReply          it answered, but not with anything we can parse
└── ScanRefused                 an address or CIDR outside the segments this agent may touch

ProfileError (a firmware profile file is malformed, file and field named) is re-exported from
:mod:`firmware_profiles.errors`: the profiles import nothing from the agent, so it is not an
AgentError.
"""

from __future__ import annotations

from contract.text import clean_text
from firmware_profiles.errors import ProfileError as ProfileError  # re-exported

MAX_REASON = 1000
"""Longest reason a DriverError keeps (an observation's error field takes 1,024)."""


class AgentError(Exception):
    """Base class for errors the agent raises on purpose."""


class ConfigError(AgentError):
    """A config or secrets file is missing, unreadable or invalid; the message is one line
    naming the file and the field."""


class InsecureSecretsFile(ConfigError):
    """The secrets file may be read by someone other than the agent's user."""


class OutboxError(AgentError):
    """The outbox database cannot be opened, read or written."""


class OutboxFull(OutboxError):
    """The disk or database is full. The batch was NOT stored: keep it in memory and retry."""


class UplinkError(AgentError):
    """A request to the controller failed.

    ``retryable`` says whether the same request may succeed later; ``status_code`` is the
    HTTP status when the controller answered at all.
    """

    retryable: bool = False

    def __init__(
        self, message: str, *, status_code: int | None = None, retryable: bool | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        if retryable is not None:
            self.retryable = retryable


class ControllerUnreachable(UplinkError):
    """The controller could not take the request now (network, timeout, 5xx, 408, 429)."""

    retryable = True

    def __init__(
        self, message: str, *, status_code: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message, status_code=status_code)
        self.retry_after_s = retry_after_s


class Unauthorized(UplinkError):
    """The controller does not accept our credential (revoked, disabled, wrong secret).

    Retrying is allowed but only slowly: hammering with a bad secret helps nobody.
    """

    retryable = True


class RejectedBatch(UplinkError):
    """The controller refused one batch for good; it is parked, not retried."""

    def __init__(self, message: str, *, batch_id: str, status_code: int | None = None) -> None:
        super().__init__(message, status_code=status_code)
        self.batch_id = batch_id


class DriverError(AgentError):
    """One miner could not be read or written; ``reason`` is what a poll reports."""

    kind = "error"

    def __init__(self, reason: str, *, ip: str | None = None) -> None:
        # reasons quote what miners said (a Msg, an exception's text): bounded and cleaned like
        # any miner string, so an error can always be logged, reported and stored
        reason = clean_text(reason, MAX_REASON).text
        super().__init__(f"{ip}: {reason}" if ip else reason)
        self.reason = reason
        self.ip = ip


class Unreachable(DriverError):
    """Connection refused, reset or no route: the miner is off or gone."""

    kind = "unreachable"


class Timeout(DriverError):
    """The miner accepted a connection (or not) but gave no full answer in time."""

    kind = "timeout"


class AuthFailed(DriverError):
    """The miner refused our credentials (web password, API password or token)."""

    kind = "auth_failed"


class Unsupported(DriverError):
    """The firmware cannot do this, or this driver cannot do it for that firmware."""

    kind = "unsupported"


class MalformedReply(DriverError):
    """The miner answered with something that is not the protocol (garbage, truncated, huge)."""

    kind = "malformed"


class ScanRefused(AgentError):
    """A scan or poll target lies outside the configured segments (or, without a config,
    outside 127.0.0.0/8): the agent never touches a network it was not given."""
