"""Collect: stream a batch's results out of the API into S3, as raw JSONL and as Parquet.

The raw JSONL (``results/part-NNNNN.jsonl``) is kept for audit, since the API deletes results
29 days after the batch was created. The Parquet (``results/part-NNNNN.parquet``) has one row
per request, written in row groups as the stream arrives. A stream cut short is detected
(fewer lines than the batch's ``request_counts``, a broken last line, counts that disagree, ids
that are not the shard's) and the download retried; it is never accepted. Re-collecting
overwrites the same keys.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anthropic
import numpy as np
import orjson
import pyarrow as pa
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


class _Columns:
    """Column builders for one row group."""

    def __init__(self) -> None:
        self.strings: dict[str, list[str | None]] = {name: [] for name in _STRING_COLUMNS}
        self.tokens: dict[str, list[int]] = {name: [] for name in _TOKEN_COLUMNS}

    def __len__(self) -> int:
        return len(self.strings["custom_id"])

    def add(self, record: dict[str, Any], record_key: str | None) -> str:
        """Append one result line's fields; returns its outcome."""
        s = self.strings
        t = self.tokens
        s["custom_id"].append(record["custom_id"])
        s["record_key"].append(record_key)
        result = record["result"]
        outcome = result["type"]
        s["outcome"].append(outcome)
        if outcome == "succeeded":
            message = result["message"]
            texts: list[str] = []
            tool_input = None
            for block in message.get("content") or ():
                kind = block.get("type")
                if kind == "text":
                    texts.append(block.get("text", ""))
                elif kind == "tool_use" and tool_input is None:
                    tool_input = orjson.dumps(block.get("input")).decode()
            s["text"].append("".join(texts) if texts else None)
            s["tool_input_json"].append(tool_input)
            s["stop_reason"].append(message.get("stop_reason"))
            s["model"].append(message.get("model"))
            usage = message.get("usage") or {}
            creation = usage.get("cache_creation") or {}
            written = usage.get("cache_creation_input_tokens") or 0
            t["input_tokens"].append(usage.get("input_tokens") or 0)
            t["output_tokens"].append(usage.get("output_tokens") or 0)
            t["cache_creation_input_tokens"].append(written)
            t["cache_read_input_tokens"].append(usage.get("cache_read_input_tokens") or 0)
            if creation:
                t["cache_creation_5m_input_tokens"].append(creation.get("ephemeral_5m_input_tokens") or 0)
                t["cache_creation_1h_input_tokens"].append(creation.get("ephemeral_1h_input_tokens") or 0)
            else:  # no split reported: price the writes as 5-minute writes, the API's default TTL
                t["cache_creation_5m_input_tokens"].append(written)
                t["cache_creation_1h_input_tokens"].append(0)
            s["error_type"].append(None)
            s["error_message"].append(None)
        else:
            for name in ("text", "tool_input_json", "stop_reason", "model"):
                s[name].append(None)
            for values in t.values():
                values.append(0)
            if outcome == "errored":
                # The error object is nested twice: {"error": {"type": "error", "error": {...}}}.
                error = result.get("error") or {}
                inner = error.get("error") if isinstance(error.get("error"), dict) else error
                s["error_type"].append(inner.get("type"))
                s["error_message"].append(inner.get("message"))
            else:
                s["error_type"].append(None)
                s["error_message"].append(None)
        return outcome

    def to_batch(self, prompt_version: str | None, batch_id: str, prices: PriceTable) -> pa.RecordBatch:
        arrays: dict[str, pa.Array] = {name: pa.array(v, pa.string()) for name, v in self.strings.items()}
        numbers = {name: np.asarray(v, dtype=np.int64) for name, v in self.tokens.items()}
        for name, values in numbers.items():
            arrays[name] = pa.array(values, pa.int64())
        cost = cost_array(
            self.strings["model"],
            numbers["input_tokens"],
            numbers["output_tokens"],
            numbers["cache_creation_5m_input_tokens"],
            numbers["cache_creation_1h_input_tokens"],
            numbers["cache_read_input_tokens"],
            prices,
        )
        arrays["cost_usd"] = pa.array(cost, pa.float64(), mask=np.isnan(cost))
        size = len(self)
        arrays["prompt_version"] = pa.array([prompt_version] * size, pa.string())
        arrays["batch_id"] = pa.array([batch_id] * size, pa.string())
        return pa.record_batch([arrays[f.name] for f in RESULTS_SCHEMA], schema=RESULTS_SCHEMA)


def _iter_lines(chunks: Iterator[bytes]) -> Iterator[tuple[bytes, bool]]:
    """Split a byte stream into lines: (line, ended_with_newline)."""
    pending = b""
    for chunk in chunks:
        if not chunk:
            continue
        data = pending + chunk if pending else chunk
        lines = data.split(b"\n")
        pending = lines.pop()
        for line in lines:
            if line:
                yield line, True
    if pending:
        yield pending, False


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
        jsonl_path = self.layout.results_jsonl(self.part)
        parquet_path = self.layout.results_parquet(self.part)
        with (
            store.open(jsonl_path, "wb", block_size=_S3_BLOCK_SIZE) as raw,
            store.open(parquet_path, "wb", block_size=_S3_BLOCK_SIZE) as parquet_handle,
            pq.ParquetWriter(parquet_handle, RESULTS_SCHEMA, compression="zstd") as writer,
        ):
            columns = _Columns()
            keys = self.keys
            seen = self.seen
            counts = self.counts
            for line, complete in _iter_lines(chunks):
                try:
                    record = orjson.loads(line)
                    custom_id = record["custom_id"]
                    outcome = columns.add(record, keys.get(custom_id))
                except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                    where = "the last line" if not complete else f"line {self.lines + 1}"
                    self.problems.append(f"{where} is not a complete result ({type(exc).__name__})")
                    break
                raw.write(line + b"\n")
                self.lines += 1
                self.bytes += len(line) + 1
                if outcome in counts:
                    counts[outcome] += 1
                else:
                    self.problems.append(f"line {self.lines} has unknown outcome {outcome!r}")
                if custom_id in seen:
                    self.problems.append(f"custom_id {custom_id!r} appears twice")
                seen.add(custom_id)
                if len(columns) >= self.row_group_rows:
                    self._flush(writer, columns, prompt_version, prices)
                    columns = _Columns()
            if len(columns):
                self._flush(writer, columns, prompt_version, prices)

    def _flush(
        self, writer: pq.ParquetWriter, columns: _Columns, prompt_version: str | None, prices: PriceTable
    ) -> None:
        batch = columns.to_batch(prompt_version, self.batch_id, prices)
        writer.write_batch(batch)
        for name in self.totals:
            self.totals[name] += int(np.sum(columns.tokens[name]))
        costs = batch.column("cost_usd").to_numpy(zero_copy_only=False)
        self.cost += float(np.nansum(costs))

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
    row_group_rows: int = 50_000,
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
