"""Reply mangling for the transport-level faults (malformed, truncated, oversized)."""

from __future__ import annotations

from typing import Any

from simulator.state import Fault, MinerState

DEFAULT_OVERSIZE_BYTES = 4 * 1024 * 1024


def malformed(body: bytes) -> bytes:
    """Break the JSON beyond what pyasic's repair heuristics can mend."""
    return body.replace(b'":', b'"=', 3).replace(b"[", b"[[", 1) or b"{garbage"


def truncated(body: bytes) -> bytes:
    """Keep the first 40 % of the reply, as when the firmware dies mid-write."""
    return body[: max(1, len(body) * 2 // 5)]


def oversized(body: bytes, size: int) -> bytes:
    """Pad a JSON object reply to ``size`` bytes; it stays valid JSON."""
    stripped = body.rstrip(b"\x00")
    if not stripped.endswith(b"}") or size <= len(stripped):
        return body + b" " * max(0, size - len(body))
    padding = b"A" * (size - len(stripped) - 10)
    return stripped[:-1] + b',"_pad":"' + padding + b'"}' + body[len(stripped) :]


def mangle(miner: MinerState, body: bytes) -> bytes:
    """Apply whichever body fault the miner has (at most one wins, in this order)."""
    faults: dict[Fault, dict[str, Any]] = miner.faults
    if Fault.MALFORMED in faults:
        return malformed(body)
    if Fault.TRUNCATED in faults:
        return truncated(body)
    if Fault.OVERSIZED in faults:
        size = int(faults[Fault.OVERSIZED].get("bytes", DEFAULT_OVERSIZE_BYTES))
        return oversized(body, size)
    return body


def reply_delay(miner: MinerState) -> float:
    """Seconds to wait before answering (the ``slow`` fault)."""
    slow = miner.faults.get(Fault.SLOW)
    return float(slow.get("seconds", 3.0)) if slow is not None else 0.0
