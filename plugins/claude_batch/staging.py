"""Staging: stream extracted rows into request shards on S3, with a manifest.

Each shard ``requests/part-NNNNN.jsonl`` holds lines ``{"custom_id", "params"}`` (exactly what
the Batches API create takes per request), at most ``max_requests_per_shard`` of them and at
most ``max_shard_bytes``. Beside it, ``requests/part-NNNNN.keys.parquet`` maps each custom_id
back to its record key (custom_ids may be hashes of the key). Rows that cannot be sent are never
dropped: each goes to ``requests/rejects.jsonl`` with the row, its ledger key and a reason, and
the ledger records it as ``dead``. ``manifest.json`` lists shards, counts, bytes, checksums, the
prompt version, the models and a token and cost estimate.

Memory stays flat: rows are processed in chunks, lines are buffered a megabyte at a time, and
duplicate detection keeps 8 bytes per key (sorted runs of 64-bit key hashes).
"""

from __future__ import annotations

import hashlib
import re
import string
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from itertools import islice
from operator import itemgetter
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from claude_batch.contracts import MAX_BATCH_BYTES, MAX_REQUESTS_PER_BATCH, custom_id_for
from claude_batch.costs import (
    CHARS_PER_TOKEN,
    REQUEST_OVERHEAD_TOKENS,
    CacheSetting,
    CostEstimate,
    ModelEstimate,
    PriceTable,
    default_prices,
)
from claude_batch.storage import RunLayout
from claude_batch.tuning import bulk_processing
from claude_batch.workloads import Workload

