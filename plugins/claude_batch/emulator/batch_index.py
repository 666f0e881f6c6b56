"""The live batches, by id and in creation order, and the pages the list endpoint answers.

Every batch gets a sequence number (``seq``) at creation; the order of creation is the order
of seqs, so a page is a slice of the sorted list of live seqs (``bisect``). A deleted batch's
id keeps its seq, so it still works as a list cursor. Not thread-safe: the store's lock guards
it.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator

from .batch import Batch
from .errors import invalid_request, not_found


class BatchIndex:
    """The live batches: by id, by seq, and their seqs oldest first."""

    def __init__(self) -> None:
        self._by_id: dict[str, Batch] = {}
        self._seq_by_id: dict[str, int] = {}  # also of deleted batches, so they still work as cursors
        self._order: list[int] = []  # seqs of live batches, oldest first
        self._by_seq: dict[int, Batch] = {}

    def add(self, batch: Batch) -> None:
        """Register a new batch (its seq is higher than every earlier one's)."""
        self._by_id[batch.id] = batch
        self._by_seq[batch.seq] = batch
        self._seq_by_id[batch.id] = batch.seq
        self._order.append(batch.seq)

    def remove(self, batch: Batch) -> None:
        del self._by_id[batch.id]
        del self._by_seq[batch.seq]
        del self._order[bisect_left(self._order, batch.seq)]

    def get(self, batch_id: str) -> Batch:
        """The live batch with this id; the API's 404 otherwise."""
        batch = self._by_id.get(batch_id)
        if batch is None:
            raise not_found(f"No Message Batch found with id {batch_id!r}.")
        return batch

    def by_seq(self, seq: int) -> Batch | None:
        return self._by_seq.get(seq)

    def __iter__(self) -> Iterator[Batch]:
        return iter(self._by_seq.values())

    def page(self, *, limit: int, after_id: str | None, before_id: str | None) -> tuple[list[Batch], bool]:
        """(a page of batches, newest first; whether there are more): after_id pages to older
        batches, before_id to newer ones."""
        order = self._order
        if after_id is not None:
            end = bisect_left(order, self._cursor_seq(after_id, "after_id"))
            start = max(0, end - limit)
            has_more = start > 0
        elif before_id is not None:
            start = bisect_right(order, self._cursor_seq(before_id, "before_id"))
            end = min(len(order), start + limit)
            has_more = end < len(order)
        else:
            end = len(order)
            start = max(0, end - limit)
            has_more = start > 0
        by_seq = self._by_seq
        return [by_seq[seq] for seq in reversed(order[start:end])], has_more

    def _cursor_seq(self, batch_id: str, name: str) -> int:
        seq = self._seq_by_id.get(batch_id)
        if seq is None:
            raise invalid_request(f"{name}: no Message Batch with id {batch_id!r}")
        return seq

    def result_lines_pending(self) -> int:
        """Result lines not made yet, over every live batch."""
        return sum(batch.size - batch.results.next_index for batch in self if batch.results is not None)

    def results_stored_bytes(self) -> int:
        return sum(batch.results.stored_bytes for batch in self if batch.results is not None)
