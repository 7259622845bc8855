"""Cleaning text that came from miners or agents: bounded, storable, and never silently changed.

Both databases refuse some strings Python accepts: PostgreSQL cannot store a NUL character in
text (or JSON), and a lone surrogate (``\\ud800``) cannot be encoded as UTF-8 at all (SQLite's
driver fails on it). Such characters are replaced with U+FFFD and an over-long string is cut
to its limit; every change is returned as a note, so the caller can record (or refuse) what
was cleaned rather than store a changed value as if it were the original.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REPLACEMENT = "\ufffd"
BAD_TEXT = re.compile("[\x00\ud800-\udfff]")  # what no database stores
_BAD = BAD_TEXT

MAX_DATA_DEPTH = 8  # nesting of structured event data
MAX_DATA_ITEMS = 256  # keys or list items per level
MAX_DATA_TEXT = 4096  # any string inside structured data


def needs_cleaning(value: str, max_len: int) -> bool:
    """The cheap test (most strings are clean): would :func:`clean_text` change ``value``?"""
    return len(value) > max_len or _BAD.search(value) is not None


def clean_text(value: str, max_len: int) -> tuple[str, list[str]]:
    """``value`` with NUL and lone surrogates replaced and cut to ``max_len``; and what changed.

    The notes are short and say only *what kind* of change was made (never the value, which
    may be hostile): ``"NUL replaced"``, ``"invalid code point replaced"``,
    ``"cut to 128 characters (was 300)"``.
    """
    notes: list[str] = []
    if _BAD.search(value) is not None:
        if "\x00" in value:
            notes.append("NUL replaced")
        if any("\ud800" <= ch <= "\udfff" for ch in value):
            notes.append("invalid code point replaced")
        value = _BAD.sub(REPLACEMENT, value)
    if len(value) > max_len:
        notes.append(f"cut to {max_len} characters (was {len(value)})")
        value = value[:max_len]
    return value, notes


def clean_data(value: Any, notes: list[str], *, path: str = "data", depth: int = 0) -> Any:
    """Structured JSON-like data with every key and string cleaned, nesting and width bounded.

    Anything deeper than :data:`MAX_DATA_DEPTH` or beyond :data:`MAX_DATA_ITEMS` per level is
    dropped *with a note*; notes name the path (``data.pool.url: NUL replaced``).
    """
    if isinstance(value, str):
        cleaned, found = clean_text(value, MAX_DATA_TEXT)
        notes.extend(f"{path}: {note}" for note in found)
        return cleaned
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
                name, found = clean_text(str(key), 128)
                notes.extend(f"{path} key: {note}" for note in found)
                out[name] = clean_data(item, notes, path=f"{path}.{name}", depth=depth + 1)
            return out
        return [
            clean_data(item, notes, path=f"{path}[{i}]", depth=depth + 1)
            for i, item in enumerate(list(value)[:MAX_DATA_ITEMS])
        ]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
        notes.append(f"{path}: integer beyond 64 bits, stored as text")
        return str(value)
    return value
