"""The agent <-> controller wire contract: versioned pydantic models.

Both sides import this package; neither imports the other. Every top-level message
carries ``contract_version``; a message of an unknown *major* version is refused with
:class:`UnsupportedContractVersion`, while newer minor versions are accepted (they may
only add optional fields).
"""

from contract.commands import CommandOutcome, CommandResult
from contract.compliance import PoolAssessment, PoolStatus, assess_pools, canonical_url
from contract.enforcement import EnforcementEvent, EnforcementFacts, FailureCause
from contract.enrollment import EnrollmentRequest, EnrollmentResponse
from contract.errors import ContractError, UnsupportedContractVersion
from contract.policy import (
    ApprovedPoolSet,
    DevFeePolicy,
    EnforcementMode,
    MachinePolicy,
    PolicyBundle,
    PolicyContent,
    RolloutPolicy,
)
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
    "ApprovedPoolSet",
    "BatchAck",
    "CommandOutcome",
    "CommandResult",
    "ContractError",
    "DevFeePolicy",
    "EnforcementEvent",
    "EnforcementFacts",
    "EnforcementMode",
    "EnrollmentRequest",
    "EnrollmentResponse",
    "Event",
    "EventSeverity",
    "FailureCause",
    "IdentityRecord",
    "MachinePolicy",
    "Observation",
    "PolicyBundle",
    "PolicyContent",
    "PoolAssessment",
    "PoolReading",
    "PoolStatus",
    "ReportBatch",
    "RolloutPolicy",
    "UnsupportedContractVersion",
    "assess_pools",
    "canonical_url",
    "check_version",
]
