"""Tables for the terminal (results, stats, recommendations) and as Markdown for MLflow."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Left-aligned first column, right-aligned numbers, one header rule."""
    cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.ljust(w) if i == 0 else v.rjust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    out = [line(list(columns)), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    return "\n".join(out)


def markdown_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], bold: Sequence[str] = ()
) -> str:
    """A GitHub-style Markdown table (what MLflow renders in a run's description); numbers
    right-aligned, the rows of the models in ``bold`` in bold."""
    numeric = [all(isinstance(r.get(c), int | float) for r in rows) for c in columns]
    head = "| " + " | ".join(columns) + " |"
    rule = "| " + " | ".join("---:" if n else "---" for n in numeric) + " |"
    lines = [head, rule]
    for row in rows:
        cells = [_cell(row.get(c, "")).replace("|", "\\|") for c in columns]
        if row.get(columns[0]) in bold:
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
