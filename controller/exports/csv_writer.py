"""CSV (RFC 4180: comma, double quotes, CRLF) in UTF-8 with a byte-order mark.

The BOM is there because Excel opens a UTF-8 CSV without it as the local code page, which
garbles Cyrillic. Cells are written exactly as they are (no ``'`` prefix against formula
injection): the file is evidence, and changing a value would falsify it; open CSVs from
untrusted data with care, or use the XLSX, which stores every cell as a plain value.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from controller.exports.i18n import Lang
from controller.exports.table import Table, formatters


def write_csv(table: Table, lang: Lang, path: Path) -> int:
    """Write ``table`` to ``path``; returns the number of data rows."""
    with path.open("w", encoding="utf-8-sig", newline="") as handle:
        writer = csv.writer(handle, dialect="excel", lineterminator="\r\n")
        writer.writerow(table.header(lang))
        # Text cells go to the csv module as they are (it writes None as "" and anything
        # else as str(), exactly like cell_text); only the other kinds are formatted.
        width = len(table.columns)
        typed = [
            (i, f)
            for i, (f, c) in enumerate(
                zip(formatters(table.columns, lang), table.columns, strict=True)
            )
            if c.kind != "text"
        ]

        def cells(row: tuple[Any, ...]) -> list[Any]:
            if len(row) != width:
                raise ValueError(f"row has {len(row)} cells, the table {width} columns")
            out = list(row)
            for i, f in typed:
                out[i] = f(out[i])
            return out

        writer.writerows(map(cells, table.rows))
    return len(table.rows)
