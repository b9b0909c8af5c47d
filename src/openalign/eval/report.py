"""Results of the eval commands as a plain-text table and as JSON, shared so every command reads the same."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np


def to_jsonable(value):
    """Numpy scalars and arrays to Python numbers and lists, NaN / inf to None (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _is_scalar(value) -> bool:
    return isinstance(value, (int, float, str, bool, np.generic)) or value is None


def format_table(metrics: Mapping, *, title: str | None = None, precision: int = 2) -> str:
    """Scalar entries of metrics as an aligned two-column table; lists and arrays are left to the JSON."""
    rows = []
    for key, value in metrics.items():
        if not _is_scalar(value):
            continue
        if isinstance(value, np.generic):
            value = value.item()
        text = f"{value:.{precision}f}" if isinstance(value, float) else str(value)
        rows.append((str(key), text))
    key_width = max((len(key) for key, _ in rows), default=0)
    value_width = max((len(text) for _, text in rows), default=0)
    lines = [f"{key:<{key_width}}  {text:>{value_width}}" for key, text in rows]
    if title:
        rule = "-" * max(len(title), key_width + 2 + value_width)
        lines = [title, rule, *lines]
    return "\n".join(lines)


def format_rows(rows: list[Mapping], *, precision: int = 2) -> str:
    """Several results (one dict each, e.g. per dataset or per class) as a table with one column per key."""
    columns = list(dict.fromkeys(key for row in rows for key, value in row.items() if _is_scalar(value)))

    def cell(value):
        if isinstance(value, np.generic):
            value = value.item()
        return f"{value:.{precision}f}" if isinstance(value, float) else ("" if value is None else str(value))

    cells = [[cell(row.get(column)) for column in columns] for row in rows]
    widths = [max([len(column)] + [len(line[index]) for line in cells]) for index, column in enumerate(columns)]
    header = "  ".join(column.ljust(width) for column, width in zip(columns, widths))
    body = ["  ".join(text.rjust(width) for text, width in zip(line, widths)) for line in cells]
    return "\n".join([header, "  ".join("-" * width for width in widths), *body])


def write_json(metrics: Mapping, path: str | Path) -> Path:
    """Write metrics (numpy values allowed) as indented JSON and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(metrics), indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return path


def report(metrics: Mapping, *, title: str, json_path: str | Path | None = None, print_table: bool = True,
           precision: int = 3) -> str:
    """Print the table (unless print_table is False), write the JSON when json_path is given, return the table.
    Three decimals by default: recall and accuracy are fractions (0-1) in every openalign output."""
    table = format_table(metrics, title=title, precision=precision)
    if print_table:
        print(table)
    if json_path is not None:
        write_json(metrics, json_path)
    return table
