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
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import anthropic
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from claude_batch.costs import PriceTable, default_prices
from claude_batch.errors import DEFAULT_CONN_ID, explain_api_error, is_transient

# Re-exported: the row building moved to claude_batch.result_rows.
from claude_batch.result_rows import (
    RESULTS_SCHEMA,
    RESULTS_UNIQUE_COLUMNS,
    ResultRows,
    parquet_writer,
    results_table,
)
from claude_batch.staging import Manifest, ShardManifest, read_manifest
from claude_batch.storage import RunLayout
from claude_batch.tuning import bulk_processing, release_arrow_memory, return_freed_memory

log = logging.getLogger(__name__)

OUTCOMES = ("succeeded", "errored", "canceled", "expired")
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


class _ShardKeys:
    """The shard's keys: where each custom_id is, and the record keys (Arrow columns).

    A custom_id is found by its hash among the keys' hashes, sorted (12 bytes a key beside the
    ids' Arrow column), then checked against the id itself, so an id that is not the shard's is
    never taken for one that is. A dict of 100,000 ids took 12 MB, the largest part of collect's
    memory.
    """

    _HASH_SLICE = 16_384  # ids held as Python strings at once while hashing

    def __init__(self, table: pa.Table) -> None:
        self.custom_ids = table.column("custom_id").combine_chunks()
        self.record_keys = table.column("record_key").combine_chunks()
        size = len(self.custom_ids)
        hashes = np.empty(size, dtype=np.int64)
        for start in range(0, size, self._HASH_SLICE):
            ids = self.custom_ids.slice(start, self._HASH_SLICE).to_pylist()
            hashes[start : start + len(ids)] = np.fromiter(map(hash, ids), dtype=np.int64, count=len(ids))
        order = np.argsort(hashes, kind="stable")
        self._hashes = hashes[order]
        self._order = order.astype(np.int32)
        # Two of the shard's ids with one 64-bit hash (about 1 in 10^9 shards of 100,000): a dict then.
        self._by_id: dict[str, int] | None = None
        if size > 1 and bool(np.any(self._hashes[1:] == self._hashes[:-1])):
            ids = self.custom_ids.to_pylist()
            self._by_id = dict(zip(ids, range(size), strict=True))

    def __len__(self) -> int:
        return len(self.record_keys)

    def positions(self, ids: Sequence[str], id_array: pa.Array) -> pa.Array:
        """Each id's place among the shard's keys (int32; null for an id that is not the shard's).

        :param ids: the ids as Python strings.
        :param id_array: the same ids as an Arrow string array.
        """
        if self._by_id is not None:
            return pa.array(list(map(self._by_id.get, ids)), pa.int32())
        if not len(self._hashes):
            return pa.nulls(len(ids), pa.int32())
        wanted = np.fromiter(map(hash, ids), dtype=np.int64, count=len(ids))
        at = np.minimum(np.searchsorted(self._hashes, wanted), len(self._hashes) - 1)
        candidates = self._order[at]
        hashed_alike = self._hashes[at] == wanted
        same = pc.equal(self.custom_ids.take(pa.array(candidates, mask=~hashed_alike)), id_array)
        found = same.fill_null(False).to_numpy(zero_copy_only=False)
        return pa.array(candidates, pa.int32(), mask=~found)


def _read_shard_keys(layout: RunLayout, shard: ShardManifest) -> _ShardKeys:
    # ParquetFile rather than staging.read_shard_keys's read_table, which imports pyarrow.dataset
    # (a quarter of a second, in a task that needs nothing else from it). One thread: a small file,
    # and each reading thread would keep memory of its own.
    with layout.store.open(f"{layout.prefix}/{shard.keys}", "rb") as handle:
        return _ShardKeys(pq.ParquetFile(handle).read(columns=["custom_id", "record_key"], use_threads=False))


def _iter_chunks_of_lines(chunks: Iterator[bytes]) -> Iterator[tuple[bytes, bytes, bool]]:
    """(raw chunk, its complete lines, False) per chunk, then (b"", rest, True) for an unended last line.

    The complete lines come as one block (a line begun in the chunk before, to the chunk's last
    newline), for :meth:`ResultRows.add_block`: one copy of the chunk, not an object per line.
    """
    pending = b""
    for chunk in chunks:
        if not chunk:
            continue
        end = chunk.rfind(b"\n") + 1
        if not end:  # no line ends in this chunk
            pending += chunk
            yield chunk, b"", False
            continue
        block = b"".join((pending, memoryview(chunk)[:end]))
        pending = chunk[end:]
        yield chunk, block, False
    if pending:
        yield b"", pending, True


