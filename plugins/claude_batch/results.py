"""Collect: stream a batch's results out of the API into S3, as raw JSONL and as Parquet.

The raw JSONL (``results/part-NNNNN.jsonl``) is kept for audit, since the API deletes results
29 days after the batch was created. The Parquet (``results/part-NNNNN.parquet``) has one row
per request, written in row groups as the stream arrives. A stream cut short is detected
(fewer lines than the batch's ``request_counts``, a broken last line, counts that disagree, ids
that are not the shard's) and the download retried; it is never accepted. Re-collecting
overwrites the same keys.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import anthropic
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from claude_batch.costs import PriceTable, cost_array, default_prices
from claude_batch.staging import Manifest, ShardManifest, read_manifest, read_shard_keys
from claude_batch.storage import RunLayout

log = logging.getLogger(__name__)

OUTCOMES = ("succeeded", "errored", "canceled", "expired")
RESULTS_SCHEMA = pa.schema(
    [
        ("custom_id", pa.string()),
        ("record_key", pa.string()),
        ("outcome", pa.string()),
        ("text", pa.string()),
        ("tool_input_json", pa.string()),
        ("stop_reason", pa.string()),
        ("model", pa.string()),
        ("input_tokens", pa.int64()),
        ("output_tokens", pa.int64()),
        ("cache_creation_input_tokens", pa.int64()),
        ("cache_read_input_tokens", pa.int64()),
        ("cache_creation_5m_input_tokens", pa.int64()),
        ("cache_creation_1h_input_tokens", pa.int64()),
        ("cost_usd", pa.float64()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("prompt_version", pa.string()),
        ("batch_id", pa.string()),
    ]
)
_STRING_COLUMNS = (
    "custom_id", "record_key", "outcome", "text", "tool_input_json", "stop_reason", "model", "error_type", "error_message",
)  # fmt: skip
_TOKEN_COLUMNS = (
    "input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
    "cache_creation_5m_input_tokens", "cache_creation_1h_input_tokens",
)  # fmt: skip
_DOWNLOAD_CHUNK = 1 << 20
_S3_BLOCK_SIZE = 8 * 1024 * 1024


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector around a loop that allocates many short-lived, acyclic
    objects: otherwise it keeps walking every live object (the key maps, the rows) for nothing."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class ResultsIncomplete(RuntimeError):
    """The results could not be downloaded whole, even after retries."""


class ResultsMismatch(RuntimeError):
    """The batch's results do not belong to the shard (wrong batch id, unknown custom_ids)."""


class BatchNotEnded(RuntimeError):
    """The batch is still processing; collect after it has ended."""


@dataclass
class CollectSummary:
    """What one collect wrote, and what it counted."""

    part: int
    batch_id: str
    results_jsonl: str
    results_parquet: str
    lines: int
    bytes: int
    attempts: int
    counts: dict[str, int]
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float = 0.0
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# The order of the fields _result_row returns (RESULTS_SCHEMA without cost, version and batch).
_ROW_FIELDS = _STRING_COLUMNS[:7] + _TOKEN_COLUMNS + _STRING_COLUMNS[7:]
_ROW_INDEX = {name: index for index, name in enumerate(_ROW_FIELDS)}


