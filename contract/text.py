"""Strings from miners are data: bounded in length and cleaned of what no store can hold.

A miner (or malware on it) chooses every string it reports: serial, MAC, hostname, model,
firmware, pool URL, worker, error text. A NUL byte breaks PostgreSQL text columns, a lone
surrogate (``\\ud800``, which JSON can carry as an escape) breaks UTF-8 encoding and pydantic,
and a 100 KB serial breaks the contract's limits. Any of these used to fail a whole poll cycle.

:func:`clean_text` is the one rule for both sides of the wire. It never drops a value silently:
every character it cannot keep (NUL and other control characters, lone surrogates,
non-characters) becomes U+FFFD, a value longer than the limit is cut and its last character
becomes U+FFFD, and what was done comes back as a note for the evidence. So a cleaned value
can never be mistaken for a clean one: an approved pool URL or worker never contains U+FFFD,
and a cleaned pool reading therefore never counts as compliant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import BaseModel
from pydantic.fields import FieldInfo

MARK = "\ufffd"
"""What replaces a character that cannot be kept (and the last character of a cut value)."""

# C0 controls except tab, DEL, C1 controls, surrogates (lone ones: Python strings from JSON
# escapes or surrogateescape can hold them), and the non-characters U+FFFE/U+FFFF.
_INVALID = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")


@dataclass(frozen=True, slots=True)
class Cleaned:
    """A cleaned value and what cleaning it took (empty ``notes``: the value was clean)."""

    text: str
    notes: tuple[str, ...] = ()


def clean_text(value: str, max_length: int) -> Cleaned:
    """``value`` trimmed, with invalid characters replaced and cut to ``max_length``; each
    change is named in the notes ("2 invalid characters replaced (NUL)", "cut from 300 to
    128 characters")."""
    text = value.strip()
    notes: list[str] = []
    invalid = _INVALID.findall(text)
    if invalid:
        kinds = sorted({_kind(c) for c in invalid})
        notes.append(f"{len(invalid)} invalid character(s) replaced ({', '.join(kinds)})")
        text = _INVALID.sub(MARK, text)
    if len(text) > max_length:
        notes.append(f"cut from {len(text)} to {max_length} characters")
        text = text[: max(0, max_length - 1)] + MARK if max_length > 0 else ""
    return Cleaned(text, tuple(notes))


def _kind(char: str) -> str:
    code = ord(char)
    if code == 0:
        return "NUL"
    if 0xD800 <= code <= 0xDFFF:
        return "lone surrogate"
    if code in (0xFFFE, 0xFFFF):
        return "non-character"
    return "control character"


def is_cleaned(text: str) -> bool:
    """Whether ``text`` carries the mark of cleaning (or the miner sent U+FFFD itself)."""
    return MARK in text


def max_length(model: type[BaseModel], field: str) -> int:
    """The ``max_length`` a contract model allows for ``field`` (one source for the limit)."""
    info: FieldInfo = model.model_fields[field]
    for item in info.metadata:
        limit = getattr(item, "max_length", None)
        if isinstance(limit, int):
            return limit
    raise LookupError(f"{model.__name__}.{field} has no max_length")