MANIFEST_FORMAT = 1
DEFAULT_MAX_SHARD_BYTES = 128 * 1000 * 1000
# The create body wraps the lines in {"requests": [...]}: keep a margin under the API's 256 MB.
MAX_SHARD_BYTES_LIMIT = int(MAX_BATCH_BYTES * 0.9)
_S3_BLOCK_SIZE = 8 * 1024 * 1024
_WRITE_PIECE_BYTES = 2 * 1024 * 1024
# Rows per chunk adapt so a chunk renders to about this many bytes of requests.
_CHUNK_TARGET_BYTES = 4 * 1024 * 1024
# C0 controls other than tab, newline and carriage return, DEL, and lone surrogates (what
# invalid UTF-8 becomes under surrogateescape): one scan finds any of them.
_BAD_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SURROGATES = re.compile(r"[\ud800-\udfff]")
# custom_id_for's rule for keys used as they are (tests check the two agree); anything else
# goes through custom_id_for itself.
_AS_IS_CUSTOM_ID = re.compile(r"(?!k_[0-9a-f]{40}\Z)[a-zA-Z0-9_-]{1,64}")  # use with fullmatch
# What JSON needs escaped once other control characters are rejected; backslash goes first.
_JSON_ESCAPES = (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\t", "\\t"), ("\r", "\\r"))
_AS_IS_CUSTOM_IDS_JOINED = re.compile(r"(?:[a-zA-Z0-9_-]{1,64}\n)*[a-zA-Z0-9_-]{1,64}")  # fullmatch
# custom_ids are plain ASCII ([a-zA-Z0-9_-]), so they go between fixed quotes unescaped.
_LINE_HEAD = b'{"custom_id":"'
_BINARY = (bytes, bytearray, memoryview)

SHARD_KEYS_SCHEMA = pa.schema(
    [
        ("custom_id", pa.string()),
        ("record_key", pa.string()),
        ("row_number", pa.int64()),
        ("model", pa.string()),
    ]
)


class StagingError(RuntimeError):
    """Staging cannot go on (bad limits, a workload routing to models without a price)."""


@dataclass(frozen=True)
class StagingLimits:
    """Shard limits: the API allows 100,000 requests and 256 MB per batch.

    :param max_requests_per_shard: requests per shard (1..100,000).
    :param max_shard_bytes: bytes per shard, at most 90% of 256 MB.
    """

    max_requests_per_shard: int = MAX_REQUESTS_PER_BATCH
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES

    def __post_init__(self) -> None:
        if not 1 <= self.max_requests_per_shard <= MAX_REQUESTS_PER_BATCH:
            raise StagingError(f"max_requests_per_shard must be 1..{MAX_REQUESTS_PER_BATCH}")
        if not 1024 <= self.max_shard_bytes <= MAX_SHARD_BYTES_LIMIT:
            raise StagingError(f"max_shard_bytes must be 1024..{MAX_SHARD_BYTES_LIMIT}")


@dataclass(frozen=True)
class ShardManifest:
    """One staged shard. Paths are relative to the run's prefix."""

    part: int
    requests: str
    keys: str
    count: int
    bytes: int
    sha256: str
    models: dict[str, int]


@dataclass(frozen=True)
class Manifest:
    """What staging produced for one run (``manifest.json``)."""

    workload: str
    prompt_version: str
    dag_id: str
    run_id: str
    cache_setting: CacheSetting
    key_field: str
    models: list[str]
    extracted_rows: int
    staged_requests: int
    rejected_rows: int
    rejected_by_reason: dict[str, int]
    rejects: str
    shards: list[ShardManifest]
    limits: dict[str, int]
    estimate: dict[str, Any]
    created_at: str
    format: int = MANIFEST_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        values = dict(data)
        values["shards"] = [ShardManifest(**shard) for shard in data["shards"]]
        return cls(**values)

    def shard(self, part: int) -> ShardManifest:
        for shard in self.shards:
            if shard.part == part:
                return shard
        raise KeyError(f"no shard part {part} in the manifest of run {self.run_id!r}")


def shard_keys_path(layout: RunLayout, part: int) -> str:
    """``requests/part-NNNNN.keys.parquet``: the custom_id -> record key map of a shard."""
    return layout.shard_keys(part)


def rejects_path(layout: RunLayout) -> str:
    """``requests/rejects.jsonl``: every row staging could not send, with the reason."""
    return layout.rejects


def _relative(layout: RunLayout, path: str) -> str:
    return path[len(layout.prefix) + 1 :]


def _full(layout: RunLayout, relative: str) -> str:
    return f"{layout.prefix}/{relative}"


def _json_default(value: Any) -> Any:
    if isinstance(value, _BINARY):
        return {"$bytes_hex": bytes(value).hex()}
    return str(value)


def _jsonable_row(row: Mapping[str, Any]) -> bytes:
    """The row as JSON, whatever it holds (bytes as hex, lone surrogates escaped)."""
    try:
        return orjson.dumps(
            dict(row), default=_json_default, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS
        )
    except (orjson.JSONEncodeError, TypeError):
        cleaned = {
            str(k): (v.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(v, str) else v)
            for k, v in row.items()
        }
        return orjson.dumps(cleaned, default=_json_default, option=orjson.OPT_SORT_KEYS)


def _describe_bad_char(text: str) -> tuple[str, str]:
    """(reason_code, description) for the first control character or lone surrogate."""
    surrogate = _SURROGATES.search(text)
    control = _CONTROL_CHARS.search(text)
    if surrogate is not None and (control is None or surrogate.start() < control.start()):
        return (
            "invalid_utf8",
            f"invalid UTF-8 (lone surrogate U+{ord(surrogate.group()):04X} at character {surrogate.start()})",
        )
    if control is None:
        return "invalid_utf8", "text that is not valid UTF-8"
    return (
        "control_character",
        f"control character U+{ord(control.group()):04X} at character {control.start()}",
    )


def _rows_with_control_chars(contents: list[str]) -> list[int]:
    """Indexes of the contents holding a control character other than tab, newline or CR, or DEL.

    One numpy pass over the chunk's text instead of a regex per row (Python's ``re`` scans a
    character class at a few nanoseconds a character; this is a small fraction of that).
    """
    joined = "\n".join(contents)
    ascii_only = joined.isascii()
    data = np.frombuffer(joined.encode("utf-8", "surrogatepass"), dtype=np.uint8)
    low = data < 32
    # Counting is much cheaper than locating: the usual chunk holds only tabs, newlines and CRs.
    if "\x7f" not in joined and np.count_nonzero(low) == sum(
        np.count_nonzero(data == allowed) for allowed in (9, 10, 13)
    ):
        return []
    if "\x7f" in joined:
        low |= data == 127
    suspects = np.flatnonzero(low)
    if suspects.size == 0:
        return []
    values = data[suspects]
    bad = suspects[(values != 9) & (values != 10) & (values != 13)]
    if bad.size == 0:
        return []
    # Byte offset -> row: each content is followed by one separator byte.
    if ascii_only:
        lengths = np.fromiter((len(c) + 1 for c in contents), dtype=np.int64, count=len(contents))
    else:
        lengths = np.fromiter(
            (len(c.encode("utf-8", "surrogatepass")) + 1 for c in contents),
            dtype=np.int64,
            count=len(contents),
        )
    ends = np.cumsum(lengths)
    return sorted(set(np.searchsorted(ends, bad, side="right").tolist()))


def _keys_not_usable_as_is(keys: list[Any]) -> list[int]:
    """Indexes of keys that are not text usable as a custom_id as they are (NULL, ints, hashes...).

    The common case, every key fine, is one regex over the chunk's keys joined by newlines
    (no valid key holds a newline, so the count of separators proves the split); otherwise
    each key is checked on its own.
    """
    if keys and set(map(type, keys)) == {str}:
        joined = "\n".join(keys)
        if (
            "k_" not in joined  # no key can have the reserved hashed shape
            and joined.count("\n") == len(keys) - 1
            and _AS_IS_CUSTOM_IDS_JOINED.fullmatch(joined)
        ):
            return []
    return [i for i, key in enumerate(keys) if type(key) is not str or not _AS_IS_CUSTOM_ID.fullmatch(key)]


@dataclass
class _TextColumn:
    """One template field over a chunk: checked, and escaped for a JSON string.

    :param escaped: each value as it goes between the JSON string's quotes.
    :param char_lengths: characters of each value (the context-window and cost estimates).
    :param byte_lengths: UTF-8 bytes of each escaped value (the line sizes).
    :param bad_rows: index -> (reason_code, description) of values that cannot be sent.
    """

    escaped: list[str]
    char_lengths: np.ndarray
    byte_lengths: np.ndarray
    bad_rows: dict[int, tuple[str, str]]

    def take(self, keep: list[int]) -> _TextColumn:
        return _TextColumn(
            [self.escaped[i] for i in keep], self.char_lengths[keep], self.byte_lengths[keep], {}
        )


def _inspect_text_column(values: list[str]) -> _TextColumn:
    """Check and JSON-escape a column of text in a few passes over the whole chunk.

    Control characters other than tab, newline and CR, DEL, and lone surrogates (invalid UTF-8)
    make a row bad. The rest needs only backslash, quote, tab, newline and CR escaped, which
    ``str.replace`` does at memory speed on the values joined by NUL (a separator no good value
    holds); a column needing none of it (the usual case) is used as it is, with no copy per row.
    The result is byte for byte what ``orjson.dumps`` writes between the quotes.
    """
    count = len(values)
    if not count:
        empty = np.empty(0, dtype=np.int64)
        return _TextColumn([], empty, empty, {})
    joined = "\x00".join(values)
    char_lengths = np.fromiter(map(len, values), dtype=np.int64, count=count)
    ascii_only = joined.isascii()
    data = np.frombuffer(joined.encode("utf-8", "surrogatepass"), dtype=np.uint8)
    controls = int(np.count_nonzero(data < 32)) - (count - 1)  # less the separators
    escapable = controls and sum(int(np.count_nonzero(data == allowed)) for allowed in (9, 10, 13))
    bad_rows: dict[int, tuple[str, str]] = {}
    if controls != escapable or "\x7f" in joined:
        bad_rows.update((i, _describe_bad_char(values[i])) for i in _rows_with_control_chars(values))
    if not ascii_only and _SURROGATES.search(joined):
        bad_rows.update(
            (i, _describe_bad_char(value)) for i, value in enumerate(values) if _SURROGATES.search(value)
        )
    if bad_rows:
        return _TextColumn(values, char_lengths, char_lengths, bad_rows)
    escaped_joined = joined
    if escapable or "\\" in joined or '"' in joined:
        for raw, escaped in _JSON_ESCAPES:
            if raw in escaped_joined:
                escaped_joined = escaped_joined.replace(raw, escaped)
    if escaped_joined is joined:
        escaped, escaped_chars = values, char_lengths
    else:
        escaped = escaped_joined.split("\x00")
        escaped_chars = np.fromiter(map(len, escaped), dtype=np.int64, count=count)
    if ascii_only:
        byte_lengths = escaped_chars
    else:  # bytes between the separators of the encoded column
        encoded = np.frombuffer(escaped_joined.encode("utf-8"), dtype=np.uint8)
        bounds = np.concatenate(([-1], np.flatnonzero(encoded == 0), [len(encoded)]))
        byte_lengths = np.diff(bounds) - 1
    return _TextColumn(escaped, char_lengths, byte_lengths, {})


class _BackgroundIO:
    """Runs shard hashing and writing on one worker thread, in order.

    hashlib and file/S3 writes release the GIL, so the main thread keeps rendering meanwhile;
    at most ``depth`` jobs wait, which bounds the memory they hold.
    """

    def __init__(self, depth: int = 4) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="claude-batch-staging")
        self._pending: deque[Future[Any]] = deque()
        self._depth = depth

    def submit(self, fn: Any, *args: Any) -> None:
        self._pending.append(self._pool.submit(fn, *args))
        while len(self._pending) > self._depth:
            self._pending.popleft().result()

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self._pool.shutdown(wait=True)


