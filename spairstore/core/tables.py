"""Plain-text and Markdown tables for reports: columns as ``(group, name)``, rows as ``(label, values)``."""
from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

Cell = float | int | str | None
Columns = Sequence[tuple[str, str]]
Rows = Sequence[tuple[str, Sequence[Cell]]]

#: Column names of the dataset paper's tables, for the terminal.
ABBREV = {"aeroplane": "aero", "bicycle": "bike", "motorbike": "mbike", "pottedplant": "plant",
          "tvmonitor": "tv", "diningtable": "table"}


def mib(n: int) -> str:
    """A byte count as people read disk sizes: ``1,234.5 MiB``."""
    return f"{n / 2**20:,.1f} MiB"


def brief(note: str, limit: int = 240) -> str:
    """A note for the terminal: one that lists more than fits ``limit`` characters keeps its first items
    (``; ``-separated) and says how many it left out; the store keeps the whole note (``info --json``)."""
    if len(note) <= limit:
        return note
    cut = note.rfind("; ", 0, limit)
    if cut < 0:
        return note[:limit] + "... (`spairstore info STORE --json` gives the whole note)"
    return f"{note[:cut]}; and {note.count('; ', cut)} more (`spairstore info STORE --json` lists them all)"


def setting(value: object) -> str:
    """A recorded setting as a message shows it: a list joined by commas, a SHA-256 cut to 12 digits."""
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    if value is None:
        return "none"
    return value[:12] if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) else str(value)


def cell(v: Cell) -> str:
    """Counts with thousands separators, percentages with one decimal, ``-`` for nothing; text as it is."""
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:,}" if isinstance(v, (int, np.integer)) else f"{v:.1f}"


def text_table(title: str, cols: Columns, rows: Rows) -> str:
    """Right-aligned columns; a second header line names column groups where there are any."""
    names = [ABBREV.get(n, n) for _, n in cols]
    w0 = max([len(r) for r, _ in rows] + [0])
    widths = [max(5, len(n), *(len(cell(v[i])) for _, v in rows)) for i, n in enumerate(names)]
    lines = [title]
    if any(g for g, _ in cols):
        groups, prev = [], None
        for (g, _), w in zip(cols, widths):
            groups.append((g if g != prev else "").ljust(w))
            prev = g
        lines.append(" " * w0 + " " + " ".join(groups).rstrip())
    lines.append(" " * w0 + " " + " ".join(n.rjust(w) for n, w in zip(names, widths)))
    lines += [r.ljust(w0) + " " + " ".join(cell(v).rjust(w) for v, w in zip(vals, widths)) for r, vals in rows]
    return "\n".join(lines)


def markdown_table(title: str, cols: Columns, rows: Rows) -> str:
    names = [f"{g} {n}".strip() for g, n in cols]
    lines = [f"**{title}**", "", "| | " + " | ".join(names) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {r} | " + " | ".join(cell(v) for v in vals) + " |" for r, vals in rows]
    return "\n".join(lines)