def _result_row(record: dict[str, Any], record_key: str | None) -> tuple[Any, ...]:
    """One result line as a tuple in :data:`_ROW_FIELDS` order."""
    custom_id = record["custom_id"]
    result = record["result"]
    outcome = result["type"]
    if outcome == "succeeded":
        message = result["message"]
        content = message.get("content") or ()
        tool_input = None
        if len(content) == 1 and content[0].get("type") == "text":
            text = content[0].get("text")
        else:
            texts = []
            for block in content:
                kind = block.get("type")
                if kind == "text":
                    texts.append(block.get("text", ""))
                elif kind == "tool_use" and tool_input is None:
                    tool_input = orjson.dumps(block.get("input")).decode()
            text = "".join(texts) if texts else None
        usage = message.get("usage") or {}
        written = usage.get("cache_creation_input_tokens") or 0
        creation = usage.get("cache_creation")
        if creation:
            split = (
                creation.get("ephemeral_5m_input_tokens") or 0,
                creation.get("ephemeral_1h_input_tokens") or 0,
            )
        else:  # no split reported: price the writes as 5-minute writes, the API's default TTL
            split = (written, 0)
        return (
            custom_id, record_key, outcome, text, tool_input, message.get("stop_reason"), message.get("model"),
            usage.get("input_tokens") or 0, usage.get("output_tokens") or 0, written,
            usage.get("cache_read_input_tokens") or 0, split[0], split[1], None, None,
        )  # fmt: skip
    error_type = error_message = None
    if outcome == "errored":
        # The error object is nested twice: {"error": {"type": "error", "error": {...}}}.
        error = result.get("error") or {}
        inner = error.get("error") if isinstance(error.get("error"), dict) else error
        error_type, error_message = inner.get("type"), inner.get("message")
    return (
        custom_id,
        record_key,
        outcome,
        None,
        None,
        None,
        None,
        0,
        0,
        0,
        0,
        0,
        0,
        error_type,
        error_message,
    )


class _Columns:
    """The rows of one row group, as tuples until they become an Arrow batch."""

    def __init__(self) -> None:
        self.rows: list[tuple[Any, ...]] = []

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, record: dict[str, Any], record_key: str | None) -> str:
        """Append one result line; returns its outcome."""
        row = _result_row(record, record_key)
        self.rows.append(row)
        return row[2]

    def to_batch(self, prompt_version: str | None, batch_id: str, prices: PriceTable) -> pa.RecordBatch:
        size = len(self.rows)
        columns = list(zip(*self.rows, strict=True)) if self.rows else [()] * len(_ROW_FIELDS)
        arrays: dict[str, pa.Array] = {}
        numbers: dict[str, np.ndarray] = {}
        for name, values in zip(_ROW_FIELDS, columns, strict=True):
            if name in _TOKEN_COLUMNS:
                numbers[name] = np.fromiter(values, dtype=np.int64, count=size)
                arrays[name] = pa.array(numbers[name], pa.int64())
            else:
                arrays[name] = pa.array(values, pa.string())
        cost = cost_array(
            columns[_ROW_INDEX["model"]],
            numbers["input_tokens"],
            numbers["output_tokens"],
            numbers["cache_creation_5m_input_tokens"],
            numbers["cache_creation_1h_input_tokens"],
            numbers["cache_read_input_tokens"],
            prices,
        )
        arrays["cost_usd"] = pa.array(cost, pa.float64(), mask=np.isnan(cost))
        arrays["prompt_version"] = pa.array([prompt_version] * size, pa.string())
        arrays["batch_id"] = pa.array([batch_id] * size, pa.string())
        return pa.record_batch([arrays[f.name] for f in RESULTS_SCHEMA], schema=RESULTS_SCHEMA)


def _iter_chunks_of_lines(chunks: Iterator[bytes]) -> Iterator[tuple[bytes, list[bytes], bool]]:
    """(raw chunk, its complete lines, False) per chunk, then (b"", [rest], True) for an unended last line."""
    pending = b""
    for chunk in chunks:
        if not chunk:
            continue
        lines = (pending + chunk if pending else chunk).split(b"\n")
        pending = lines.pop()
        yield chunk, [line for line in lines if line], False
    if pending:
        yield b"", [pending], True


