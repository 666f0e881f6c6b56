"""Submit a staged shard as one batch, exactly once.

Plain Python, no Airflow: the operator is a thin shell over :class:`BatchSubmitter`.

- A shard (JSONL of ``{"custom_id", "params"}`` lines) is checked in one streaming pass
  before any paid call: request count, body size, custom_id syntax and uniqueness, and
  that every line is a request object. Errors name the line.
- The request body is streamed from the shard (``{"requests": [`` + lines + ``]}``), so memory
  does not grow with the shard; the lines are sent as staged, never re-serialised.
- Submission state is written in two phases with a fingerprint of the shard: the *intent*
  before the paid call, the *batch id* after it. A crash between the two is recovered by
  listing the batches created since the intent and matching the request count, never by
  paying again; if that cannot decide, it stops and says what to check.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import orjson
from anthropic.types.messages import MessageBatch

from claude_batch.contracts import CUSTOM_ID_PATTERN, MAX_BATCH_BYTES, MAX_REQUESTS_PER_BATCH
from claude_batch.storage import ObjectStore

_BODY_PREFIX = b'{"requests":['
_BODY_SUFFIX = b"]}"
_CHUNK_BYTES = 1 << 20
_READ_BYTES = 1 << 20
# Bytes per ranged GET: each request to S3 is a round trip (and moto copies the object for
# each), so 1 MB requests took 12 s a pass over a 200 MB shard on moto. 4 MB cut a submit of
# 100,000 requests from 26.5 s to 11.2 s for 5 MB more memory; 8 MB was faster still (6.9 s)
# but its peak grew 1.19x from 10,000 to 100,000 requests, against 1.14x.
_FETCH_BYTES = 4 << 20
# How far the API's clock may be behind ours when matching created_at to a recorded intent.
CLOCK_SKEW = timedelta(minutes=10)


class ShardRejected(ValueError):
    """The shard would be refused by the API; nothing was sent."""


class SubmissionUndecidable(RuntimeError):
    """A previous attempt may have created the batch, and the API's list cannot say which."""


class RequestSource(Protocol):
    """Where the requests of one batch come from: a re-readable stream of JSON lines."""

    description: str

    def lines(self) -> Iterator[bytes]:
        """Yield each request as one JSON object (bytes, no trailing newline)."""
        ...


@dataclass(frozen=True)
class StoredShard:
    """A staged JSONL shard in the object store.

    :param store: the object store.
    :param relpath: the shard's path under the store root.
    """

    store: ObjectStore
    relpath: str

    @property
    def description(self) -> str:
        return self.store.uri(self.relpath)

    def lines(self) -> Iterator[bytes]:
        # Split 1 MB reads ourselves (bigger reads fragment the heap as shards grow): fsspec's readline re-reads its block for every line.
        with self.store.open(self.relpath, "rb", block_size=_FETCH_BYTES) as handle:
            rest = b""
            while chunk := handle.read(_READ_BYTES):
                pieces = (rest + chunk).split(b"\n")
                rest = pieces.pop()
                for piece in pieces:
                    line = piece.strip()
                    if line:
                        yield line
            if rest.strip():
                yield rest.strip()


@dataclass(frozen=True)
class InlineRequests:
    """Requests given as a list (small jobs); serialised line by line as they are sent."""

    requests: list[dict[str, Any]]
    description: str = "inline requests"

    def lines(self) -> Iterator[bytes]:
        for request in self.requests:
            yield orjson.dumps(request)


@dataclass(frozen=True)
class Limits:
    """What the API accepts in one batch."""

    max_requests: int = MAX_REQUESTS_PER_BATCH
    max_body_bytes: int = MAX_BATCH_BYTES


@dataclass(frozen=True)
class ShardScan:
    """What one pass over a shard learned: enough to send it and to recognise it again."""

    request_count: int
    body_bytes: int
    fingerprint: str