class _ShardWriter:
    """One shard being written: the JSONL lines and the keys sidecar, streamed to the store.

    ``count`` and ``bytes`` are tracked on the main thread; the writes happen on the I/O thread.
    """

    def __init__(self, layout: RunLayout, part: int) -> None:
        self.part = part
        self.path = layout.requests(part)
        self.keys_path = shard_keys_path(layout, part)
        self.count = 0
        self.bytes = 0
        self.models: dict[str, int] = {}
        self._sha = hashlib.sha256()
        self._stack = ExitStack()
        self._handle: Any = None
        self._keys_writer: pq.ParquetWriter | None = None

    def open(self, layout: RunLayout) -> None:
        self._handle = self._stack.enter_context(
            layout.store.open(self.path, "wb", block_size=_S3_BLOCK_SIZE)
        )
        keys_handle = self._stack.enter_context(
            layout.store.open(self.keys_path, "wb", block_size=_S3_BLOCK_SIZE)
        )
        self._keys_writer = self._stack.enter_context(pq.ParquetWriter(keys_handle, SHARD_KEYS_SCHEMA))

    def write_lines(self, data: bytes) -> None:
        self._sha.update(data)
        self._handle.write(data)

    def write_keys(self, keys: pa.RecordBatch) -> None:
        assert self._keys_writer is not None
        self._keys_writer.write_batch(keys)

    def close(self) -> None:
        self._stack.close()

    def manifest(self, layout: RunLayout) -> ShardManifest:
        return ShardManifest(
            part=self.part,
            requests=_relative(layout, self.path),
            keys=_relative(layout, self.keys_path),
            count=self.count,
            bytes=self.bytes,
            sha256=self._sha.hexdigest(),
            models=dict(sorted(self.models.items())),
        )


@dataclass
class _Rejections:
    """Rejected rows, streamed to ``requests/rejects.jsonl``."""

    handle: Any
    count: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    synthetic_keys: dict[str, int] = field(default_factory=dict)

    def add(
        self,
        row_number: int,
        record_key: str | None,
        ledger_key: str | None,
        code: str,
        reason: str,
        row_json: bytes,
    ) -> None:
        if ledger_key is None:
            # No usable key: name the item by its content, so a re-run finds the same ledger row.
            ledger_key = self.unique(f"{code}#{hashlib.sha256(row_json).hexdigest()[:16]}")
        line = orjson.dumps(
            {
                "row_number": row_number,
                "record_key": record_key,
                "ledger_key": ledger_key,
                "status": "dead",
                "reason_code": code,
                "reason": f"row {row_number}: {reason}",
            }
        )
        self.handle.write(line[:-1] + b',"row":' + row_json + b"}\n")
        self.count += 1
        self.by_reason[code] = self.by_reason.get(code, 0) + 1

    def unique(self, key: str) -> str:
        """Identical rows without a usable key get ``-2``, ``-3``... so each stays one item."""
        seen = self.synthetic_keys.get(key, 0) + 1
        self.synthetic_keys[key] = seen
        return key if seen == 1 else f"{key}-{seen}"


