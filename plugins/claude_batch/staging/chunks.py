"""A chunk of extracted rows as parallel columns, the unit every staging step works on.

Rows keep their 1-based row number of the extract. Dropping rows (each rejected with its
reason first) removes them from every column at once, so the columns stay aligned.
"""

from __future__ import annotations

from collections.abc import Mapping
from operator import itemgetter
from typing import Any

from claude_batch.staging.kernels import TextColumn

# Row values that are bytes: decoded as UTF-8 text, or shown as hex in rejects.
BINARY_TYPES = (bytes, bytearray, memoryview)


class Chunk:
    """Parallel columns of the rows still alive in one chunk; ``drop`` removes rows from all."""

    def __init__(self, rows: list[Mapping[str, Any]], first_row: int) -> None:
        self.rows = rows
        self.numbers = list(range(first_row, first_row + len(rows)))
        self.keys: list[Any] = []
        self.custom_ids: list[str] = []
        self.fields: dict[str, list[Any]] = {}
        self.text: dict[str, TextColumn] = {}
        self.models: list[str] = []

    def __len__(self) -> int:
        return len(self.rows)

    def drop(self, indexes: set[int]) -> None:
        if not indexes:
            return
        keep = [index for index in range(len(self.rows)) if index not in indexes]
        size = len(self.rows)
        for name in ("rows", "numbers", "keys", "custom_ids", "models"):
            column = getattr(self, name)
            if len(column) == size:
                setattr(self, name, [column[index] for index in keep])
        self.fields = {name: [column[index] for index in keep] for name, column in self.fields.items()}
        self.text = {name: column.take(keep) for name, column in self.text.items()}


def column_of(rows: list[Mapping[str, Any]], name: str) -> list[Any]:
    """One field of every row (None where a row lacks it)."""
    try:
        return list(map(itemgetter(name), rows))
    except (KeyError, TypeError):
        return [row.get(name) for row in rows]
