"""The contract's exception hierarchy."""


class ContractError(ValueError):
    """A message does not follow the contract."""


class UnsupportedContractVersion(ContractError):
    """A message speaks a major contract version this side does not understand."""
