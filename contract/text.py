"""Strings from miners and agents are data: bounded in length and cleaned of what no store holds.

A miner (or malware on it) chooses every string it reports: serial, MAC, hostname, model,
firmware, pool URL, worker, error text; an agent (or whoever holds its credential) chooses every
string of a report. A NUL byte breaks PostgreSQL text columns, a lone surrogate (``\\ud800``,
which JSON can carry as an escape) breaks UTF-8 encoding, SQLite's driver and pydantic, and a
100 KB serial breaks the contract's limits. Any of these used to fail a whole poll cycle on the
agent, or a whole batch (a 500, retried forever) on the controller.

:func:`clean_text` is the one rule for both sides of the wire. It never changes a value
silently: every character it cannot keep (NUL and other control characters but tab, lone
surrogates, non-characters) becomes U+FFFD, a value longer than the limit is cut and its last
character becomes U+FFFD, and what was done comes back as notes for the evidence. So a cleaned
value can never be mistaken for a clean one: an approved pool URL or worker never contains
U+FFFD, and a cleaned pool reading therefore never counts as compliant. Surrounding whitespace
is kept: a worker named ``" kzfarm01.M1"`` is not the approved ``"kzfarm01.M1"``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

MARK = "\ufffd"
"""What replaces a character that cannot be kept (and the last character of a cut value)."""

# C0 controls except tab, DEL, C1 controls, surrogates (lone ones: Python strings from JSON
# escapes or surrogateescape can hold them), and the non-characters U+FFFE/U+FFFF.
BAD_TEXT = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")

MAX_DATA_DEPTH = 8  # nesting of structured event data
MAX_DATA_ITEMS = 256  # keys or list items per level
MAX_DATA_TEXT = 4096  # any string inside structured data
MAX_KEY_TEXT = 128  # any key inside structured data


@dataclass(frozen=True, slots=True)
class Cleaned:
    """A cleaned value and what cleaning it took (empty ``notes``: the value was clean)."""

    text: str
    notes: tuple[str, ...] = ()


def needs_cleaning(value: str, max_length: int) -> bool:
    """The cheap test (most strings are clean): would :func:`clean_text` change ``value``?"""
    return len(value) > max_length or BAD_TEXT.search(value) is not None


def clean_text(value: str, max_length: int) -> Cleaned:
    """``value`` with invalid characters replaced and cut to ``max_length``; each change is
    named in the notes ("2 invalid character(s) replaced (NUL, lone surrogate)", "cut from
    300 to 128 characters"), never quoting the value itself, which may be hostile."""
    text = value
    notes: list[str] = []
    invalid = BAD_TEXT.findall(text)
    if invalid:
        kinds = sorted({_kind(c) for c in invalid})
        notes.append(f"{len(invalid)} invalid character(s) replaced ({', '.join(kinds)})")
        text = BAD_TEXT.sub(MARK, text)
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
    """The length limit a contract model declares for ``field`` (one source for the limit):
    a ``max_length`` constraint, or the documented ``maxLength`` of a field that is cleaned
    rather than refused."""
    info: FieldInfo = model.model_fields[field]
    for item in info.metadata:
        limit = getattr(item, "max_length", None)
        if isinstance(limit, int):
            return limit
    extra = info.json_schema_extra
    if isinstance(extra, dict) and isinstance(extra.get("maxLength"), int):
        limit = extra["maxLength"]
        assert isinstance(limit, int)
        return limit
    raise LookupError(f"{model.__name__}.{field} has no max_length")


def clean_data(value: Any, notes: list[str], *, path: str = "data", depth: int = 0) -> Any:
    """Structured JSON-like data with every key and string cleaned, nesting and width bounded.

    Anything deeper than :data:`MAX_DATA_DEPTH` or beyond :data:`MAX_DATA_ITEMS` per level is
    dropped *with a note*; notes name the path (``data.pool.url: 1 invalid character(s) …``).
    """
    if isinstance(value, str):
        cleaned = clean_text(value, MAX_DATA_TEXT)
        notes.extend(f"{path}: {note}" for note in cleaned.notes)
        return cleaned.text
    if isinstance(value, Mapping | list | tuple):
        if depth >= MAX_DATA_DEPTH:
            notes.append(f"{path}: nested deeper than {MAX_DATA_DEPTH} levels, dropped")
            return None
        size = len(value)
        if size > MAX_DATA_ITEMS:
            notes.append(f"{path}: {size} items, only the first {MAX_DATA_ITEMS} kept")
        if isinstance(value, Mapping):
            out: dict[str, Any] = {}
            for key, item in list(value.items())[:MAX_DATA_ITEMS]:
                name = clean_text(str(key), MAX_KEY_TEXT)
                notes.extend(f"{path} key: {note}" for note in name.notes)
                out[name.text] = clean_data(
                    item, notes, path=f"{path}.{name.text}", depth=depth + 1
                )
            return out
        return [
            clean_data(item, notes, path=f"{path}[{i}]", depth=depth + 1)
            for i, item in enumerate(list(value)[:MAX_DATA_ITEMS])
        ]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
        notes.append(f"{path}: integer beyond 64 bits, stored as text")
        return str(value)
    return value
