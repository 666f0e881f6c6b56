"""Submit a staged shard as one batch, exactly once.

Plain Python, no Airflow: the operator is a thin shell over :class:`BatchSubmitter`.

- A shard (JSONL of ``{"custom_id", "params"}`` lines) is checked in one streaming pass
  before any paid call: request count, body size, custom_id syntax and uniqueness, and
  that every line is a request object. Errors name the line. A shard staging wrote (its
  manifest records the shard's sha256) is not parsed as JSON line by line: its lines are
  orjson's output, so the scan reads each custom_id off the line's fixed opening and, if the
  digest at the end is not the recorded one, scans again in full before anything is sent.
- The shard is read from the store once: the scan keeps a local copy (a temporary file) that
  the request body streams from (``{"requests": [`` + lines + ``]}``), so memory does not grow
  with the shard; the lines are sent as staged, never re-serialised.
- Submission state is written in two phases with a fingerprint of the shard: the *intent*
  before the paid call, the *batch id* after it. A crash between the two is recovered by
  listing the batches created since the intent, never by paying again: one unclaimed batch of
  the right size is taken; among several, the one whose results hold exactly the shard's
  custom_ids (recorded as a digest in the intent) is. A candidate still running makes the
  attempt fail retryably (:class:`RecoveryPending`); two exact matches stop it, saying what to
  check.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from array import array
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
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
    :param sha256: the shard's digest as staging recorded it (``ShardManifest.sha256``), if known:
        the scan then trusts the lines to be JSON (see :func:`scan_requests`).
    """

    store: ObjectStore
    relpath: str
    sha256: str | None = None

    @property
    def description(self) -> str:
        return self.store.uri(self.relpath)

    def chunks(self) -> Iterator[bytes]:
        # 1 MB reads, split by us (bigger reads fragment the heap as shards grow): fsspec's readline re-reads its block for every line.
        with self.store.open(self.relpath, "rb", block_size=_FETCH_BYTES) as handle:
            yield from iter(lambda: handle.read(_READ_BYTES), b"")

    def lines(self) -> Iterator[bytes]:
        return _split_lines(self.chunks())


class _LocalCopy:
    """A stored shard read from the store once: the first pass keeps it in a temporary file.

    Every later pass (the request body, a resend, a second scan) reads the local file, which
    costs a fraction of the CPU of another pass through S3.
    """

    def __init__(self, shard: StoredShard, directory: str) -> None:
        self.shard = shard
        self.description = shard.description
        self.sha256 = shard.sha256
        self._directory = directory
        self._path: str | None = None

    def lines(self) -> Iterator[bytes]:
        if self._path is not None:
            with open(self._path, "rb") as handle:
                yield from _split_lines(iter(lambda: handle.read(_READ_BYTES), b""))
            return
        path = f"{self._directory}/shard.jsonl"
        with open(path, "wb") as copy:

            def teed() -> Iterator[bytes]:
                for chunk in self.shard.chunks():
                    copy.write(chunk)
                    yield chunk

            yield from _split_lines(teed())
        self._path = path  # only a whole pass is kept


@contextmanager
def _read_once(source: RequestSource) -> Iterator[RequestSource]:
    if not isinstance(source, StoredShard):
        yield source
        return
    with tempfile.TemporaryDirectory(prefix="claude-batch-shard-") as directory:
        yield _LocalCopy(source, directory)


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
    """What one pass over a shard learned: enough to send it and to recognise it again.

    ``custom_ids_digest`` is the same for the same custom_ids in any order (see
    :func:`custom_ids_digest`); ``id_hashes`` holds their sorted 64-bit hashes (8 bytes each).
    """

    request_count: int
    body_bytes: int
    fingerprint: str
    custom_ids_digest: str = ""
    id_hashes: Any = field(default=None, repr=False, compare=False)


# How staging (``workloads.RequestEncoder``) opens every line: the custom_id, then the params object.
# (The custom_id rule is contracts.py's, without its anchors.)
_STAGED_LINE = re.compile(
    rb'\{"custom_id":"(' + CUSTOM_ID_PATTERN.pattern.strip("^$").encode() + rb')","params":\{'
)


def scan_requests(source: RequestSource, limits: Limits = Limits()) -> ShardScan:
    """Check a shard as the API would, in one streaming pass, and fingerprint it.

    A source with a recorded ``sha256`` (a shard staging wrote) is trusted to hold JSON lines:
    each line's custom_id is read off its opening instead of parsing the whole line (two
    thirds of the scan's CPU). If the digest of what was read differs from the recorded one,
    the shard is scanned again in full, so an edited or damaged shard is still named by line.

    :param source: the shard.
    :param limits: the API's per-batch limits.
    :raises ShardRejected: naming the first offending line (1-based) and the cause.
    """
    expected = getattr(source, "sha256", None)
    if expected:
        scan = _scan(source, limits, trusted=True)
        if scan.fingerprint == expected:
            return scan
    return _scan(source, limits, trusted=False)


