"""What every export is made of, whatever the file format: typed columns, rows, a cover.

The builders (``register``, ``compliance_report``, ``audit_export``) produce a
:class:`Document`; the writers (``csv_writer``, ``xlsx_writer``, ``pdf_writer``) render it.
:func:`cell_text` is the one place that turns a value into text, so the CSV, the PDF and a
test reading either agree to the character.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from controller.exports.i18n import Lang, label, value_label

Kind = Literal[
    "text", "int", "float0", "float2", "datetime", "bool", "list", "state", "status", "outcome"
]
DECIMALS: dict[str, int] = {"float0": 0, "float2": 2}


@dataclass(frozen=True)
class Column:
    """One column: its label key, how its values are typed, and a width in characters."""

    key: str
    kind: Kind = "text"
    width: int = 14


@dataclass
class Table:
    """One table of a document (a CSV file, an XLSX sheet, a PDF section)."""

    name: str  # file stem, e.g. "register"
    sheet: str  # label key of the sheet / section title
    columns: tuple[Column, ...]
    rows: list[tuple[Any, ...]]
    parts: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """For the PDF: column groups printed one after another (too wide for one page), as
    (label key, column keys); the first column of the table is repeated in each part."""

    def header(self, lang: Lang) -> list[str]:
        return [label(c.key, lang) for c in self.columns]


@dataclass
class Document:
    """An export: its tables, the facts for the cover, and the totals."""

    kind: str  # register, compliance, audit
    lang: Lang
    tables: list[Table]
    cover: list[tuple[str, str]] = field(default_factory=list)  # (label key, text)
    totals: list[tuple[str, Any]] = field(default_factory=list)  # (label key or text, value)

    @property
    def title(self) -> str:
        return label(f"title.{self.kind}", self.lang)


def utc_text(value: datetime) -> str:
    """``2026-11-01T00:00:00Z``: seconds, UTC, the way every export writes times."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cell_value(value: Any, kind: Kind) -> Any:
    """A value normalised for its kind (rounded numbers), as XLSX stores it."""
    if value is None:
        return None
    if kind in DECIMALS:
        return round(float(value), DECIMALS[kind])
    if kind == "int":
        return int(value)
    return value


def cell_text(value: Any, kind: Kind, lang: Lang) -> str:
    """The text of one cell, identical in CSV and PDF."""
    if value is None:
        return ""
    if kind in DECIMALS:
        return f"{float(value):.{DECIMALS[kind]}f}"
    if kind == "int":
        return str(int(value))
    if kind == "datetime":
        return utc_text(value) if isinstance(value, datetime) else str(value)
    if kind == "bool":
        return label("yes" if value else "no", lang)
    if kind == "list":
        return "; ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
    if kind in ("state", "status", "outcome"):
        return value_label(kind, str(value), lang)
    return str(value)


Formatter = Callable[[Any], str]


def _plain(value: Any) -> str:
    if value is None:
        return ""
    return value if type(value) is str else str(value)


def formatters(columns: Sequence[Column], lang: Lang) -> list[Formatter]:
    """Per column, a function giving exactly :func:`cell_text` (fast paths for the common
    kinds: a 100,000-row register has millions of cells)."""
    out: list[Formatter] = []
    for column in columns:
        kind = column.kind
        if kind == "text":
            out.append(_plain)
        elif kind in DECIMALS:
            out.append(_number(f".{DECIMALS[kind]}f"))
        elif kind == "datetime":
            out.append(_datetime)
        elif kind in ("bool", "int", "state", "status", "outcome"):
            out.append(_memo(kind, lang))
        elif kind == "list":
            out.append(_list)
        else:
            out.append(_generic(kind, lang))
    return out


def _number(spec: str) -> Formatter:
    def fmt(value: Any) -> str:
        return "" if value is None else format(float(value), spec)

    return fmt


def _datetime(value: Any) -> str:
    """:func:`utc_text`; a UTC datetime takes C's ``isoformat`` rather than ``strftime``."""
    if value is None:
        return ""
    if value.__class__ is datetime and value.tzinfo is UTC:
        return value.isoformat(timespec="seconds")[:19] + "Z"
    return cell_text(value, "datetime", "en")


def _list(value: Any) -> str:
    if value.__class__ is list:
        return "; ".join(map(str, value))
    return cell_text(value, "list", "en")


def _memo(kind: Kind, lang: Lang) -> Formatter:
    """Few distinct values (yes/no, states, statuses, record versions): each is worded once."""
    seen: dict[Any, str] = {}

    def fmt(value: Any) -> str:
        text = seen.get(value)
        if text is None:
            text = seen[value] = cell_text(value, kind, lang)
        return text

    return fmt


def _generic(kind: Kind, lang: Lang) -> Formatter:
    def fmt(value: Any) -> str:
        return cell_text(value, kind, lang)

    return fmt


def row_texts(columns: Sequence[Column], row: Sequence[Any], lang: Lang) -> list[str]:
    return [cell_text(v, c.kind, lang) for c, v in zip(columns, row, strict=True)]
