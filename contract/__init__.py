"""The agent <-> controller wire contract: versioned pydantic models.

Both sides import this package; neither imports the other. Every top-level message
carries ``contract_version``; a message of an unknown *major* version is refused with
:class:`UnsupportedContractVersion`, while newer minor versions are accepted (they may
only add optional fields).
"""

from contract.commands import CommandOutcome, CommandResult
from contract.enrollment import EnrollmentRequest, EnrollmentResponse
from contract.errors import ContractError, UnsupportedContractVersion
from contract.policy import PolicyBundle, PolicyContent
from contract.reports import (
    BatchAck,
    Event,
    EventSeverity,
    IdentityRecord,
    Observation,
    PoolReading,
    ReportBatch,
)
from contract.version import CONTRACT_VERSION, check_version

__all__ = [
    "CONTRACT_VERSION",
    "BatchAck",
    "CommandOutcome",
    "CommandResult",
    "ContractError",
    "EnrollmentRequest",
    "EnrollmentResponse",
    "Event",
    "EventSeverity",
    "IdentityRecord",
    "Observation",
    "PolicyBundle",
    "PolicyContent",
    "PoolReading",
    "ReportBatch",
    "UnsupportedContractVersion",
    "check_version",
]