def _scan(source: RequestSource, limits: Limits, *, trusted: bool) -> ShardScan:
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
        opening = _STAGED_LINE.match(line) if trusted else None
        if opening is not None and line.endswith(b"}"):
            id_hashes.append(_id_hash(opening.group(1)))
            digest.update(line)
            digest.update(b"\n")
            continue
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
            raise ShardRejected(
                f"{where}: line {count}: 'params' must be an object (custom_id {custom_id!r})"
            )
        digest.update(line)
        digest.update(b"\n")
    if count == 0:
        raise ShardRejected(f"{where}: no requests; the API needs at least one per batch")
    ordered = _sorted(id_hashes)
    if _has_repeats(ordered):
        _raise_first_duplicate(source)
    return ShardScan(
        request_count=count,
        body_bytes=body_bytes,
        fingerprint=digest.hexdigest(),
        custom_ids_digest=_digest_of_sorted(ordered),
        id_hashes=ordered,
    )


def _id_hash(custom_id: str | bytes) -> int:
    data = custom_id if isinstance(custom_id, bytes) else custom_id.encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def _sorted(values: array) -> Any:
    import numpy as np

    return np.sort(np.frombuffer(values, dtype=np.int64))


def _has_repeats(ordered: Any) -> bool:
    return bool((ordered[1:] == ordered[:-1]).any())


def _digest_of_sorted(ordered: Any) -> str:
    return hashlib.sha256(ordered.astype("<i8", copy=False).tobytes()).hexdigest()


def custom_ids_digest(custom_ids: Iterable[str]) -> str:
    """The order-independent digest of a set of custom_ids, as recorded in the intent.

    SHA-256 over the sorted 64-bit BLAKE2b hashes (little-endian) of the ids: 8 bytes an id
    in memory, so 100,000 ids take 800 kB, not a set of strings.

    :param custom_ids: the ids, in any order.
    """
    return _digest_of_sorted(_sorted(array("q", (_id_hash(custom_id) for custom_id in custom_ids))))


def _contains(ordered: Any, value: int) -> bool:
    at = int(ordered.searchsorted(value))
    return at < len(ordered) and int(ordered[at]) == value


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


def result_custom_ids(api: Any, batch_id: str) -> Iterator[str]:
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