class _Download:
    """One attempt: stream the results to both objects, counting and checking as it goes."""

    def __init__(
        self, layout: RunLayout, part: int, batch_id: str, keys: dict[str, str], row_group_rows: int
    ):
        self.layout = layout
        self.part = part
        self.batch_id = batch_id
        self.keys = keys
        self.row_group_rows = row_group_rows
        self.lines = 0
        self.bytes = 0
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.seen: set[str] = set()
        self.problems: list[str] = []
        self.totals = dict.fromkeys(
            ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"), 0
        )
        self.cost = 0.0

    def run(self, chunks: Iterator[bytes], prompt_version: str | None, prices: PriceTable) -> None:
        store = self.layout.store
        with (
            store.open(self.layout.results_jsonl(self.part), "wb", block_size=_S3_BLOCK_SIZE) as raw,
            store.open(
                self.layout.results_parquet(self.part), "wb", block_size=_S3_BLOCK_SIZE
            ) as parquet_handle,
            pq.ParquetWriter(parquet_handle, RESULTS_SCHEMA, compression="zstd") as writer,
        ):
            columns = _Columns()
            keys_get = self.keys.get
            loads = orjson.loads
            rows = columns.rows
            for chunk, lines, unended in _iter_chunks_of_lines(chunks):
                try:
                    with paused_gc():
                        for line in lines:
                            record = loads(line)
                            rows.append(_result_row(record, keys_get(record["custom_id"])))
                except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                    where = "the last line" if unended else "a line"
                    self.problems.append(f"{where} is not a complete result ({type(exc).__name__})")
                    break
                # The stream's own bytes are the audit copy; a broken download is never kept.
                raw.write(chunk or lines[0])
                self.bytes += len(chunk or lines[0])
                if len(rows) >= self.row_group_rows:
                    self._flush(writer, columns, prompt_version, prices)
                    columns = _Columns()
                    rows = columns.rows
            if len(columns):
                self._flush(writer, columns, prompt_version, prices)

    def _flush(
        self, writer: pq.ParquetWriter, columns: _Columns, prompt_version: str | None, prices: PriceTable
    ) -> None:
        batch = columns.to_batch(prompt_version, self.batch_id, prices)
        writer.write_batch(batch)
        self.lines += batch.num_rows
        custom_ids = batch.column("custom_id").to_pylist()
        before = len(self.seen)
        self.seen.update(custom_ids)
        if len(self.seen) - before != len(custom_ids):
            self.problems.append("some custom_ids appear more than once")
        for outcome, count in Counter(batch.column("outcome").to_pylist()).items():
            if outcome in self.counts:
                self.counts[outcome] += count
            else:
                self.problems.append(f"{count} results have the unknown outcome {outcome!r}")
        for name in self.totals:
            self.totals[name] += int(pc.sum(batch.column(name)).as_py() or 0)
        self.cost += float(pc.sum(batch.column("cost_usd")).as_py() or 0.0)

    def check(self, expected_counts: dict[str, int]) -> None:
        """Record every way the download falls short of the batch's own counts."""
        expected_total = sum(expected_counts.values())
        if self.lines != expected_total:
            self.problems.append(f"{self.lines} result lines, but the batch has {expected_total} requests")
        for outcome in OUTCOMES:
            if self.counts[outcome] != expected_counts.get(outcome, 0):
                self.problems.append(
                    f"{self.counts[outcome]} {outcome} results, but the batch counts {expected_counts.get(outcome, 0)}"
                )
        unknown = self.seen.difference(self.keys)
        if unknown:
            sample = ", ".join(sorted(unknown)[:5])
            raise ResultsMismatch(
                f"batch {self.batch_id} returned {len(unknown)} custom_ids that are not in shard part {self.part} "
                f"(e.g. {sample}); is it the right batch?"
            )


def _stream(client: anthropic.Anthropic, batch_id: str) -> Iterator[bytes]:
    with client.messages.batches.with_streaming_response.results(batch_id) as response:
        yield from response.iter_bytes(_DOWNLOAD_CHUNK)


