"""XLSX: a summary sheet, then one sheet per table (frozen header, filters, sensible widths).

Written with XlsxWriter in ``constant_memory`` mode: each row goes to disk as soon as the
next one starts, so memory stays flat however many machines there are. Strings are never
turned into formulas, numbers or links: a pool URL or worker name that a miner reported is
stored as the text it was. Times are Excel date-times in UTC (the headers say so).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import xlsxwriter

from controller.exports.i18n import label
from controller.exports.table import Document, Table, cell_text, cell_value

_BAD_SHEET_CHARS = re.compile(r"[\[\]:*?/\\]")
MAX_WIDTH = 60


def sheet_name(text: str) -> str:
    """Excel's limits: 31 characters, none of ``[]:*?/\\``."""
    return _BAD_SHEET_CHARS.sub(" ", text)[:31]


def write_xlsx(document: Document, path: Path) -> dict[str, int]:
    """Write ``document``; returns data rows per table name."""
    workbook = xlsxwriter.Workbook(
        str(path),
        {
            "constant_memory": True,
            "strings_to_numbers": False,
            "strings_to_formulas": False,
            "strings_to_urls": False,
            "default_date_format": "yyyy-mm-dd hh:mm:ss",
        },
    )
    workbook.set_properties({"title": document.title, "author": "asicfleet"})
    bold = workbook.add_format({"bold": True})
    header = workbook.add_format({"bold": True, "bg_color": "#DDDDDD", "text_wrap": True})
    when = workbook.add_format({"num_format": "yyyy-mm-dd hh:mm:ss"})
    decimals = {
        0: workbook.add_format({"num_format": "0"}),
        2: workbook.add_format({"num_format": "0.00"}),
    }
    lang = document.lang

    summary = workbook.add_worksheet(sheet_name(label("sheet.summary", lang)))
    summary.set_column(0, 0, 36)
    summary.set_column(1, 1, 70)
    summary.write_string(0, 0, document.title, bold)
    row = 2
    for key, text in document.cover:
        summary.write_string(row, 0, label(key, lang), bold)
        summary.write_string(row, 1, text)
        row += 1
    row += 1
    if document.totals:
        summary.write_string(row, 0, label("cover.totals", lang), bold)
        row += 1
    for key, value in document.totals:
        summary.write_string(row, 0, label(key, lang))
        _write_plain(summary, row, 1, value)
        row += 1

    counts: dict[str, int] = {}
    for table in document.tables:
        counts[table.name] = _write_table(workbook, table, document, header, when, decimals)
    workbook.close()
    return counts


def _write_plain(sheet: Any, row: int, col: int, value: Any) -> None:
    if isinstance(value, bool) or value is None:
        sheet.write_string(row, col, "" if value is None else str(value))
    elif isinstance(value, int | float):
        sheet.write_number(row, col, value)
    else:
        sheet.write_string(row, col, str(value))


def _write_table(
    workbook: Any,
    table: Table,
    document: Document,
    header: Any,
    when: Any,
    decimals: dict[int, Any],
) -> int:
    lang = document.lang
    sheet = workbook.add_worksheet(sheet_name(label(table.sheet, lang)))
    columns = table.columns
    titles = table.header(lang)
    for index, (column, title) in enumerate(zip(columns, titles, strict=True)):
        width = min(MAX_WIDTH, max(column.width, min(len(title), 24)) + 2)
        fmt = when if column.kind == "datetime" else None
        if column.kind in ("float0", "float2"):
            fmt = decimals[0 if column.kind == "float0" else 2]
        sheet.set_column(index, index, width, fmt)
    sheet.set_row(0, 30)
    for index, title in enumerate(titles):
        sheet.write_string(0, index, title, header)
    sheet.freeze_panes(1, 0)
    sheet.autofilter(0, 0, max(len(table.rows), 1), len(columns) - 1)
    write_string = sheet.write_string
    write_number = sheet.write_number
    write_datetime = sheet.write_datetime
    kinds = [c.kind for c in columns]
    for r, values in enumerate(table.rows, start=1):
        for c, (kind, value) in enumerate(zip(kinds, values, strict=True)):
            if value is None:
                continue
            if kind == "datetime" and isinstance(value, datetime):
                write_datetime(r, c, _naive_utc(value), when)
            elif kind in ("float0", "float2", "int"):
                write_number(r, c, cell_value(value, kind))
            else:
                write_string(r, c, cell_text(value, kind, lang))
    return len(table.rows)


def _naive_utc(value: datetime) -> datetime:
    """Excel has no time zones: UTC wall time, to the second (as the CSV writes it)."""
    return value.astimezone(UTC).replace(tzinfo=None, microsecond=0)
