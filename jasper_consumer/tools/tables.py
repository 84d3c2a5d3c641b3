"""Plain-text tables (no colours, no terminal tricks): the output reads the same in a
terminal, a log file or a ticket."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def render_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    max_widths: Mapping[int, int] | None = None,
) -> str:
    """Rows under a header and a rule, columns two spaces apart; cells longer than
    ``max_widths[column]`` are cut with ``…``. The last column is not padded."""
    limits = max_widths or {}

    def cut(text: str, column: int) -> str:
        text = " ".join(text.split())  # a table row is one line
        limit = limits.get(column)
        return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"

    cells = [[cut(str(c), i) for i, c in enumerate(row)] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(widths[i]) for i, v in enumerate(values)).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    return "\n".join(out)
