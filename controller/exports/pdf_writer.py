"""PDF: a cover (what, which site, period, generated when and by whom, totals), then each
table paginated with its header repeated on every page, and "Page N of M" on every page.

Drawn with ReportLab's canvas rather than its flowable tables: a 10,000-machine register is
tens of thousands of rows, and laying them out directly is an order of magnitude faster.
Nothing is truncated: a cell too long for its column wraps onto more lines. Tables wider
than a page are printed as parts (column groups), each starting with the machine id.
The font (DejaVu Sans Condensed, shipped in ``fonts/``) covers Latin and Cyrillic.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from reportlab.lib.pagesizes import A4, landscape
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.pdfgen import canvas as pdfcanvas

from controller.exports.i18n import Lang, label
from controller.exports.table import Column, Document, Table, cell_text

FONTS = Path(__file__).parent / "fonts"
FONT = "DejaVuSansCondensed"
BOLD = "DejaVuSansCondensed-Bold"
PAGE = landscape(A4)
MARGIN = 28.0
SIZE = 6.5
LEADING = 8.0
PAD = 2.0


@cache
def register_fonts() -> None:
    """Register the shipped TTFs once per process (the system's fonts are never used)."""
    pdfmetrics.registerFont(TTFont(FONT, str(FONTS / f"{FONT}.ttf")))
    pdfmetrics.registerFont(TTFont(BOLD, str(FONTS / f"{BOLD}.ttf")))


class _NumberedCanvas(pdfcanvas.Canvas):
    """Keeps each page until the end so that every footer can say how many pages there are."""

    def __init__(self, *args: Any, footer: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pages: list[dict[str, Any]] = []
        self._footer = footer

    def showPage(self) -> None:
        self._pages.append(dict(self.__dict__))
        self._startPage()  # type: ignore[attr-defined]

    def save(self) -> None:
        total = len(self._pages)
        for number, state in enumerate(self._pages, start=1):
            self.__dict__.update(state)
            self.setFont(FONT, 7)
            text = self._footer.format(page=number, pages=total)
            self.drawRightString(PAGE[0] - MARGIN, MARGIN / 2, text)
            super().showPage()
        super().save()


def write_pdf(document: Document, path: Path) -> int:
    """Write ``document``; returns the number of pages."""
    register_fonts()
    lang = document.lang
    canvas = _NumberedCanvas(
        str(path), pagesize=PAGE, footer=label("page", lang), pageCompression=1, invariant=0
    )
    canvas.setTitle(document.title)
    canvas.setAuthor("asicfleet")
    _cover(canvas, document)
    for table in document.tables:
        parts = table.parts or (("", tuple(c.key for c in table.columns)),)
        for part_key, keys in parts:
            title = label(table.sheet, lang)
            if part_key:
                title = label("part", lang).format(title=title, part=label(part_key, lang))
            _table(canvas, table, keys, title, lang)
    pages = len(canvas._pages)
    canvas.save()
    return pages


def _cover(canvas: pdfcanvas.Canvas, document: Document) -> None:
    lang = document.lang
    height = PAGE[1]
    y = height - MARGIN - 20
    canvas.setFont(BOLD, 18)
    canvas.drawString(MARGIN, y, document.title)
    y -= 30
    for key, text in document.cover:
        y = _pair(canvas, y, label(key, lang), text)
    if document.totals:
        y -= 10
        canvas.setFont(BOLD, 11)
        canvas.drawString(MARGIN, y, label("cover.totals", lang))
        y -= 16
        for key, value in document.totals:
            y = _pair(canvas, y, label(key, lang), str(value))
            if y < MARGIN + 40:
                canvas.showPage()
                y = height - MARGIN - 20
    canvas.setFont(FONT, 8)
    canvas.drawString(MARGIN, MARGIN + 10, label("cover.verify", lang))
    canvas.showPage()


def _pair(canvas: pdfcanvas.Canvas, y: float, name: str, text: str) -> float:
    canvas.setFont(BOLD, 9)
    canvas.drawString(MARGIN, y, name)
    canvas.setFont(FONT, 9)
    lines = _wrap(text, PAGE[0] - 2 * MARGIN - 200, FONT, 9) or [""]
    for line in lines:
        canvas.drawString(MARGIN + 200, y, line)
        y -= 13
    return y


def _table(
    canvas: pdfcanvas.Canvas, table: Table, keys: Sequence[str], title: str, lang: Lang
) -> None:
    by_key = {c.key: i for i, c in enumerate(table.columns)}
    first = table.columns[0].key
    wanted = [first, *(k for k in keys if k != first)]
    indexes = [by_key[k] for k in wanted]
    columns = [table.columns[i] for i in indexes]
    widths = _widths(columns, lang)
    headers = [
        _wrap(label(c.key, lang), w - 2 * PAD, BOLD, SIZE)
        for c, w in zip(columns, widths, strict=True)
    ]
    header_height = max(len(h) for h in headers) * LEADING + 2 * PAD
    top = PAGE[1] - MARGIN
    bottom = MARGIN + 10
    continued = label("continued", lang).format(title=title)

    def start_page(first_page: bool) -> float:
        canvas.setFont(BOLD, 10)
        canvas.drawString(MARGIN, top - 10, title if first_page else continued)
        y = top - 18
        canvas.setFillGray(0.87)
        canvas.rect(MARGIN, y - header_height, sum(widths), header_height, stroke=0, fill=1)
        canvas.setFillGray(0)
        canvas.setFont(BOLD, SIZE)
        x = MARGIN
        for lines, w in zip(headers, widths, strict=True):
            _lines(canvas, x + PAD, y - PAD - SIZE, lines)
            x += w
        return y - header_height

    y = start_page(True)
    canvas.setFont(FONT, SIZE)
    canvas.setLineWidth(0.2)
    for row in table.rows:
        cells = [
            _wrap(cell_text(row[i], c.kind, lang), w - 2 * PAD, FONT, SIZE)
            for i, c, w in zip(indexes, columns, widths, strict=True)
        ]
        height = max(len(c) for c in cells) * LEADING + 2 * PAD
        if y - height < bottom:
            canvas.showPage()
            y = start_page(False)
            canvas.setFont(FONT, SIZE)
            canvas.setLineWidth(0.2)
        x = MARGIN
        for lines, w in zip(cells, widths, strict=True):
            _lines(canvas, x + PAD, y - PAD - SIZE, lines)
            x += w
        y -= height
        canvas.line(MARGIN, y, MARGIN + sum(widths), y)
    canvas.showPage()


def _lines(canvas: pdfcanvas.Canvas, x: float, y: float, lines: list[str]) -> None:
    for line in lines:
        if line:
            canvas.drawString(x, y, line)
        y -= LEADING


def _widths(columns: Sequence[Column], lang: Lang) -> list[float]:
    """Column widths in points, proportional to each column's width in characters."""
    available = PAGE[0] - 2 * MARGIN
    weights = [max(c.width, 6) for c in columns]
    total = sum(weights)
    return [available * w / total for w in weights]


def _wrap(text: str, width: float, font: str, size: float) -> list[str]:
    """Greedy wrapping at spaces; a word longer than the line is broken between characters."""
    if not text:
        return [""]
    measure = pdfmetrics.stringWidth
    if measure(text, font, size) <= width and "\n" not in text:
        return [text]
    lines: list[str] = []
    for paragraph in text.split("\n"):
        current = ""
        for word in paragraph.split(" "):
            candidate = f"{current} {word}" if current else word
            if measure(candidate, font, size) <= width:
                current = candidate
                continue
            if current:
                lines.append(current)
            while measure(word, font, size) > width and len(word) > 1:
                cut = _fit(word, width, font, size)
                lines.append(word[:cut])
                word = word[cut:]
            current = word
        lines.append(current)
    return lines


def _fit(word: str, width: float, font: str, size: float) -> int:
    """How many leading characters of ``word`` fit in ``width`` (at least one)."""
    low, high = 1, len(word)
    while low < high:
        mid = (low + high + 1) // 2
        if pdfmetrics.stringWidth(word[:mid], font, size) <= width:
            low = mid
        else:
            high = mid - 1
    return low
