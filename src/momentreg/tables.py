"""The one table layer: rows of cells -> Markdown or CSV. The report, the CLI, the study scripts
and the benchmarks all print their tables through it.

``align`` is one letter per column, ``l`` or ``r`` (``"lrr"``); without it every column is left
as Markdown renders it by default.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from momentreg.errors import ConfigError
from momentreg.files import atomic_write

__all__ = ["fmt", "markdown_table", "csv_text", "write_table", "attack_table"]


def fmt(value, spec=".2f", missing="") -> str:
    """A number as a table cell; ``missing`` where there is none."""
    return missing if value is None else format(value, spec)


def markdown_table(header: list, rows: list[list], align: str | None = None) -> str:
    """``| a | b |`` lines: the header, the alignment row, one line per row (no final newline)."""
    if align is not None and len(align) != len(header):
        raise ConfigError(f"align has {len(align)} letters for {len(header)} columns")
    marks = ["---:" if a == "r" else "---" for a in (align or "l" * len(header))]
    lines = ["| " + " | ".join(str(c) for c in header) + " |", "|" + "|".join(marks) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def csv_text(header: list, rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    return buf.getvalue()


def write_table(header: list, rows: list[list], folder: Path, name: str = "table") -> list[Path]:
    """``folder/name.md`` and ``folder/name.csv``, each written atomically; returns both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.md", folder / f"{name}.csv"]
    atomic_write(paths[0], (markdown_table(header, rows) + "\n").encode())
    atomic_write(paths[1], csv_text(header, rows).encode())
    return paths


def attack_table(results: dict) -> str:
    """A run's attacks.json: success rate and perturbation sizes per attack."""
    header = ["attack", "success", "energy mean", "energy median", "L2 median", "Linf median"]
    rows = [
        [name, fmt(r["success_rate"], ".3f")]
        + [fmt(r[k], ".3g") for k in ("energy_mean", "energy_median", "l2_median", "linf_median")]
        for name, r in results.items()
    ]
    return markdown_table(header, rows, align="lrrrrr")
