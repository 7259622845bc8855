"""Is a miner on its approved pools? One pure rule, shared by the agent and the controller.

The agent uses it to decide whether to write; the controller uses it, independently, on every
observation it stores, so that the compliance evidence rests on what the miner reported and
not on what the agent claims. Passwords are never compared: firmware masks them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from contract.policy import ApprovedPoolSet, DevFeePolicy
from contract.reports import PoolReading

DEFAULT_SCHEME = "stratum+tcp://"
DEVFEE = "devfee"
DEVFEE_URL = "DevFee"


class PoolStatus(StrEnum):
    """Compliance of one machine at one instant."""

    COMPLIANT = "compliant"
    NON_COMPLIANT = "non_compliant"
    UNKNOWN = "unknown"  # unreachable, or pools not readable
    EXEMPT = "exempt"


def canonical_url(url: str) -> str:
    """Compare URLs as a miner uses them: trimmed, default scheme, scheme and host lowercased,
    no trailing slash."""
    url = url.strip()
    if not url:
        return ""
    if "://" not in url:
        url = DEFAULT_SCHEME + url
    scheme, _, rest = url.partition("://")
    host, _, path = rest.partition("/")
    path = path.rstrip("/")
    return f"{scheme.lower()}://{host.lower()}" + (f"/{path}" if path else "")


def is_devfee(reading: PoolReading) -> bool:
    """A firmware fee slot is recognised by its URL alone (VNish lists ``DevFee`` there). A
    pool with a real URL is a user pool whatever its user or ``kind`` say: malware could name
    its worker ``DevFee`` to pass as the firmware's own fee."""
    return bare_host(reading.url) == DEVFEE_URL


def bare_host(url: str) -> str:
    """``stratum+tcp://DevFee`` -> ``DevFee``; ``DevFee`` -> ``DevFee``."""
    return url.strip().partition("://")[2] if "://" in url else url.strip()


@dataclass(frozen=True)
class PoolAssessment:
    """The verdict and, when not compliant, every reason (for evidence and for the operator)."""

    compliant: bool
    problems: tuple[str, ...] = ()
    devfee_pools: tuple[str, ...] = field(default=())


def assess_pools(
    approved: ApprovedPoolSet, worker: str, readings: Sequence[PoolReading]
) -> PoolAssessment:
    """Compare the pools a miner reports with the approved set and the machine's worker.

    Compliant means: the user pools (empty slots ignored) are exactly the approved URLs in slot
    order, each with the machine's worker as user; a firmware fee pool is allowed or a
    violation as the set says. An extra user pool — a hidden slot added by malware — is always a
    violation.
    """
    problems: list[str] = []
    user_pools = [r for r in readings if r.url.strip() and not is_devfee(r)]
    fee_pools = tuple(r.url for r in readings if r.url.strip() and is_devfee(r))
    expected = [canonical_url(u) for u in approved.urls]
    observed = [canonical_url(r.url) for r in user_pools]
    if not user_pools:
        problems.append("no pool configured")
    for slot, url in enumerate(expected):
        if slot >= len(observed):
            problems.append(f"slot {slot + 1}: missing, expected {url}")
        elif observed[slot] != url:
            problems.append(f"slot {slot + 1}: {user_pools[slot].url} is not {url}")
    for slot in range(len(expected), len(observed)):
        problems.append(f"slot {slot + 1}: unapproved pool {user_pools[slot].url}")
    for slot, reading in enumerate(user_pools[: len(expected)]):
        if reading.user.strip() != worker:
            problems.append(f"slot {slot + 1}: worker {reading.user!r} is not {worker!r}")
    if fee_pools and approved.devfee is DevFeePolicy.FORBID:
        problems.append("firmware fee pool present: " + ", ".join(fee_pools))
    return PoolAssessment(compliant=not problems, problems=tuple(problems), devfee_pools=fee_pools)