def scan_requests(source: RequestSource, limits: Limits = Limits()) -> ShardScan:
    """Check a shard as the API would, in one streaming pass, and fingerprint it.

    :param source: the shard.
    :param limits: the API's per-batch limits.
    :raises ShardRejected: naming the first offending line (1-based) and the cause.
    """
    digest = hashlib.sha256()
    # 8 bytes per custom_id instead of a set of strings: memory stays flat as shards grow.
    id_hashes = array("q")
    count = 0
    body_bytes = len(_BODY_PREFIX) + len(_BODY_SUFFIX)
    where = source.description
    for count, line in enumerate(source.lines(), start=1):
        if count > limits.max_requests:
            raise ShardRejected(
                f"{where}: line {count}: more than {limits.max_requests:,} requests; the API takes at "
                "most that many per batch. Stage smaller shards."
            )
        body_bytes += len(line) + (1 if count > 1 else 0)
        if body_bytes > limits.max_body_bytes:
            raise ShardRejected(
                f"{where}: line {count}: the request body passes {limits.max_body_bytes:,} bytes, over the "
                "API's limit (HTTP 413). Stage smaller shards."
            )
        try:
            request = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ShardRejected(f"{where}: line {count}: not valid JSON ({exc})") from None
        if not isinstance(request, dict):
            raise ShardRejected(f"{where}: line {count}: a request must be a JSON object")
        custom_id = request.get("custom_id")
        if not isinstance(custom_id, str) or not CUSTOM_ID_PATTERN.fullmatch(custom_id):
            raise ShardRejected(
                f"{where}: line {count}: custom_id {custom_id!r} does not match ^[a-zA-Z0-9_-]{{1,64}}$"
            )
        id_hashes.append(_id_hash(custom_id))
        if not isinstance(request.get("params"), dict):
            raise ShardRejected(f"{where}: line {count}: 'params' must be an object (custom_id {custom_id!r})")
        digest.update(line)
        digest.update(b"\n")
    if count == 0:
        raise ShardRejected(f"{where}: no requests; the API needs at least one per batch")
    if _has_repeats(id_hashes):
        _raise_first_duplicate(source)
    return ShardScan(request_count=count, body_bytes=body_bytes, fingerprint=digest.hexdigest())


def _id_hash(custom_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(custom_id.encode(), digest_size=8).digest(), "little", signed=True)


def _has_repeats(values: array) -> bool:
    import numpy as np

    ordered = np.sort(np.frombuffer(values, dtype=np.int64))
    return bool((ordered[1:] == ordered[:-1]).any())


def _raise_first_duplicate(source: RequestSource) -> None:
    """A second pass, only when the hashes repeat: name the line (or it was a hash collision)."""
    first_line: dict[str, int] = {}
    for number, line in enumerate(source.lines(), start=1):
        custom_id = orjson.loads(line)["custom_id"]
        if custom_id in first_line:
            raise ShardRejected(
                f"{source.description}: line {number}: duplicate custom_id {custom_id!r} "
                f"(first on line {first_line[custom_id]})"
            )
        first_line[custom_id] = number


class BatchBody:
    """The create body, streamed from a shard in ~1 MiB chunks; re-iterable for a resend."""

    def __init__(self, source: RequestSource) -> None:
        self._source = source

    def __iter__(self) -> Iterator[bytes]:
        buffer = bytearray(_BODY_PREFIX)
        first = True
        for line in self._source.lines():
            if not first:
                buffer += b","
            buffer += line
            first = False
            if len(buffer) >= _CHUNK_BYTES:
                yield bytes(buffer)
                buffer.clear()
        buffer += _BODY_SUFFIX
        yield bytes(buffer)


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


def _now() -> datetime:
    return datetime.now(UTC)


def _total(batch: MessageBatch) -> int:
    counts = batch.request_counts
    return counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired


