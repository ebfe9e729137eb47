"""The tables commands print for people (`experiment list`, `envoy list`): columns that align."""

from __future__ import annotations

from collections.abc import Sequence

from foedus.command.text import printable


def table_lines(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Each row a line, every column as wide as its widest cell plus two spaces; no trailing blanks.

    Cells are others' text (names, owners, reasons): made `printable` first, so they align as shown.
    """
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (headers, *rows)
    ]