class _Download:
    """One attempt: stream the results to both objects, counting and checking as it goes."""

    def __init__(self, layout: RunLayout, part: int, batch_id: str, keys: _ShardKeys, row_group_rows: int):
        self.layout = layout
        self.part = part
        self.batch_id = batch_id
        self.keys = keys
        self.row_group_rows = row_group_rows
        self.lines = 0
        self.bytes = 0
        self.counts = dict.fromkeys(OUTCOMES, 0)
        # One flag per shard key (flat in the results' size) and the few ids that are not the shard's.
        self.seen = np.zeros(len(keys), dtype=np.bool_)
        self.unknown: set[str] = set()
        self.duplicated = False
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
            parquet_writer(parquet_handle, RESULTS_SCHEMA, RESULTS_UNIQUE_COLUMNS) as writer,
        ):
            rows = ResultRows(self.keys)
            # For the whole download: collections would walk each call's row tuples again and
            # again (nothing here makes cycles), and each chunk's buffers would be mapped afresh.
            with bulk_processing():
                for chunk, block, unended in _iter_chunks_of_lines(chunks):
                    try:
                        rows.add_block(block)
                    except (
                        orjson.JSONDecodeError,
                        KeyError,
                        TypeError,
                        AttributeError,
                        pa.ArrowException,
                    ) as exc:
                        where = "the last line" if unended else "a line"
                        self.problems.append(f"{where} is not a complete result ({type(exc).__name__})")
                        break
                    # The stream's own bytes are the audit copy; a broken download is never kept.
                    raw.write(chunk or block)
                    self.bytes += len(chunk or block)
                    if len(rows) >= self.row_group_rows:
                        self._flush(writer, rows, prompt_version, prices)
                if len(rows):
                    self._flush(writer, rows, prompt_version, prices)

    def _flush(
        self, writer: pq.ParquetWriter, rows: ResultRows, prompt_version: str | None, prices: PriceTable
    ) -> None:
        fields = rows.columns()
        rows.clear()
        positions = fields.pop("position")
        table = results_table(
            fields, self.keys.record_keys.take(positions), prompt_version, self.batch_id, prices
        )
        # One row group, written from the calls' chunks as they are (no copy into one array).
        writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self.lines += table.num_rows
        self._note_custom_ids(fields["custom_id"], positions)
        for item in pc.value_counts(table.column("outcome")).to_pylist():
            outcome, count = item["values"], item["counts"]
            if outcome in self.counts:
                self.counts[outcome] += count
            else:
                self.problems.append(f"{count} results have the unknown outcome {outcome!r}")
        for name in self.totals:
            self.totals[name] += int(pc.sum(table.column(name)).as_py() or 0)
        self.cost += float(pc.sum(table.column("cost_usd")).as_py() or 0.0)
        del table, fields, positions
        release_arrow_memory()

    def _note_custom_ids(self, custom_ids: pa.ChunkedArray, positions: pa.ChunkedArray) -> None:
        """Mark the shard's custom_ids seen; note repeats and ids that are not the shard's."""
        known = positions.drop_null().to_numpy()
        seen_before = np.count_nonzero(self.seen)
        self.seen[known] = True
        if np.count_nonzero(self.seen) - seen_before != len(known):  # some were seen already
            self.duplicated = True
        if positions.null_count:
            unknown = custom_ids.filter(positions.is_null()).to_pylist()
            if len(set(unknown)) != len(unknown) or self.unknown.intersection(unknown):
                self.duplicated = True
            self.unknown.update(unknown)

    def check(self, expected_counts: dict[str, int]) -> None:
        """Record every way the download falls short of the batch's own counts."""
        if self.duplicated:
            self.problems.append("some custom_ids appear more than once")
        expected_total = sum(expected_counts.values())
        if self.lines != expected_total:
            self.problems.append(f"{self.lines} result lines, but the batch has {expected_total} requests")
        for outcome in OUTCOMES:
            if self.counts[outcome] != expected_counts.get(outcome, 0):
                self.problems.append(
                    f"{self.counts[outcome]} {outcome} results, "
                    f"but the batch counts {expected_counts.get(outcome, 0)}"
                )
        if self.unknown:
            sample = ", ".join(sorted(self.unknown)[:5])
            raise ResultsMismatch(
                f"batch {self.batch_id} returned {len(self.unknown)} custom_ids that are not in shard part "
                f"{self.part} (e.g. {sample}); is it the right batch?"
            )