class BatchSubmitter:
    """Submits one source as one batch, idempotently, with state at ``state_relpath``.

    :param api: the batch API (a :class:`~claude_batch.hooks.ClaudeBatchHook`).
    :param store: where the state lives.
    :param state_relpath: this submission's state object, unique per DAG, task, run and map index.
    :param limits: the per-batch limits to enforce before sending.
    """

    def __init__(self, api: BatchApi, store: ObjectStore, state_relpath: str, limits: Limits = Limits()) -> None:
        self.api = api
        self.store = store
        self.state_relpath = state_relpath
        self.limits = limits

    @property
    def state_uri(self) -> str:
        return self.store.uri(self.state_relpath)

    def read_state(self) -> SubmissionState | None:
        data = self.store.read_json_or_none(self.state_relpath)
        return SubmissionState.from_json(data) if data else None

    def _write_state(self, state: SubmissionState) -> None:
        self.store.write_json(self.state_relpath, asdict(state))

    def submit(self, source: RequestSource, log: Callable[[str], None] = lambda _m: None) -> SubmissionResult:
        """Send ``source`` as a batch unless this submission already has one.

        :param source: the shard or inline requests.
        :param log: where to say what happened (the task log).
        """
        scan = scan_requests(source, self.limits)
        state = self.read_state()
        superseded: list[str] = []
        if state is not None:
            superseded = list(state.superseded_batch_ids)
            same_input = state.fingerprint == scan.fingerprint
            previous_id = state.batch_id or (self._recover(state) if state.phase == "intent" else None)
            if previous_id and same_input:
                how = "reattached" if state.phase == "submitted" else "recovered"
                if how == "recovered":
                    self._write_state(
                        SubmissionState(
                            **{**asdict(state), "phase": "submitted", "batch_id": previous_id, "submitted_at": _now().isoformat()}
                        )
                    )
                log(f"Batch {previous_id} was already submitted for this input ({how}); not submitting again.")
                return SubmissionResult(previous_id, scan.request_count, how)
            if previous_id and not same_input:
                log(f"The input changed since batch {previous_id} was submitted; cancelling it before resubmitting.")
                self.api.cancel_batch(previous_id)
                superseded.append(previous_id)

        intent = SubmissionState(
            phase="intent",
            fingerprint=scan.fingerprint,
            request_count=scan.request_count,
            body_bytes=scan.body_bytes,
            source=source.description,
            intent_at=_now().isoformat(),
            superseded_batch_ids=superseded,
        )
        self._write_state(intent)
        batch = self.api.create_batch_from_body(
            BatchBody(source), scan.body_bytes, scan.request_count, recover=lambda: self._find_one(intent)
        )
        intent.phase, intent.batch_id, intent.submitted_at = "submitted", batch.id, _now().isoformat()
        self._write_state(intent)
        log(f"Submitted batch {batch.id} with {scan.request_count:,} requests ({scan.body_bytes:,} bytes).")
        return SubmissionResult(batch.id, scan.request_count, "created")

    def _recover(self, state: SubmissionState) -> str | None:
        batch = self._find_one(state)
        return batch.id if batch else None

    def _find_one(self, state: SubmissionState) -> MessageBatch | None:
        """The batch an interrupted attempt created, if exactly one can be it."""
        since = datetime.fromisoformat(state.intent_at) - CLOCK_SKEW
        claimed = self._claimed_batch_ids() | set(state.superseded_batch_ids)
        candidates = [
            batch
            for batch in self.api.batches_created_since(since)
            if _total(batch) == state.request_count and batch.id not in claimed
        ]
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        ids = ", ".join(batch.id for batch in candidates)
        raise SubmissionUndecidable(
            f"A previous attempt recorded its intent to submit {state.request_count:,} requests at "
            f"{state.intent_at} but not the batch id, and {len(candidates)} unclaimed batches of that size "
            f"were created since: {ids}. Refusing to guess and refusing to pay twice. Check them in the "
            f"Claude Console: cancel the strays, then either write the right id into {self.state_uri} "
            "(set \"phase\": \"submitted\" and \"batch_id\") or delete that file to submit afresh."
        )

    def _claimed_batch_ids(self) -> set[str]:
        """Batch ids already recorded by sibling submissions (the other shards of this run)."""
        folder = self.state_relpath.rsplit("/", 1)[0]
        claimed: set[str] = set()
        for relpath in self.store.list(folder):
            if relpath == self.state_relpath or not relpath.endswith(".json"):
                continue
            data = self.store.read_json_or_none(relpath) or {}
            if data.get("batch_id"):
                claimed.add(data["batch_id"])
            claimed.update(data.get("superseded_batch_ids") or [])
        return claimed
