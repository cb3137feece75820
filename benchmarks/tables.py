"""Tables of benchmark results: aligned text for the terminal and markdown for benchmarks/results/.
The first ``text_columns`` columns are labels (left-aligned); the rest are numbers (right-aligned)."""

from __future__ import annotations

from collections.abc import Sequence


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 2) -> str:
    """Aligned columns, a rule under the header."""
    table = [list(headers), *map(list, rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if j < text_columns else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([line(table[0]), "  ".join("-" * w for w in widths), *map(line, table[1:])])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 2) -> list[str]:
    """A markdown table's lines, number columns right-aligned."""
    align = "|".join("---" if i < text_columns else "---:" for i in range(len(headers)))
    return ["| " + " | ".join(headers) + " |", "|" + align + "|", *("| " + " | ".join(r) + " |" for r in rows)]


def write_results(
    result: dict, headers: Sequence[str], rows: Sequence[Sequence[str]], json_path, markdown_path
) -> None:
    """Print the table; write ``result`` as JSON and the table as markdown where a path is given."""
    import json
    from pathlib import Path

    print(text_table(headers, rows))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    if markdown_path:
        Path(markdown_path).write_text("\n".join(markdown_table(headers, rows)) + "\n")
