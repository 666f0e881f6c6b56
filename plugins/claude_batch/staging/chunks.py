"""A chunk of extracted rows as parallel columns, the unit every staging step works on.

Rows keep their 1-based row number of the extract. Dropping rows (each rejected with its
reason first) removes them from every column at once, so the columns stay aligned. A chunk's
rows are mappings, or an Arrow record batch (:class:`BatchRows`), whose columns become lists
without a dict per row: a row is built as a mapping only where one is needed (a rejected row,
a routing rule).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import chain
from operator import itemgetter
from typing import Any, overload

import pyarrow as pa

from claude_batch.staging.kernels import TextColumn

# Row values that are bytes: decoded as UTF-8 text, or shown as hex in rejects.
BINARY_TYPES = (bytes, bytearray, memoryview)


class Chunk:
    """Parallel columns of the rows still alive in one chunk; ``drop`` removes rows from all."""

    def __init__(self, rows: Sequence[Mapping[str, Any]], first_row: int) -> None:
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
        if isinstance(self.rows, BatchRows):
            self.rows = self.rows.take(keep)
        for name in ("rows", "numbers", "keys", "custom_ids", "models"):
            column = getattr(self, name)
            if len(column) == size:
                setattr(self, name, [column[index] for index in keep])
        self.fields = {name: [column[index] for index in keep] for name, column in self.fields.items()}
        self.text = {name: column.take(keep) for name, column in self.text.items()}


def peek_rows(rows: Iterable[Any]) -> tuple[bool | None, Iterator[Any]]:
    """Whether ``rows`` come as Arrow record batches (None: there are none), and the same rows.

    Rows come either as mappings or as record batches, never mixed; the first item tells which,
    and is put back in front of the rest.
    """
    iterator = iter(rows)
    for first in iterator:
        return isinstance(first, pa.RecordBatch), chain([first], iterator)
    return None, iterator


class BatchRows(Sequence[Mapping[str, Any]]):
    """The rows of an Arrow record batch: each column read as a list at once, a row on demand.

    A row is the mapping ``RecordBatch.to_pylist`` gives (every column of the batch, in its
    order), so staging treats it as it treats rows that arrive as mappings.
    """

    def __init__(self, batch: pa.RecordBatch) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return self.batch.num_rows

    @overload
    def __getitem__(self, index: int) -> Mapping[str, Any]: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Mapping[str, Any]]: ...
    def __getitem__(self, index: int | slice) -> Mapping[str, Any] | Sequence[Mapping[str, Any]]:
        if isinstance(index, slice):
            return self.batch.to_pylist()[index]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return self.batch.slice(index % len(self), 1).to_pylist()[0]

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        return iter(self.batch.to_pylist())

    def take(self, keep: list[int]) -> BatchRows:
        return BatchRows(self.batch.take(pa.array(keep, pa.int64())))

    def column(self, name: str) -> list[Any]:
        """The column's values (None for every row when the batch has no such column)."""
        names = self.batch.schema.names
        if name not in names:
            return [None] * len(self)
        # As in the row's mapping, the last of columns of the same name holds the value.
        return self.batch.column(len(names) - 1 - names[::-1].index(name)).to_pylist()


def column_of(rows: Sequence[Mapping[str, Any]], name: str) -> list[Any]:
    """One field of every row (None where a row lacks it)."""
    if isinstance(rows, BatchRows):
        return rows.column(name)
    try:
        return list(map(itemgetter(name), rows))
    except (KeyError, TypeError):
        return [row.get(name) for row in rows]