class _SeenKeys:
    """Which record keys this extract has already produced, in 8 bytes per key.

    Keys are remembered by their 64-bit hash in sorted numpy runs: new keys join an open run,
    which is frozen once it holds ``_RUN_KEYS`` keys; beyond a few frozen runs, the newest merge
    while the older is no bigger (as in a log-structured merge tree), so a lookup searches a
    handful of runs and memory grows by 8 bytes a key. A hash collision (about 1 in 10^7 at a
    million keys) would mark a row as a duplicate, which is reported, never silently dropped.
    """

    _RUN_KEYS = 262_144
    _MERGE_ABOVE_RUNS = 4

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []
        self._open = np.empty(0, dtype=np.int64)

    @staticmethod
    def _found(run: np.ndarray, wanted: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        if not len(run):
            return np.zeros(len(wanted), dtype=bool)
        if positions is None:
            positions = np.searchsorted(run, wanted)
        return run[np.minimum(positions, len(run) - 1)] == wanted

    def repeated(self, keys: list[str]) -> list[int]:
        """Indexes of the keys seen before, earlier in this chunk or in an earlier one."""
        if not keys:
            return []
        hashes = np.fromiter(map(hash, keys), dtype=np.int64, count=len(keys))
        order = np.argsort(hashes, kind="stable")
        ordered = hashes[order]
        # Sorted stably, a key's later rows in this chunk follow its first one.
        known = np.zeros(len(keys), dtype=bool)
        known[1:] = ordered[1:] == ordered[:-1]
        for run in self._runs:
            known |= self._found(run, ordered)
        positions = np.searchsorted(self._open, ordered)
        known |= self._found(self._open, ordered, positions)
        fresh = ~known
        self._open = np.insert(self._open, positions[fresh], ordered[fresh])
        if len(self._open) >= self._RUN_KEYS:
            self._runs.append(self._open)
            self._open = np.empty(0, dtype=np.int64)
            # Merging costs a copy of the runs it joins: only once a lookup would search many.
            while len(self._runs) > self._MERGE_ABOVE_RUNS and len(self._runs[-2]) <= len(self._runs[-1]):
                newer, older = self._runs.pop(), self._runs.pop()
                merged = np.concatenate((older, newer))
                merged.sort(kind="stable")  # timsort: two sorted runs merge in linear time
                self._runs.append(merged)
        return np.sort(order[known]).tolist()


class _Chunk:
    """Parallel columns of the rows still alive in one chunk; ``drop`` removes rows from all."""

    def __init__(self, rows: list[Mapping[str, Any]], first_row: int) -> None:
        self.rows = rows
        self.numbers = list(range(first_row, first_row + len(rows)))
        self.keys: list[Any] = []
        self.custom_ids: list[str] = []
        self.fields: dict[str, list[Any]] = {}
        self.text: dict[str, _TextColumn] = {}
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


def _column(rows: list[Mapping[str, Any]], name: str) -> list[Any]:
    """One field of every row (None where a row lacks it)."""
    try:
        return list(map(itemgetter(name), rows))
    except (KeyError, TypeError):
        return [row.get(name) for row in rows]


class _Stager:
    def __init__(
        self,
        workload: Workload,
        layout: RunLayout,
        key_field: str,
        cache_setting: CacheSetting,
        prices: PriceTable,
        limits: StagingLimits,
        assumed_cache_hit_rate: float,
        key_name: str | None = None,
    ) -> None:
        self.workload = workload
        self.layout = layout
        self.key_field = key_field
        self.key_name = key_name or key_field
        self.cache_setting = cache_setting
        self.prices = prices
        self.limits = limits
        self.assumed_cache_hit_rate = assumed_cache_hit_rate
        self.encoder = workload.encoder(cache_setting)
        self.text_fields = set(workload.required_text_fields)
        self.strip_controls = workload.control_characters == "strip"
        self.max_tokens = workload.max_tokens
        self.prefix_tokens = workload.prefix_tokens
        self.template_parts = [
            (literal, name)
            for literal, name, _spec, _conv in string.Formatter().parse(workload.user_template)
        ]
        self.allowed_models = set(workload.models)
        for model in self.allowed_models:
            if prices.find(model) is None:
                raise StagingError(f"workload {workload.name!r} uses model {model!r}, which has no price")
        # The longest user content (in characters, ~4 a token) that fits each model's window.
        self.max_content_chars = {
            model: (
                prices.for_model(model).context_window
                - self.max_tokens
                - self.prefix_tokens
                - REQUEST_OVERHEAD_TOKENS
            )
            * CHARS_PER_TOKEN
            for model in self.allowed_models
        }
        self._line_layout()
        self.chars_by_model: dict[str, int] = {}
        self.count_by_model: dict[str, int] = {}
        self.rows_seen = 0
        self.bytes_staged = 0
        self.seen = _SeenKeys()
        self.writers: list[_ShardWriter] = []
        self.shard: _ShardWriter | None = None
        self.io = _BackgroundIO()
        self.stack = ExitStack()
        rejects_handle = self.stack.enter_context(layout.store.open(rejects_path(layout), "wb"))
        self.rejections = _Rejections(rejects_handle)

    def _line_layout(self) -> None:
        """Split a request line into constant text and per-row columns, serialised once.

        A line is ``head, custom_id, opening, field, literal, field, ..., tail``: the opening
        holds the model's params up to the content's opening quote and the template's first
        literal; literals are JSON-escaped here once.
        """
        segments: list[str | tuple[str]] = []  # constant text, or (field name,)
        pending = ""
        for literal, name in self.template_parts:
            pending += orjson.dumps(literal)[1:-1].decode() if literal else ""
            if name is not None:
                segments.append(pending)
                segments.append((name,))
                pending = ""
        self.first_literal = segments.pop(0) if segments else pending
        if not segments:  # a template without fields: the first literal was the whole text
            pending = ""
        self.segments = segments
        self.tail = pending + '"' + self.encoder.suffix.decode()
        self.field_occurrences = [segment[0] for segment in segments if isinstance(segment, tuple)]
        self.literal_chars = sum(len(literal) for literal, _name in self.template_parts if literal)
        self.fixed_bytes = (
            len(_LINE_HEAD)
            + len(self.tail.encode())
            + sum(len(segment.encode()) for segment in segments if isinstance(segment, str))
        )
        self._openings: dict[str, str] = {}

    def _opening(self, model: str) -> str:
        """The text from the custom_id's closing quote to the first field of the content."""
        opening = self._openings.get(model)
        if opening is None:
            opening = '"' + self.encoder.prefix(model).decode() + '"' + self.first_literal
            self._openings[model] = opening
        return opening

    # -- per chunk ------------------------------------------------------------------------

    def add_chunk(self, rows: list[Mapping[str, Any]]) -> None:
        """Check, render and encode a chunk of rows, then hand the lines to the shards.

        Every step runs over whole columns (C-level maps, numpy, pyarrow); rows with bad input
        leave through the slow paths, each rejected with its reason.
        """
        chunk = _Chunk(rows, self.rows_seen + 1)
        self.rows_seen += len(rows)
        self._keys(chunk)
        self._duplicates(chunk)
        self._fields(chunk)
        self._check_text(chunk)
        self._models_and_sizes(chunk)
        self._write_lines(chunk)

    def _keys(self, chunk: _Chunk) -> None:
        """A usable record key and its custom_id for each row."""
        keys = _column(chunk.rows, self.key_field)
        custom_ids = keys
        drop: set[int] = set()
        unusual = _keys_not_usable_as_is(keys)
        if unusual:
            custom_ids = list(keys)
            for index in unusual:
                key, custom_id = self._slow_key(chunk.numbers[index], chunk.rows[index], keys[index])
                if key is None:
                    drop.add(index)
                else:
                    keys[index], custom_ids[index] = key, custom_id
        chunk.keys, chunk.custom_ids = keys, custom_ids
        chunk.drop(drop)

    def _duplicates(self, chunk: _Chunk) -> None:
        """The first row with a key is the item; later rows with the same key are rejected."""
        drop = set(self.seen.repeated(chunk.keys))
        for index in sorted(drop):
            self._reject_duplicate(chunk.numbers[index], chunk.keys[index], chunk.rows[index])
        chunk.drop(drop)

    def _fields(self, chunk: _Chunk) -> None:
        """Template fields as text: required ones present and not blank, NULL optional ones empty."""
        drop: set[int] = set()
        for _literal, name in self.template_parts:
            if name is None or name in chunk.fields:
                continue
            column = _column(chunk.rows, name)
            kinds = set(map(type, column))
            if name in self.text_fields:
                if kinds != {str} or "" in column or any(map(str.isspace, column)):
                    for index, value in enumerate(column):
                        if index in drop or (type(value) is str and value and not value.isspace()):
                            continue
                        ok, text = self._slow_text(
                            chunk.numbers[index], chunk.keys[index], chunk.rows[index], name, value
                        )
                        if ok:
                            column[index] = text
                        else:
                            drop.add(index)
            elif None in column:
                column = ["" if value is None else value for value in column]
            if kinds != {str}:
                # What str.format_map does with a plain {field}: format(value, "").
                column = [value if type(value) is str else format(value, "") for value in column]
            if self.strip_controls:  # on the text as it will be sent (decoded bytes, formatted values)
                self._strip_control_characters(column)
                if name in self.text_fields and ("" in column or any(map(str.isspace, column))):
                    for index, value in enumerate(column):
                        if index not in drop and (not value or value.isspace()):
                            drop.add(index)
                            self._reject(
                                chunk.numbers[index], chunk.keys[index], chunk.keys[index], "empty_text",
                                f"field {name!r} is empty once control characters are stripped", chunk.rows[index],
                            )  # fmt: skip
            chunk.fields[name] = column
        chunk.drop(drop)

    @staticmethod
    def _strip_control_characters(column: list[str]) -> None:
        """Policy ``strip``: remove control characters from the column's text, in place."""
        for index in _rows_with_control_chars(column):
            column[index] = _CONTROL_CHARS.sub("", column[index])

    def _check_text(self, chunk: _Chunk) -> None:
        """Reject rows whose fields hold control characters or invalid UTF-8; escape the rest."""
        while True:
            text = {name: _inspect_text_column(column) for name, column in chunk.fields.items()}
            bad: dict[int, tuple[str, str, str]] = {}
            for name, column in text.items():
                for index, (code, what) in column.bad_rows.items():
                    bad.setdefault(index, (name, code, what))
            if not bad:
                chunk.text = text
                return
            for index, (name, code, what) in sorted(bad.items()):
                key = chunk.keys[index]
                self._reject(
                    chunk.numbers[index], key, key, code, f"field {name!r} holds {what}", chunk.rows[index]
                )
            chunk.drop(set(bad))

    def _content_chars(self, chunk: _Chunk) -> np.ndarray:
        """Characters of each row's user content (the template's literals and its fields)."""
        lengths = np.full(len(chunk), self.literal_chars, dtype=np.int64)
        for name in self.field_occurrences:
            lengths += chunk.text[name].char_lengths
        return lengths

    def _models_and_sizes(self, chunk: _Chunk) -> None:
        """The model of each request, and whether the content fits its context window."""
        drop: set[int] = set()
        if self.workload.route is None:
            chunk.models = [self.workload.model] * len(chunk)
        else:
            models = [self._route(chunk.numbers[i], chunk.keys[i], chunk.rows[i]) for i in range(len(chunk))]
            drop.update(index for index, model in enumerate(models) if model is None)
            chunk.models = [model or "" for model in models]
        lengths = self._content_chars(chunk).tolist()
        if lengths and max(lengths) > min(self.max_content_chars.values()):
            for index, length in enumerate(lengths):
                model = chunk.models[index]
                if index not in drop and length > self.max_content_chars[model]:
                    drop.add(index)
                    self._reject(
                        chunk.numbers[index], chunk.keys[index], chunk.keys[index], "too_long",
                        f"text too long for {model}: about {length // CHARS_PER_TOKEN} tokens of content, with the "
                        f"prompt and max_tokens {self.max_tokens}, exceeds the context window", chunk.rows[index],
                    )  # fmt: skip
        chunk.drop(drop)

    def _write_lines(self, chunk: _Chunk) -> None:
        """Check line sizes, count the content for the estimate, and write the lines."""
        routed = self.workload.route is not None
        openings = [self._opening(model) for model in chunk.models] if routed else None
        sizes = self._line_sizes(chunk, openings)
        max_line = self.limits.max_shard_bytes
        too_large = np.flatnonzero(sizes > max_line).tolist()
        if too_large:
            for index in too_large:
                self._reject(
                    chunk.numbers[index], chunk.keys[index], chunk.keys[index], "request_too_large",
                    f"request is {int(sizes[index])} bytes, over the shard limit of {max_line}", chunk.rows[index],
                )  # fmt: skip
            chunk.drop(set(too_large))
            openings = [self._opening(model) for model in chunk.models] if routed else None
            sizes = self._line_sizes(chunk, openings)
        chars = self._content_chars(chunk)
        if not routed:
            if len(chunk):
                model = self.workload.model
                self.chars_by_model[model] = self.chars_by_model.get(model, 0) + int(chars.sum())
                self.count_by_model[model] = self.count_by_model.get(model, 0) + len(chunk)
        else:
            for model, length in zip(chunk.models, chars.tolist(), strict=True):
                self.chars_by_model[model] = self.chars_by_model.get(model, 0) + length
                self.count_by_model[model] = self.count_by_model.get(model, 0) + 1
        self._write(chunk, openings, sizes)

    def _line_sizes(self, chunk: _Chunk, openings: list[str] | None) -> np.ndarray:
        """UTF-8 bytes of each row's request line."""
        sizes = np.fromiter(map(len, chunk.custom_ids), dtype=np.int64, count=len(chunk))  # ASCII
        sizes += self.fixed_bytes
        for name in self.field_occurrences:
            sizes += chunk.text[name].byte_lengths
        if openings is None:
            sizes += len(self._opening(self.workload.model).encode())
        else:
            sizes += np.fromiter((len(o.encode()) for o in openings), dtype=np.int64, count=len(openings))
        return sizes

    def _write(self, chunk: _Chunk, openings: list[str] | None, sizes: np.ndarray) -> None:
        """Split the chunk's lines over shards by count and bytes, and queue the writes.

        Each piece of a few MB is one ``str.join`` over the line layout's columns (constants
        repeated, fields as escaped) and one encode, so no per-line object is built.
        """
        max_requests = self.limits.max_requests_per_shard
        max_bytes = self.limits.max_shard_bytes
        columns: list[str | list[str]] = [_LINE_HEAD.decode(), chunk.custom_ids]
        columns.append(openings if openings is not None else self._opening(self.workload.model))
        for segment in self.segments:
            columns.append(chunk.text[segment[0]].escaped if isinstance(segment, tuple) else segment)
        columns.append(self.tail)
        columns = [column for column in columns if column != ""]
        width = len(columns)
        start = 0
        while start < len(chunk):
            shard = self.shard
            if shard is None or shard.count >= max_requests:
                shard = self._next_shard()
            cumulative = np.cumsum(sizes[start : start + max_requests - shard.count])
            fit = int(np.searchsorted(cumulative, max_bytes - shard.bytes, side="right"))
            if fit == 0:
                if shard.count == 0:  # cannot happen: longer lines were rejected
                    raise StagingError(f"a {sizes[start]}-byte line does not fit an empty shard")
                self._next_shard()
                continue
            end = start + fit
            models = chunk.models[start:end]
            custom_ids = pa.array(chunk.custom_ids[start:end], pa.string())
            keys = (
                custom_ids if chunk.keys is chunk.custom_ids else pa.array(chunk.keys[start:end], pa.string())
            )
            batch = pa.record_batch(
                [
                    custom_ids,
                    keys,
                    pa.array(chunk.numbers[start:end], pa.int64()),
                    pa.array(models, pa.string()),
                ],
                schema=SHARD_KEYS_SCHEMA,
            )
            for model, count in (
                Counter(models) if openings is not None else {models[0]: len(models)}
            ).items():
                shard.models[model] = shard.models.get(model, 0) + count
            # Hand the bytes over in pieces of a few MB: the queue then holds little at a time.
            cumulative = np.cumsum(sizes[start:end])
            piece_start = start
            while piece_start < end:
                done = int(cumulative[piece_start - start - 1]) if piece_start > start else 0
                piece_end = start + int(np.searchsorted(cumulative, done + _WRITE_PIECE_BYTES, side="right"))
                piece_end = min(max(piece_end, piece_start + 1), end)
                count = piece_end - piece_start
                parts: list[str] = [""] * (width * count)
                for offset, column in enumerate(columns):
                    if isinstance(column, str):
                        parts[offset::width] = [column] * count
                    else:
                        parts[offset::width] = column[piece_start:piece_end]
                data = "".join(parts).encode("utf-8")
                expected = int(cumulative[piece_end - start - 1]) - done
                if len(data) != expected:  # the shard limits rely on these sizes
                    raise StagingError(f"a piece of {len(data)} bytes was sized {expected}: a staging bug")
                shard.count += count
                shard.bytes += expected
                self.bytes_staged += expected
                self.io.submit(shard.write_lines, data)
                piece_start = piece_end
            self.io.submit(shard.write_keys, batch)
            start = end

    # -- the slow paths (bad input, rare) -------------------------------------------------

    def _slow_key(self, row_number: int, row: Mapping[str, Any], raw: Any) -> tuple[str | None, str]:
        key_name = self.key_name
        if raw is None:
            reason = "is NULL" if self.key_field in row else "is missing"
            self._reject(row_number, None, None, "null_key", f"record key {key_name!r} {reason}", row)
            return None, ""
        if isinstance(raw, _BINARY):
            try:
                raw = bytes(raw).decode("utf-8")
            except UnicodeDecodeError as exc:
                self._reject(
                    row_number, None, None, "invalid_key",
                    f"record key is not valid UTF-8 ({exc.reason} at byte {exc.start})", row,
                )  # fmt: skip
                return None, ""
        key = raw if isinstance(raw, str) else str(raw)
        if not key or key.isspace():
            self._reject(row_number, None, None, "empty_key", f"record key {key_name!r} is empty", row)
            return None, ""
        if _BAD_CHARS.search(key):
            _code, what = _describe_bad_char(key)
            self._reject(row_number, None, None, "invalid_key", f"record key holds {what}", row)
            return None, ""
        return key, custom_id_for(key)

    def _slow_text(
        self, row_number: int, key: str, row: Mapping[str, Any], name: str, value: Any
    ) -> tuple[bool, Any]:
        """(True, the value as usable text), or (False, None) after rejecting the row."""
        if value is None:
            code, what = ("null_text", "is NULL") if name in row else ("missing_field", "is missing")
            self._reject(row_number, key, key, code, f"field {name!r} {what}", row)
            return False, None
        if isinstance(value, _BINARY):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError as exc:
                self._reject(
                    row_number, key, key, "invalid_utf8",
                    f"field {name!r} is not valid UTF-8 ({exc.reason} at byte {exc.start})", row,
                )  # fmt: skip
                return False, None
        elif not isinstance(value, str):
            return True, value  # numbers and dates are rendered by the template as they are
        if not value or value.isspace():
            self._reject(row_number, key, key, "empty_text", f"field {name!r} is empty", row)
            return False, None
        return True, value

    def _route(self, row_number: int, key: str, row: Mapping[str, Any]) -> str | None:
        assert self.workload.route is not None
        try:
            model = self.workload.route(row)
        except Exception as exc:  # a user's rule failing on one row must not abort the run
            self._reject(
                row_number,
                key,
                key,
                "routing_error",
                f"routing rule failed: {type(exc).__name__}: {exc}",
                row,
            )
            return None
        if model not in self.allowed_models:
            self._reject(
                row_number,
                key,
                key,
                "routing_error",
                f"routing rule chose {model!r}, not in route_models",
                row,
            )
            return None
        return model

    def _reject(
        self,
        row_number: int,
        record_key: str | None,
        ledger_key: str | None,
        code: str,
        reason: str,
        row: Mapping[str, Any],
    ) -> None:
        self.rejections.add(row_number, record_key, ledger_key, code, reason, _jsonable_row(row))

    def _reject_duplicate(self, row_number: int, key: str, row: Mapping[str, Any]) -> None:
        row_json = _jsonable_row(row)
        # The first row with the key is the item; each later one is its own ledger item.
        ledger_key = self.rejections.unique(f"{key}#dup-{hashlib.sha256(row_json).hexdigest()[:12]}")
        self.rejections.add(
            row_number, key, ledger_key, "duplicate_key",
            f"duplicate record key {key!r}: an earlier row of this extract has the same key and is the one sent",
            row_json,
        )  # fmt: skip

    def _next_shard(self) -> _ShardWriter:
        if self.shard is not None:
            self.io.submit(self.shard.close)
        shard = _ShardWriter(self.layout, len(self.writers))
        self.writers.append(shard)
        self.io.submit(shard.open, self.layout)
        self.shard = shard
        return shard

    # -- the end --------------------------------------------------------------------------

    def finish(self) -> Manifest:
        if self.shard is not None:
            self.io.submit(self.shard.close)
            self.shard = None
        self.io.close()
        self.stack.close()
        shards = [writer.manifest(self.layout) for writer in self.writers]
        self._delete_stale_parts(shards)
        estimate = CostEstimate(self.cache_setting, self.assumed_cache_hit_rate)
        expected_output = self.workload.expected_output_tokens or self.max_tokens
        for model, count in sorted(self.count_by_model.items()):
            estimate.per_model[model] = ModelEstimate(
                requests=count,
                prefix_tokens_per_request=self.prefix_tokens,
                variable_input_tokens=-(-self.chars_by_model[model] // CHARS_PER_TOKEN)
                + REQUEST_OVERHEAD_TOKENS * count,
                max_output_tokens=self.max_tokens * count,
                expected_output_tokens=expected_output * count,
                content_chars=self.chars_by_model[model],
            )
        manifest = Manifest(
            workload=self.workload.name,
            prompt_version=self.workload.prompt_version,
            dag_id=self.layout.dag_id,
            run_id=self.layout.run_id,
            cache_setting=self.cache_setting,
            key_field=self.key_field,
            models=sorted(self.count_by_model),
            extracted_rows=self.rows_seen,
            staged_requests=sum(shard.count for shard in shards),
            rejected_rows=self.rejections.count,
            rejected_by_reason=dict(sorted(self.rejections.by_reason.items())),
            rejects=_relative(self.layout, rejects_path(self.layout)),
            shards=shards,
            limits=asdict(self.limits),
            estimate=estimate.to_dict(self.prices),
            created_at=datetime.now(UTC).isoformat(),
        )
        if manifest.extracted_rows != manifest.staged_requests + manifest.rejected_rows:
            raise StagingError(
                f"staging lost rows: {manifest.extracted_rows} extracted, {manifest.staged_requests} staged, "
                f"{manifest.rejected_rows} rejected"
            )
        self.layout.store.write_json(self.layout.manifest, manifest.to_dict())
        return manifest

    def _delete_stale_parts(self, shards: list[ShardManifest]) -> None:
        """A re-run with fewer shards must not leave an earlier run's extra parts behind."""
        keep = {path for shard in shards for path in (shard.requests, shard.keys)}
        keep.add(_relative(self.layout, rejects_path(self.layout)))
        for path in self.layout.store.list(f"{self.layout.prefix}/requests"):
            if _relative(self.layout, path) not in keep:
                self.layout.store.delete(path)

    def abort(self) -> None:
        try:
            if self.shard is not None:
                self.io.submit(self.shard.close)
            self.io.close()
        finally:
            self.stack.close()


def stage_requests(
    rows: Iterable[Mapping[str, Any]],
    workload: Workload,
    layout: RunLayout,
    *,
    key_field: str,
    cache_setting: CacheSetting,
    prices: PriceTable | None = None,
    limits: StagingLimits | None = None,
    assumed_cache_hit_rate: float = 0.0,
    chunk_rows: int = 10_000,
    key_name: str | None = None,
) -> Manifest:
    """Render rows into request shards and write the manifest; returns the manifest.

    Re-running for the same run overwrites the same keys (and removes parts it no longer needs).

    :param rows: the extracted rows, streamed (e.g. ``Warehouse.extract``).
    :param workload: the task spec rendering each row.
    :param layout: the run's S3 layout.
    :param key_field: the row field holding the record key.
    :param cache_setting: the run's resolved cache setting (``Workload.choose_cache_setting``).
    :param prices: the price table (estimate, context windows).
    :param limits: shard limits (default 100,000 requests, 128 MB).
    :param assumed_cache_hit_rate: the hit rate the expected cost assumes (measured in recent runs).
    :param chunk_rows: the most rows processed together (chunks shrink to about 4 MB of requests).
    :param key_name: the key column as error messages name it (default ``key_field``).
    """
    stager = _Stager(
        workload,
        layout,
        key_field,
        cache_setting,
        prices or default_prices(),
        limits or StagingLimits(),
        assumed_cache_hit_rate,
        key_name,
    )
    with bulk_processing():
        try:
            iterator = iter(rows)
            size = min(chunk_rows, 1_000)
            while chunk := list(islice(iterator, size)):
                stager.add_chunk(chunk)
                # Long prompts make long lines: fewer rows a chunk keep its bytes (and memory) bounded.
                per_row = stager.bytes_staged / max(stager.rows_seen, 1)
                size = max(256, min(chunk_rows, int(_CHUNK_TARGET_BYTES / max(per_row, 1.0))))
        except BaseException:
            stager.abort()
            raise
        return stager.finish()


def read_manifest(layout: RunLayout) -> Manifest | None:
    """The run's manifest, or None when staging has not finished."""
    data = layout.store.read_json_or_none(layout.manifest)
    return None if data is None else Manifest.from_dict(data)


def iter_shard_lines(layout: RunLayout, shard: ShardManifest, *, verify: bool = True) -> Iterator[bytes]:
    """The shard's JSONL lines (without newlines), streamed; checks the sha256 at the end.

    Reads in large blocks and splits them here: fsspec's ``readline`` re-slices its read-ahead
    buffer on every line, which is quadratic on a large object.

    :param verify: raise ``StagingError`` when the bytes read do not match the manifest.
    """
    digest = hashlib.sha256()
    size = 0
    pending = b""
    with layout.store.open(_full(layout, shard.requests), "rb", block_size=_S3_BLOCK_SIZE) as handle:
        while block := handle.read(_S3_BLOCK_SIZE):
            digest.update(block)
            size += len(block)
            lines = (pending + block).split(b"\n")
            pending = lines.pop()
            yield from lines
    if pending:
        yield pending
    if verify and (digest.hexdigest() != shard.sha256 or size != shard.bytes):
        raise StagingError(
            f"shard {shard.requests} does not match its manifest checksum; it was changed or cut short"
        )


def iter_shard_requests(layout: RunLayout, shard: ShardManifest) -> Iterator[dict[str, Any]]:
    """The shard's requests as dicts ``{"custom_id", "params"}``."""
    for line in iter_shard_lines(layout, shard):
        yield orjson.loads(line)


def read_shard_keys(layout: RunLayout, shard: ShardManifest) -> pa.Table:
    """The shard's custom_id -> record key map (columns of :data:`SHARD_KEYS_SCHEMA`)."""
    with layout.store.open(_full(layout, shard.keys), "rb") as handle:
        return pq.read_table(handle)


def iter_rejections(layout: RunLayout, manifest: Manifest | None = None) -> Iterator[dict[str, Any]]:
    """The rejected rows of the run (``row_number``, ``record_key``, ``ledger_key``, reason, row)."""
    path = _full(layout, manifest.rejects) if manifest else rejects_path(layout)
    if not layout.store.exists(path):
        return
    with layout.store.open(path, "rb") as handle:
        for line in handle:
            yield orjson.loads(line)


def restrict_to_claimed(
    layout: RunLayout, manifest: Manifest, not_claimed: Mapping[int | None, set[str]]
) -> Manifest:
    """Drop the items this run could not claim from its shards and manifest, and write the manifest.

    An item another live run holds (or one that became final meanwhile) must not be sent by this
    run. Each shard that lost items is rewritten under a new name (``part-NNNNN.rK.jsonl`` with
    its keys), never over the file the current manifest names, so a gate that dies midway leaves
    the old manifest and shards intact and simply does it again. Counts, bytes, checksums and the
    cost estimate follow; rejected rows another run holds leave the run's counts too.

    :param layout: the run's layout.
    :param manifest: the manifest as staged.
    :param not_claimed: shard part (None: rejected rows) -> record keys not claimed.
    :returns: the manifest the rest of the run uses.
    """
    shards: list[ShardManifest] = []
    dropped = 0
    for shard in manifest.shards:
        drop = not_claimed.get(shard.part)
        if not drop:
            shards.append(shard)
            continue
        rewritten = _rewrite_shard(layout, shard, drop)
        dropped += shard.count - (rewritten.count if rewritten else 0)
        if rewritten is not None:
            shards.append(rewritten)
    dropped_rejects = len(not_claimed.get(None, ()))
    staged = sum(shard.count for shard in shards)
    scale = staged / manifest.staged_requests if manifest.staged_requests else 0.0
    estimate = {
        key: (value * scale if key.startswith("cost_usd") and isinstance(value, int | float) else value)
        for key, value in (manifest.estimate or {}).items()
    }
    restricted = replace(
        manifest,
        shards=shards,
        models=sorted({model for shard in shards for model in shard.models}),
        extracted_rows=manifest.extracted_rows - dropped - dropped_rejects,
        staged_requests=staged,
        rejected_rows=manifest.rejected_rows - dropped_rejects,
        estimate=estimate,
    )
    layout.store.write_json(layout.manifest, restricted.to_dict())
    return restricted


def _rewrite_shard(layout: RunLayout, shard: ShardManifest, drop: set[str]) -> ShardManifest | None:
    """The shard without the items whose record keys are in ``drop`` (None when none is left)."""
    keys = read_shard_keys(layout, shard)
    keep = pc.invert(pc.is_in(keys.column("record_key"), value_set=pa.array(sorted(drop), pa.string())))
    kept_keys = keys.filter(keep)
    if kept_keys.num_rows == 0:
        return None
    mask = keep.to_pylist() if isinstance(keep, pa.Array) else keep.combine_chunks().to_pylist()
    revision = _next_revision(shard.requests)
    digest = hashlib.sha256()
    size = 0
    models: dict[str, int] = {}
    for model in kept_keys.column("model").to_pylist():
        models[model] = models.get(model, 0) + 1
    with layout.store.open(layout.requests(shard.part, revision), "wb", block_size=_S3_BLOCK_SIZE) as out:
        for line, wanted in zip(iter_shard_lines(layout, shard), mask, strict=True):
            if wanted:
                data = line + b"\n"
                digest.update(data)
                size += len(data)
                out.write(data)
    with layout.store.open(layout.shard_keys(shard.part, revision), "wb") as handle:
        pq.write_table(kept_keys, handle)
    return ShardManifest(
        part=shard.part,
        requests=_relative(layout, layout.requests(shard.part, revision)),
        keys=_relative(layout, layout.shard_keys(shard.part, revision)),
        count=kept_keys.num_rows,
        bytes=size,
        sha256=digest.hexdigest(),
        models=dict(sorted(models.items())),
    )


def _next_revision(requests_path: str) -> int:
    match = re.search(r"\.r(\d+)\.jsonl$", requests_path)
    return int(match.group(1)) + 1 if match else 1