def _delete_results(layout: RunLayout, part: int) -> None:
    """Remove what a failed collect wrote, so nothing incomplete looks complete."""
    layout.store.delete(layout.results_jsonl(part))
    layout.store.delete(layout.results_parquet(part))


def _stream(client: anthropic.Anthropic, batch_id: str) -> Generator[bytes, None, None]:
    """The results' bytes in chunks of about :data:`_DOWNLOAD_CHUNK`."""
    with client.messages.batches.with_streaming_response.results(batch_id) as response:
        # Gathered here with one join: the HTTP library's exact-size chunks copy each megabyte thrice.
        pieces: list[bytes] = []
        size = 0
        for piece in response.iter_bytes():
            pieces.append(piece)
            size += len(piece)
            if size >= _DOWNLOAD_CHUNK:
                yield b"".join(pieces)
                pieces.clear()
                size = 0
        if pieces:
            yield b"".join(pieces)


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
    row_group_rows: int = 10_000,
    conn_id: str = DEFAULT_CONN_ID,
) -> CollectSummary:
    """Download the results of ``batch_id`` (the batch of shard ``part``) into S3.

    Writes ``results/part-NNNNN.jsonl`` (raw, for audit) and ``results/part-NNNNN.parquet``
    (columns of :data:`RESULTS_SCHEMA`). A short or broken download is retried up to
    ``max_attempts`` times, then :class:`ResultsIncomplete` is raised and the partial objects
    are removed; nothing incomplete is left looking complete. An error the API will answer again
    (a refused key, no permission, no such batch) is not retried: it is raised at once as a
    :class:`~claude_batch.errors.ClaudeBatchError` that says what to check.

    :param client: an ``anthropic.Anthropic`` client (the hook's, or one on the emulator).
    :param layout: the run's S3 layout.
    :param part: the shard's part number.
    :param batch_id: the batch the shard was submitted as.
    :param manifest: the run's manifest (read from S3 when not given).
    :param prices: the price table for ``cost_usd`` (batch prices).
    :param max_attempts: downloads tried before giving up.
    :param retry_wait_seconds: the first wait between attempts (doubles each time).
    :param row_group_rows: rows per Parquet row group (bounds memory).
    :param conn_id: the Airflow connection the client was made from (named in error messages).
    """
    manifest = manifest or read_manifest(layout)
    if manifest is None:
        raise FileNotFoundError(f"no manifest at {layout.store.uri(layout.manifest)}; stage the run first")
    shard: ShardManifest = manifest.shard(part)
    table = prices or default_prices()
    try:
        batch = client.messages.batches.retrieve(batch_id)
    except anthropic.APIError as exc:
        raise explain_api_error(exc, conn_id, f"retrieving batch {batch_id}") from exc
    if batch.processing_status != "ended":
        raise BatchNotEnded(f"batch {batch_id} is {batch.processing_status}; collect it once it has ended")
    request_counts = batch.request_counts
    expected = {outcome: int(getattr(request_counts, outcome)) for outcome in OUTCOMES}
    if sum(expected.values()) != shard.count:
        raise ResultsMismatch(
            f"batch {batch_id} has {sum(expected.values())} requests "
            f"but shard part {part} has {shard.count}; is it the right batch?"
        )
    keys = _read_shard_keys(layout, shard)
    release_arrow_memory()
    problems: list[str] = []
    for attempt in range(1, max_attempts + 1):
        download = _Download(layout, part, batch_id, keys, row_group_rows)
        stream = _stream(client, batch_id)
        try:
            download.run(stream, manifest.prompt_version, table)
            return_freed_memory()
        except anthropic.APIStatusError as exc:
            if not is_transient(exc):
                _delete_results(layout, part)
                raise explain_api_error(exc, conn_id, f"downloading the results of batch {batch_id}") from exc
            download.problems.append(f"the download failed: {type(exc).__name__}: {exc}")
        except (anthropic.APIConnectionError, OSError) as exc:
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
    _delete_results(layout, part)
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
        yield from parquet.iter_batches(batch_size=batch_rows, use_threads=False)
