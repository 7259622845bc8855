"""CSV (RFC 4180: comma, double quotes, CRLF) in UTF-8 with a byte-order mark.

The BOM is there because Excel opens a UTF-8 CSV without it as the local code page, which
garbles Cyrillic.

Text comes partly from miners (worker names, pool URLs, serials), so a cell could carry a
formula that a spreadsheet would run on opening (``=HYPERLINK(…)``, ``@SUM(…)``). Following
the OWASP rule for CSV injection, every text cell that starts with ``=``, ``+``, ``-``,
``@``, a tab or a carriage return is written with a leading ``'``, which spreadsheets show
as text and do not evaluate. That is the only change made to a value, and only there:
numbers and times are ours and never start with one of those characters in a text column.
The XLSX keeps every value exactly, as a string cell (never a formula).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from controller.exports.i18n import Lang
from controller.exports.table import Table, formatters

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
NEUTRAL_PREFIX = "'"
_TEXT_KINDS = frozenset({"text", "list"})


def neutralise(text: str) -> str:
    """``text`` safe to open in a spreadsheet (OWASP CSV-injection rule)."""
    return NEUTRAL_PREFIX + text if text.startswith(FORMULA_STARTS) else text


def write_csv(table: Table, lang: Lang, path: Path) -> int:
    """Write ``table`` to ``path``; returns the number of data rows."""
    with path.open("w", encoding="utf-8-sig", newline="") as handle:
        writer = csv.writer(handle, dialect="excel", lineterminator="\r\n")
        writer.writerow([neutralise(title) for title in table.header(lang)])
        width = len(table.columns)
        steps = list(enumerate(zip(formatters(table.columns, lang), table.columns, strict=True)))
        text = [(i, f) for i, (f, c) in steps if c.kind in _TEXT_KINDS]
        typed = [(i, f) for i, (f, c) in steps if c.kind not in _TEXT_KINDS]

        def cells(row: tuple[Any, ...]) -> list[Any]:
            if len(row) != width:
                raise ValueError(f"row has {len(row)} cells, the table {width} columns")
            out = list(row)
            for i, f in typed:
                out[i] = f(out[i])
            for i, f in text:
                value = out[i]
                if value is not None:
                    cell = value if value.__class__ is str else f(value)
                    out[i] = NEUTRAL_PREFIX + cell if cell.startswith(FORMULA_STARTS) else cell
            return out

        writer.writerows(map(cells, table.rows))
    return len(table.rows)
