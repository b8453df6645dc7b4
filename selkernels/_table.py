"""The one plain-text table formatter of selkernels (benchmarks, demo, analyses)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def format_number(value, spec: str = ".4g", missing: str = "n/a") -> str:
    """``value`` formatted with ``spec``; ``missing`` for None and NaN, other non-numbers as str."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def render(header: Sequence[str], body: Sequence[Sequence[str]], *, left: int = 0, title: str = "") -> str:
    """Columns of text cells: the first ``left`` left-aligned, the others (numbers) right-aligned."""
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines: list[str] = [title] if title else []
    lines += [line(header), "  ".join("-" * w for w in widths)] + [line(row) for row in body]
    return "\n".join(lines)
