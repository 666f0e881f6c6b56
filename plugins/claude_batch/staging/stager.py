"""Staging: stream extracted rows into request shards on S3, with a manifest.

:func:`stage_requests` is the entry point. Rows arrive in chunks; each chunk is screened
(:mod:`~claude_batch.staging.screening`: keys, duplicates, fields, text, models and sizes), its
lines are sized and built column-wide (:mod:`~claude_batch.staging.wire`), split over shards by
count and bytes, and written on the I/O thread (:mod:`~claude_batch.staging.writers`). The
shard and manifest format is in :mod:`~claude_batch.staging.manifest`.

Memory stays flat: rows are processed in chunks, lines are buffered a megabyte at a time, and
duplicate detection keeps 8 bytes per key (sorted runs of 64-bit key hashes). Every extracted
row is either staged or rejected with a reason: the manifest's counts prove it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict
from datetime import UTC, datetime
from itertools import islice
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pyarrow as pa

from claude_batch.costs import (
    CHARS_PER_TOKEN,
    REQUEST_OVERHEAD_TOKENS,
    CacheSetting,
    CostEstimate,
    ModelEstimate,
    PriceTable,
    default_prices,
)
from claude_batch.staging.chunks import BatchRows, Chunk, peek_rows
from claude_batch.staging.manifest import (
    SHARD_KEYS_SCHEMA,
    Manifest,
    ShardManifest,
    StagingError,
    StagingLimits,
    rejects_path,
    relative_path,
)
from claude_batch.staging.screening import RowScreen, max_content_chars
from claude_batch.staging.wire import LineLayout, join_lines
from claude_batch.staging.writers import BackgroundIO, Rejections, ShardWriter
from claude_batch.tuning import bulk_processing

if TYPE_CHECKING:
    from claude_batch.storage import RunLayout
    from claude_batch.workloads import Workload

# What staging reads: rows as mappings, or Arrow record batches of rows.
Rows = Iterable[Mapping[str, Any]] | Iterable[pa.RecordBatch]

_WRITE_PIECE_BYTES = 2 * 1024 * 1024
# Rows per chunk adapt so a chunk renders to about this many bytes of requests.
_CHUNK_TARGET_BYTES = 4 * 1024 * 1024


def stage_requests(
    rows: Rows,
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

    :param rows: the extracted rows, streamed (e.g. ``Warehouse.extract``): mappings, or Arrow
        record batches (whose columns are read without building a dict per row).
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
    stager = Stager(
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
            for chunk in _chunks(rows, _chunk_sizes(stager, chunk_rows)):
                stager.add_chunk(chunk)
        except BaseException:
            stager.abort()
            raise
        return stager.finish()


def _chunk_sizes(stager: Stager, chunk_rows: int) -> Iterator[int]:
    """Rows of each next chunk: 1,000 at first, then about 4 MB of requests (at most ``chunk_rows``)."""
    yield min(chunk_rows, 1_000)
    while True:
        # Long prompts make long lines: fewer rows a chunk keep its bytes (and memory) bounded.
        per_row = stager.bytes_staged / max(stager.rows_seen, 1)
        yield max(256, min(chunk_rows, int(_CHUNK_TARGET_BYTES / max(per_row, 1.0))))


def _chunks(rows: Rows, sizes: Iterator[int]) -> Iterator[Sequence[Mapping[str, Any]]]:
    """The rows in chunks of the next size each: lists of mappings, or record batches' rows.

    Batches are sliced and joined to the same chunk sizes as mappings, so the same rows give
    the same shards and rejects (in the same order) whichever way they arrive.
    """
    as_batches, iterator = peek_rows(rows)
    if as_batches is None:
        return
    if not as_batches:
        mappings = cast(Iterator[Mapping[str, Any]], iterator)
        size = next(sizes)
        while chunk := list(islice(mappings, size)):
            yield chunk
            size = next(sizes)
        return
    size, held, parts = next(sizes), 0, []
    for batch in iterator:
        if not isinstance(batch, pa.RecordBatch):
            raise StagingError(f"rows mix record batches with {type(batch).__name__} values")
        offset = 0
        while offset < batch.num_rows:
            taken = min(size - held, batch.num_rows - offset)
            parts.append(batch.slice(offset, taken))
            held, offset = held + taken, offset + taken
            if held == size:
                yield BatchRows(parts[0] if len(parts) == 1 else pa.concat_batches(parts))
                size, held, parts = next(sizes), 0, []
    if held:
        yield BatchRows(parts[0] if len(parts) == 1 else pa.concat_batches(parts))


class Stager:
    """One run's staging: chunks of rows in, shards, rejects and the manifest out.

    Call :meth:`add_chunk` for each chunk, then :meth:`finish` (or :meth:`abort` on failure,
    which closes what is open and writes no manifest). The stager owns the run's shard writers,
    the I/O thread and the rejects file; the checks are its :class:`RowScreen`'s.
    """

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
        self.cache_setting = cache_setting
        self.prices = prices
        self.limits = limits
        self.assumed_cache_hit_rate = assumed_cache_hit_rate
        content_limits = max_content_chars(workload, prices)  # first: raises before opening anything
        self.lines = LineLayout(workload.user_template, workload.encoder(cache_setting))
        self.chars_by_model: dict[str, int] = {}
        self.count_by_model: dict[str, int] = {}
        self.rows_seen = 0
        self.bytes_staged = 0
        self.writers: list[ShardWriter] = []
        self.shard: ShardWriter | None = None
        self.io = BackgroundIO()
        self.stack = ExitStack()
        rejects_handle = self.stack.enter_context(layout.store.open(rejects_path(layout), "wb"))
        self.rejections = Rejections(rejects_handle)
        self.screen = RowScreen(
            workload, key_field, key_name or key_field, self.lines, content_limits, self.rejections
        )

    # -- per chunk ------------------------------------------------------------------------

    def add_chunk(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Check, render and encode a chunk of rows, then hand the lines to the shards.

        Every step runs over whole columns (C-level maps, numpy, pyarrow); rows with bad input
        leave through the slow paths, each rejected with its reason.
        """
        chunk = Chunk(rows, self.rows_seen + 1)
        self.rows_seen += len(rows)
        self.screen.check_keys(chunk)
        self.screen.check_duplicates(chunk)
        self.screen.check_fields(chunk)
        self.screen.check_text(chunk)
        self.screen.check_models_and_sizes(chunk)
        self._write_lines(chunk)

    def _openings(self, chunk: Chunk) -> list[str] | str:
        """Each row's line opening when rows are routed, else the one opening all rows share."""
        if self.workload.route is None:
            return self.lines.opening(self.workload.model)
        return [self.lines.opening(model) for model in chunk.models]

    def _write_lines(self, chunk: Chunk) -> None:
        """Check line sizes, count the content for the estimate, and write the lines."""
        openings = self._openings(chunk)
        sizes = self.lines.line_sizes(chunk.custom_ids, chunk.text, openings)
        max_line = self.limits.max_shard_bytes
        too_large = np.flatnonzero(sizes > max_line).tolist()
        if too_large:
            for index in too_large:
                self.screen.reject(
                    chunk.numbers[index], chunk.keys[index], chunk.keys[index], "request_too_large",
                    f"request is {int(sizes[index])} bytes, over the shard limit of {max_line}",
                    chunk.rows[index],
                )  # fmt: skip
            chunk.drop(set(too_large))
            openings = self._openings(chunk)
            sizes = self.lines.line_sizes(chunk.custom_ids, chunk.text, openings)
        chars = self.screen.content_chars(chunk)
        if self.workload.route is None:
            if len(chunk):
                model = self.workload.model
                self.chars_by_model[model] = self.chars_by_model.get(model, 0) + int(chars.sum())
                self.count_by_model[model] = self.count_by_model.get(model, 0) + len(chunk)
        else:
            for model, length in zip(chunk.models, chars.tolist(), strict=True):
                self.chars_by_model[model] = self.chars_by_model.get(model, 0) + length
                self.count_by_model[model] = self.count_by_model.get(model, 0) + 1
        self._write_to_shards(chunk, openings, sizes)

    def _write_to_shards(self, chunk: Chunk, openings: list[str] | str, sizes: np.ndarray) -> None:
        """Split the chunk's lines over shards by count and bytes, and queue the writes.

        Each piece of a few MB is one ``str.join`` over the line layout's columns (constants
        repeated, fields as escaped) and one encode, so no per-line object is built.
        """
        max_requests = self.limits.max_requests_per_shard
        max_bytes = self.limits.max_shard_bytes
        columns = self.lines.columns(chunk.custom_ids, chunk.text, openings)
        routed = isinstance(openings, list)
        keys_batch = _keys_batch(chunk, routed)
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
            batch = keys_batch.slice(start, end - start)
            models = chunk.models[start:end] if routed else [chunk.models[start]]
            for model, count in (Counter(models) if routed else {models[0]: end - start}).items():
                shard.models[model] = shard.models.get(model, 0) + count
            # Hand the bytes over in pieces of a few MB: the queue then holds little at a time.
            cumulative = np.cumsum(sizes[start:end])
            piece_start = start
            while piece_start < end:
                done = int(cumulative[piece_start - start - 1]) if piece_start > start else 0
                piece_end = start + int(np.searchsorted(cumulative, done + _WRITE_PIECE_BYTES, side="right"))
                piece_end = min(max(piece_end, piece_start + 1), end)
                data = join_lines(columns, piece_start, piece_end)
                expected = int(cumulative[piece_end - start - 1]) - done
                if len(data) != expected:  # the shard limits rely on these sizes
                    raise StagingError(f"a piece of {len(data)} bytes was sized {expected}: a staging bug")
                shard.count += piece_end - piece_start
                shard.bytes += expected
                self.bytes_staged += expected
                self.io.submit(shard.write_lines, data)
                piece_start = piece_end
            self.io.submit(shard.write_keys, batch)
            start = end

    def _next_shard(self) -> ShardWriter:
        """Close the current shard (on the I/O thread) and open the next part."""
        if self.shard is not None:
            self.io.submit(self.shard.close)
        shard = ShardWriter(self.layout, len(self.writers))
        self.writers.append(shard)
        self.io.submit(shard.open, self.layout)
        self.shard = shard
        return shard

    # -- the end --------------------------------------------------------------------------

    def finish(self) -> Manifest:
        """Close every file, remove stale parts, and write and return the manifest.

        :raises StagingError: when the staged and rejected rows do not add up to the extracted.
        """
        if self.shard is not None:
            self.io.submit(self.shard.close)
            self.shard = None
        self.io.close()
        self.stack.close()
        shards = [writer.manifest(self.layout) for writer in self.writers]
        self._delete_stale_parts(shards)
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
            rejects=relative_path(self.layout, rejects_path(self.layout)),
            shards=shards,
            limits=asdict(self.limits),
            estimate=self._estimate().to_dict(self.prices),
            created_at=datetime.now(UTC).isoformat(),
        )
        if manifest.extracted_rows != manifest.staged_requests + manifest.rejected_rows:
            raise StagingError(
                f"staging lost rows: {manifest.extracted_rows} extracted, {manifest.staged_requests} staged, "
                f"{manifest.rejected_rows} rejected"
            )
        self.layout.store.write_json(self.layout.manifest, manifest.to_dict())
        return manifest

    def _estimate(self) -> CostEstimate:
        """Tokens and cost of the staged requests, per model."""
        estimate = CostEstimate(self.cache_setting, self.assumed_cache_hit_rate)
        max_tokens = self.workload.max_tokens
        expected_output = self.workload.expected_output_tokens or max_tokens
        for model, count in sorted(self.count_by_model.items()):
            estimate.per_model[model] = ModelEstimate(
                requests=count,
                prefix_tokens_per_request=self.workload.prefix_tokens,
                variable_input_tokens=-(-self.chars_by_model[model] // CHARS_PER_TOKEN)
                + REQUEST_OVERHEAD_TOKENS * count,
                max_output_tokens=max_tokens * count,
                expected_output_tokens=expected_output * count,
                content_chars=self.chars_by_model[model],
            )
        return estimate

    def _delete_stale_parts(self, shards: list[ShardManifest]) -> None:
        """A re-run with fewer shards must not leave an earlier run's extra parts behind."""
        keep = {path for shard in shards for path in (shard.requests, shard.keys)}
        keep.add(relative_path(self.layout, rejects_path(self.layout)))
        for path in self.layout.store.list(f"{self.layout.prefix}/requests"):
            if relative_path(self.layout, path) not in keep:
                self.layout.store.delete(path)

    def abort(self) -> None:
        """Close what is open after a failure; no manifest is written."""
        try:
            if self.shard is not None:
                self.io.submit(self.shard.close)
            self.io.close()
        finally:
            self.stack.close()


def _keys_batch(chunk: Chunk, routed: bool) -> pa.RecordBatch:
    """The chunk's rows as keys-sidecar columns, built once a chunk (shards take slices).

    Row numbers still in order without a gap (no row of the chunk rejected) and one model for
    every row come from numpy and one repeated value rather than from a Python object per row.
    """
    count = len(chunk)
    custom_ids = pa.array(chunk.custom_ids, pa.string())
    keys = custom_ids if chunk.keys is chunk.custom_ids else pa.array(chunk.keys, pa.string())
    numbers = chunk.numbers
    if count and numbers[-1] - numbers[0] == count - 1:
        row_numbers = pa.array(np.arange(numbers[0], numbers[0] + count, dtype=np.int64))
    else:
        row_numbers = pa.array(numbers, pa.int64())
    if routed or not count:
        models = pa.array(chunk.models, pa.string())
    else:
        models = pa.repeat(pa.scalar(chunk.models[0], pa.string()), count)
    return pa.record_batch([custom_ids, keys, row_numbers, models], schema=SHARD_KEYS_SCHEMA)
