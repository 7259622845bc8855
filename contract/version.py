"""Contract versioning: ``MAJOR.MINOR``; majors break, minors only add optional fields."""

from __future__ import annotations

import re

from contract.errors import UnsupportedContractVersion

CONTRACT_VERSION = "1.1"
SUPPORTED_MAJOR = 1
_VERSION = re.compile(r"^(\d+)\.(\d+)$")


def check_version(version: str) -> str:
    """Return ``version`` if this side can read it; raise with a clear message otherwise."""
    match = _VERSION.match(version)
    if match is None:
        raise UnsupportedContractVersion(
            f"contract_version {version!r} is not of the form MAJOR.MINOR"
        )
    major = int(match.group(1))
    if major != SUPPORTED_MAJOR:
        advice = "upgrade this side" if major > SUPPORTED_MAJOR else "upgrade the sender"
        raise UnsupportedContractVersion(
            f"contract version {version} is not supported: this side speaks "
            f"{SUPPORTED_MAJOR}.x ({advice})"
        )
    return version
