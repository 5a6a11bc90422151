"""Plain-text tables for the evaluation commands (no third-party table library needed)."""

from __future__ import annotations

from typing import Sequence

__all__ = ["format_value", "format_table"]

#: Shown for a statistic that is undefined (no questions of that type, no timings, ...).
MISSING = "-"


def format_value(value: object, digits: int = 2) -> str:
    """Floats with ``digits`` decimals, ints as they are, None as ``-``."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], digits: int = 2) -> str:
    """A table with a header rule; the first column left-aligned, the others right-aligned."""
    cells = [[format_value(v, digits) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"row {row} has {len(row)} cells, expected {len(headers)}")
        widths = [max(w, len(c)) for w, c in zip(widths, row)]

    def line(values: Sequence[str]) -> str:
        parts = [
            value.ljust(width) if column == 0 else value.rjust(width)
            for column, (value, width) in enumerate(zip(values, widths))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(list(headers)), rule, *(line(row) for row in cells)])
