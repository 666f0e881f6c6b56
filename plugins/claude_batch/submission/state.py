"""The two-phase submission state, what a submit returns, and the API calls a submitter makes.

The state is written with a fingerprint of the shard: the *intent* before the paid call, the
*batch id* after it (docs/architecture.md). :class:`BatchApi` and :class:`ResultIdsApi` are
what :class:`~claude_batch.submission.BatchSubmitter` asks of ``ClaudeBatchHook``.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import orjson
from anthropic.types.messages import MessageBatch

from claude_batch.submission.sources import _split_lines


class SubmissionUndecidable(RuntimeError):
    """A previous attempt may have created the batch, and the API's list cannot say which."""


class RecoveryPending(SubmissionUndecidable):
    """Not decidable yet, but will be: a candidate batch has not ended, or its results could not be read.

    Retryable: nothing was created, and a later attempt reads the candidates' results again.

    :param message: what to wait for.
    :param batch_ids: the candidates still to check.
    """

    def __init__(self, message: str, batch_ids: list[str]) -> None:
        super().__init__(message)
        self.batch_ids = batch_ids


class _Unreadable(Exception):
    """A candidate's results could not be read whole, so they prove nothing either way."""


@dataclass
class SubmissionState:
    """The two-phase record of one submission (``phase`` is ``intent`` or ``submitted``)."""

    phase: str
    fingerprint: str
    request_count: int
    body_bytes: int
    source: str
    intent_at: str
    batch_id: str | None = None
    submitted_at: str | None = None
    superseded_batch_ids: list[str] = field(default_factory=list)
    # None in states written before it existed: recovery then falls back to the shard's scan.
    custom_ids_digest: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SubmissionState:
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in data.items() if key in known})


@dataclass(frozen=True)
class SubmissionResult:
    """What :meth:`BatchSubmitter.submit` did.

    ``how`` is ``created`` (a new paid call), ``reattached`` (the state already had the batch)
    or ``recovered`` (found through ``list`` after a crash before the state write).
    """

    batch_id: str
    request_count: int
    how: str


class BatchApi(Protocol):
    """The calls the submitter needs (``ClaudeBatchHook`` provides them)."""

    def create_batch_from_body(
        self,
        body: Iterable[bytes],
        body_bytes: int,
        request_count: int,
        recover: Callable[[], MessageBatch | None],
    ) -> MessageBatch: ...

    def batches_created_since(self, created_after: datetime) -> Iterator[MessageBatch]: ...

    def retrieve_batch(self, batch_id: str) -> MessageBatch: ...

    def cancel_batch(self, batch_id: str) -> MessageBatch: ...


class ResultIdsApi(Protocol):
    """An optional extra of a :class:`BatchApi`: the custom_ids of an ended batch's results.

    Without it, :func:`result_custom_ids` reads them through the SDK client at ``api.conn``
    (as ``ClaudeBatchHook`` has).
    """

    def result_custom_ids(self, batch_id: str) -> Iterator[str]: ...


def result_custom_ids(api: Any, batch_id: str) -> Generator[str, None, None]:
    """The custom_ids in an ended batch's results, streamed in the order the API serves them.

    Only ``custom_id`` is kept of each line; closing the iterator early closes the download.

    :param api: a :class:`ResultIdsApi`, or an object with an ``anthropic.Anthropic`` at ``conn``.
    :param batch_id: a batch whose ``processing_status`` is ``ended``.
    """
    own = getattr(api, "result_custom_ids", None)
    if own is not None:
        yield from own(batch_id)
        return
    with api.conn.messages.batches.with_streaming_response.results(batch_id) as response:
        for line in _split_lines(response.iter_bytes()):
            yield orjson.loads(line)["custom_id"]