def _split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    rest = b""
    for chunk in chunks:
        pieces = (rest + chunk).split(b"\n")
        rest = pieces.pop()
        for piece in pieces:
            line = piece.strip()
            if line:
                yield line
    if rest.strip():
        yield rest.strip()


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

    def __init__(
        self, api: BatchApi, store: ObjectStore, state_relpath: str, limits: Limits = Limits()
    ) -> None:
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
        with _read_once(source) as local:
            return self._submit(local, log)

    def _submit(self, source: RequestSource, log: Callable[[str], None]) -> SubmissionResult:
        scan = scan_requests(source, self.limits)
        state = self.read_state()
        superseded: list[str] = []
        if state is not None:
            superseded = list(state.superseded_batch_ids)
            same_input = state.fingerprint == scan.fingerprint
            previous_id = state.batch_id or (
                self._recover(state, scan if same_input else None) if state.phase == "intent" else None
            )
            if previous_id and same_input:
                how = "reattached" if state.phase == "submitted" else "recovered"
                if how == "recovered":
                    self._write_state(
                        SubmissionState(
                            **{
                                **asdict(state),
                                "phase": "submitted",
                                "batch_id": previous_id,
                                "submitted_at": _now().isoformat(),
                                "custom_ids_digest": state.custom_ids_digest or scan.custom_ids_digest,
                            }
                        )
                    )
                log(
                    f"Batch {previous_id} was already submitted for this input ({how}); not submitting again."
                )
                return SubmissionResult(previous_id, scan.request_count, how)
            if previous_id and not same_input:
                log(
                    f"The input changed since batch {previous_id} was submitted; cancelling it before resubmitting."
                )
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
            custom_ids_digest=scan.custom_ids_digest,
        )
        self._write_state(intent)
        batch = self.api.create_batch_from_body(
            BatchBody(source),
            scan.body_bytes,
            scan.request_count,
            recover=lambda: self._find_one(intent, scan),
        )
        intent.phase, intent.batch_id, intent.submitted_at = "submitted", batch.id, _now().isoformat()
        self._write_state(intent)
        log(f"Submitted batch {batch.id} with {scan.request_count:,} requests ({scan.body_bytes:,} bytes).")
        return SubmissionResult(batch.id, scan.request_count, "created")

    def _recover(self, state: SubmissionState, scan: ShardScan | None = None) -> str | None:
        batch = self._find_one(state, scan)
        return batch.id if batch else None

    def _find_one(self, state: SubmissionState, scan: ShardScan | None = None) -> MessageBatch | None:
        """The batch an interrupted attempt created, if exactly one can be it.

        One unclaimed batch of the right size is taken as it is. Among several, each that has
        ended is ours if its results hold exactly the shard's custom_ids; a batch still running
        cannot be checked yet.

        :param state: the intent of the interrupted attempt.
        :param scan: the scan of the same input (same fingerprint), if at hand: its id hashes let
            a foreign batch be ruled out at its first foreign custom_id.
        :raises RecoveryPending: (retryable) no ended candidate is ours and some have not ended or
            could not be read.
        :raises SubmissionUndecidable: several candidates hold exactly these custom_ids, or the
            state has no digest to check them against.
        """
        since = datetime.fromisoformat(state.intent_at) - CLOCK_SKEW
        claimed = self._claimed_batch_ids() | set(state.superseded_batch_ids)
        candidates = [
            batch
            for batch in self.api.batches_created_since(since)
            if _total(batch) == state.request_count and batch.id not in claimed
        ]
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        expected = state.custom_ids_digest or (scan.custom_ids_digest if scan is not None else None)
        if not expected:
            why = "This state has no digest of its custom_ids and the input changed since, so none can be checked."
            raise SubmissionUndecidable(self._undecidable(state, candidates, why))
        ours = scan.id_hashes if scan is not None and scan.custom_ids_digest == expected else None
        matches: list[MessageBatch] = []
        waiting: dict[str, str] = {}
        for batch in candidates:
            if batch.processing_status != "ended":
                waiting[batch.id] = batch.processing_status
                continue
            try:
                if self._holds_exactly(batch, expected, ours):
                    matches.append(batch)
            except _Unreadable as exc:
                waiting[batch.id] = f"ended, but its results could not be read whole ({exc})"
        if len(matches) == 1:
            return matches[0]
        if matches:
            why = f"{' and '.join(b.id for b in matches)} all hold exactly this shard's custom_ids (another run sent the same ones)."
            raise SubmissionUndecidable(self._undecidable(state, candidates, why))
        if not waiting:
            return None  # every candidate holds other custom_ids: the create never landed
        which = ", ".join(f"{batch_id} ({why})" for batch_id, why in waiting.items())
        until = (
            f"batch {next(iter(waiting))} ends" if len(waiting) == 1 else f"batches {', '.join(waiting)} end"
        )
        raise RecoveryPending(
            f"A previous attempt recorded its intent to submit {state.request_count:,} requests at "
            f"{state.intent_at} but not the batch id, and {len(candidates)} unclaimed batches of that size "
            f"were created since. None of those checked holds this shard's custom_ids; not checked yet: "
            f"{which}. Only a batch's results list its custom_ids, and they exist once it has ended. "
            f"Nothing was created. This will be decidable when {until}; a task retry checks again.",
            list(waiting),
        )

    def _holds_exactly(self, batch: MessageBatch, expected: str, ours: Any) -> bool:
        """Whether an ended batch's results hold exactly the custom_ids whose digest is ``expected``.

        :param batch: an ended candidate of the right size.
        :param expected: the shard's :func:`custom_ids_digest`.
        :param ours: the shard's sorted id hashes, or ``None`` (then the whole results are read).
        :raises _Unreadable: the results could not be read whole, so they prove nothing.
        """
        seen = array("q")
        try:
            with closing(result_custom_ids(self.api, batch.id)) as custom_ids:
                for custom_id in custom_ids:
                    value = _id_hash(custom_id)
                    if ours is not None and not _contains(ours, value):
                        return False  # a foreign id is proof, even from a cut stream
                    seen.append(value)
        except Exception as exc:  # a download cut, a 404, a bad line: retry later, never create
            raise _Unreadable(f"{type(exc).__name__}: {exc}") from exc
        if len(seen) != _total(batch):
            raise _Unreadable(f"{len(seen):,} result lines for {_total(batch):,} requests")
        return _digest_of_sorted(_sorted(seen)) == expected

    def _undecidable(self, state: SubmissionState, candidates: list[MessageBatch], why: str) -> str:
        ids = ", ".join(batch.id for batch in candidates)
        return (
            f"A previous attempt recorded its intent to submit {state.request_count:,} requests at "
            f"{state.intent_at} but not the batch id, and {len(candidates)} unclaimed batches of that size "
            f"were created since: {ids}. {why} Refusing to guess and refusing to pay twice. Check them in the "
            f"Claude Console: cancel the strays, then either write the right id into {self.state_uri} "
            '(set "phase": "submitted" and "batch_id") or delete that file to submit afresh.'
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
