"""Staging from Arrow record batches: the same shards, keys and rejects as from the same rows as dicts."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest
from claude_batch.staging import StagingError, StagingLimits, iter_rejections, read_shard_keys, stage_requests
from claude_batch.staging.chunks import BatchRows, column_of
from claude_batch.storage import RunLayout

from tests.datapath.conftest import make_workload


def tricky_rows(count: int) -> list[dict]:
    """Rows with every kind of reject a batch can hold, among good ones."""
    rows = []
    for i in range(count):
        body = f'Invoice {i}: "quoted" \\ back\tslash é 😀 total ${i * 3}.00'
        key: str | None = f"t{i:06d}"
        if i % 97 == 5:
            key = None
        elif i % 89 == 7:
            key = "t000003"  # a duplicate of an earlier row
        elif i % 83 == 11:
            key = "has space/!"  # hashed into its custom_id
        if i % 79 == 13:
            body = "   "
        elif i % 73 == 17:
            body = "bad \x01 control"
        elif i % 71 == 19:
            body = None
        rows.append(
            {"id": key, "body": body, "created_at": dt.datetime(2026, 1, 1) + dt.timedelta(minutes=i)}
        )
    return rows


def as_batches(rows: list[dict], size: int) -> list[pa.RecordBatch]:
    table = pa.Table.from_pylist(rows)
    return table.to_batches(max_chunksize=size)


def staged_files(layout: RunLayout, manifest) -> dict[str, bytes]:
    paths = [shard.requests for shard in manifest.shards] + [manifest.rejects]
    files = {path: layout.store.read_bytes(f"{layout.prefix}/{path}") for path in paths}
    for shard in manifest.shards:
        files[shard.keys] = repr(read_shard_keys(layout, shard).to_pylist()).encode()
    return files


def route(row: dict) -> str:
    return "claude-sonnet-4-5" if row["created_at"].minute % 3 else "claude-haiku-4-5"


@pytest.mark.parametrize(("batch_rows", "routed"), [(1, False), (333, True), (5_000, False)])
def test_batches_stage_the_same_bytes_as_the_same_rows_as_mappings(local_store, batch_rows, routed):
    workload = make_workload(route=route, route_models=("claude-sonnet-4-5",)) if routed else make_workload()
    rows = tricky_rows(1_600)
    batches = as_batches(rows, batch_rows)
    mapped = [row for batch in batches for row in batch.to_pylist()]  # the values Arrow holds
    limits = StagingLimits(max_requests_per_shard=600)
    results = []
    for name, source in (("mappings", mapped), ("batches", batches)):
        layout = RunLayout(local_store, "invoices_dag", name)
        manifest = stage_requests(
            source, workload, layout, key_field="id", cache_setting="off", limits=limits, chunk_rows=700
        )
        results.append((manifest, staged_files(layout, manifest)))
    (by_mappings, files_by_mappings), (by_batches, files_by_batches) = results
    assert files_by_batches == files_by_mappings
    assert by_batches.rejected_by_reason == by_mappings.rejected_by_reason
    assert set(by_batches.rejected_by_reason) >= {
        "null_key",
        "duplicate_key",
        "empty_text",
        "control_character",
    }
    assert [s.sha256 for s in by_batches.shards] == [s.sha256 for s in by_mappings.shards]
    assert by_batches.extracted_rows == 1_600 == by_batches.staged_requests + by_batches.rejected_rows
    assert len(by_batches.models) == (2 if routed else 1)


def test_a_rejected_row_of_a_batch_is_named_and_kept_whole(layout):
    rows = tricky_rows(100)
    manifest = stage_requests(
        as_batches(rows, 40), make_workload(), layout, key_field="id", cache_setting="off"
    )
    rejections = {r["row_number"]: r for r in iter_rejections(layout, manifest)}
    assert rejections[6]["reason"] == "row 6: record key 'id' is NULL"
    assert rejections[6]["row"] == {"id": None, "body": rows[5]["body"], "created_at": "2026-01-01T00:05:00"}
    assert rejections[18]["reason_code"] == "control_character"


def test_batch_rows_read_columns_and_build_a_row_only_on_demand():
    batch = pa.RecordBatch.from_pylist([{"a": 1, "b": "x"}, {"a": 2, "b": None}, {"a": 3, "b": "z"}])
    rows = BatchRows(batch)
    assert len(rows) == 3 and rows[1] == {"a": 2, "b": None} and rows[-1] == {"a": 3, "b": "z"}
    assert list(rows) == batch.to_pylist() and rows[1:] == batch.to_pylist()[1:]
    assert column_of(rows, "b") == ["x", None, "z"] and column_of(rows, "missing") == [None, None, None]
    assert list(rows.take([0, 2])) == [{"a": 1, "b": "x"}, {"a": 3, "b": "z"}]
    with pytest.raises(IndexError):
        rows[3]


def test_rows_cannot_mix_batches_and_mappings(layout):
    batch = pa.RecordBatch.from_pylist([{"id": "a", "body": "text"}])
    with pytest.raises(StagingError, match="mix record batches with dict"):
        stage_requests([batch, {"id": "b", "body": "text"}], make_workload(), layout, key_field="id",
                       cache_setting="off")  # fmt: skip