def collect_results(
    client: anthropic.Anthropic,
    layout: RunLayout,
    part: int,
    batch_id: str,
    *,
    manifest: Manifest | None = None,
    prices: PriceTable | None = None,
    max_attempts: int = 4,
    retry_wait_seconds: float = 1.0,
    row_group_rows: int = 20_000,
) -> CollectSummary:
    """Download the results of ``batch_id`` (the batch of shard ``part``) into S3.

    Writes ``results/part-NNNNN.jsonl`` (raw, for audit) and ``results/part-NNNNN.parquet``
    (columns of :data:`RESULTS_SCHEMA`). A short or broken download is retried up to
    ``max_attempts`` times, then :class:`ResultsIncomplete` is raised and the partial objects
    are removed; nothing incomplete is left looking complete.

    :param client: an ``anthropic.Anthropic`` client (the hook's, or one on the emulator).
    :param layout: the run's S3 layout.
    :param part: the shard's part number.
    :param batch_id: the batch the shard was submitted as.
    :param manifest: the run's manifest (read from S3 when not given).
    :param prices: the price table for ``cost_usd`` (batch prices).
    :param max_attempts: downloads tried before giving up.
    :param retry_wait_seconds: the first wait between attempts (doubles each time).
    :param row_group_rows: rows per Parquet row group (bounds memory).
    """
    manifest = manifest or read_manifest(layout)
    if manifest is None:
        raise FileNotFoundError(f"no manifest at {layout.store.uri(layout.manifest)}; stage the run first")
    shard: ShardManifest = manifest.shard(part)
    table = prices or default_prices()
    batch = client.messages.batches.retrieve(batch_id)
    if batch.processing_status != "ended":
        raise BatchNotEnded(f"batch {batch_id} is {batch.processing_status}; collect it once it has ended")
    request_counts = batch.request_counts
    expected = {outcome: int(getattr(request_counts, outcome)) for outcome in OUTCOMES}
    if sum(expected.values()) != shard.count:
        raise ResultsMismatch(
            f"batch {batch_id} has {sum(expected.values())} requests but shard part {part} has {shard.count}; "
            "is it the right batch?"
        )
    keys_table = read_shard_keys(layout, shard)
    keys = dict(
        zip(
            keys_table.column("custom_id").to_pylist(),
            keys_table.column("record_key").to_pylist(),
            strict=True,
        )
    )
    del keys_table
    problems: list[str] = []
    for attempt in range(1, max_attempts + 1):
        download = _Download(layout, part, batch_id, keys, row_group_rows)
        stream = _stream(client, batch_id)
        try:
            download.run(stream, manifest.prompt_version, table)
        except (anthropic.APIConnectionError, anthropic.APIStatusError, OSError) as exc:
            download.problems.append(f"the download failed: {type(exc).__name__}: {exc}")
        except Exception as exc:  # the HTTP library's own "peer closed" errors are not SDK errors
            if type(exc).__module__.split(".")[0] not in ("httpx", "httpx2", "httpcore", "httpcore2", "h11"):
                raise
            download.problems.append(f"the download broke off: {type(exc).__name__}: {exc}")
        finally:
            stream.close()  # closes the HTTP response when the lines stopped early
        download.check(expected)
        if not download.problems:
            summary = CollectSummary(
                part=part,
                batch_id=batch_id,
                results_jsonl=layout.results_jsonl(part),
                results_parquet=layout.results_parquet(part),
                lines=download.lines,
                bytes=download.bytes,
                attempts=attempt,
                counts=download.counts,
                cost_usd=download.cost,
                problems=problems,
                **download.totals,
            )
            return summary
        problems.extend(f"attempt {attempt}: {problem}" for problem in download.problems)
        log.warning(
            "results of batch %s (part %d) incomplete on attempt %d: %s",
            batch_id,
            part,
            attempt,
            download.problems,
        )
        if attempt < max_attempts:
            time.sleep(retry_wait_seconds * 2 ** (attempt - 1))
    layout.store.delete(layout.results_jsonl(part))
    layout.store.delete(layout.results_parquet(part))
    raise ResultsIncomplete(
        f"results of batch {batch_id} (shard part {part}) were incomplete after {max_attempts} downloads: "
        + "; ".join(problems[-6:])
    )


def read_results(layout: RunLayout, part: int, columns: list[str] | None = None) -> pa.Table:
    """The collected results of shard ``part`` (for tests and reports; loads stream by batches)."""
    with layout.store.open(layout.results_parquet(part), "rb") as handle:
        return pq.read_table(handle, columns=columns)


def iter_result_batches(layout: RunLayout, part: int, batch_rows: int = 50_000) -> Iterator[pa.RecordBatch]:
    """The collected results of shard ``part``, streamed in record batches."""
    with layout.store.open(layout.results_parquet(part), "rb") as handle:
        parquet = pq.ParquetFile(handle)
        yield from parquet.iter_batches(batch_size=batch_rows)
