"""Extract as Arrow record batches: the dialects' stream_batches, the row limit and the estimate's sample."""

from __future__ import annotations

import pyarrow as pa
import pytest
from claude_batch.estimates import RowSample
from claude_batch.steps.stage import first_rows
from claude_batch.warehouse import RECORD_KEY_COLUMN, Dialect, SourceSpec, Warehouse

from tests.datapath.conftest import INTERVAL, make_workload, ticket_rows
from tests.services import create_tickets

SOURCE = SourceSpec(key_column="id", table="tickets", interval_column="created_at")


def numbered_batches(count: int, size: int) -> list[pa.RecordBatch]:
    table = pa.table({"n": list(range(count)), "text": [f"row {i}" for i in range(count)]})
    return table.to_batches(max_chunksize=size)


def test_extract_batches_give_the_rows_extract_gives(warehouse_conn):
    warehouse = Warehouse(warehouse_conn)
    workload = make_workload()
    warehouse.ensure_tables(workload)
    create_tickets(warehouse_conn, ticket_rows(25))
    statement = warehouse.extract_query(workload, SOURCE, "run-1", INTERVAL)
    streamed = list(warehouse.extract_batches(statement, chunk_rows=7))
    as_dicts = list(warehouse.extract(workload, SOURCE, "run-1", INTERVAL, chunk_rows=7))
    if warehouse.dialect.name == "duckdb":  # batches of at most chunk_rows rows, none empty
        assert all(isinstance(batch, pa.RecordBatch) and 0 < batch.num_rows <= 7 for batch in streamed)
        streamed = [row for batch in streamed for row in batch.to_pylist()]
    assert streamed == as_dicts
    assert len(as_dicts) == 25 and all(RECORD_KEY_COLUMN in row for row in as_dicts)


def test_duckdb_batches_closed_early_leave_the_connection_free(duckdb_conn):
    warehouse = Warehouse(duckdb_conn)
    batches = warehouse.dialect.stream_batches(duckdb_conn, "SELECT range AS n FROM range(100000)", [], 1000)
    assert next(iter(batches)).num_rows == 1000
    batches.close()  # type: ignore[union-attr]  # a failed staging stops reading
    assert duckdb_conn.execute("SELECT 42").fetchone() == (42,)


def test_the_default_dialect_streams_dicts(duckdb_conn):
    rows = list(Dialect().stream_batches(duckdb_conn, "SELECT range AS n FROM range(5)", [], 2))
    assert rows == [{"n": n} for n in range(5)]


@pytest.mark.parametrize("as_batches", [True, False])
@pytest.mark.parametrize("limit", [1, 7, 10, 23, 100])
def test_the_row_limit_counts_rows(as_batches, limit):
    batches = numbered_batches(30, 10)
    rows = batches if as_batches else [row for batch in batches for row in batch.to_pylist()]
    kept = list(first_rows(iter(rows), limit))
    if as_batches:
        assert all(isinstance(batch, pa.RecordBatch) for batch in kept)
        kept = [row for batch in kept for row in batch.to_pylist()]
    assert [row["n"] for row in kept] == list(range(min(limit, 30)))
    assert list(first_rows(iter([]), limit)) == []


@pytest.mark.parametrize("size", [0, 5, 200])
@pytest.mark.parametrize("batch_rows", [1, 3, 64, 5_000])
def test_a_sample_of_batches_is_the_sample_of_the_same_rows_as_mappings(size, batch_rows):
    batches = numbered_batches(3_000, batch_rows)
    by_rows, by_batches = RowSample(size, seed="dag/run"), RowSample(size, seed="dag/run")
    passed_rows = list(by_rows.wrap(row for batch in batches for row in batch.to_pylist()))
    passed_batches = list(by_batches.wrap(iter(batches)))
    assert all(a is b for a, b in zip(passed_batches, batches, strict=True))  # passed through as they are
    assert len(passed_rows) == by_rows.seen == by_batches.seen == 3_000
    assert by_batches.rows == by_rows.rows
    assert len(by_batches.rows) == size
    # A uniform sample reaches past the first rows (the reservoir's replacements happened).
    assert size == 0 or max(row["n"] for row in by_batches.rows) > size


def test_a_sample_of_fewer_rows_than_its_size_keeps_them_all():
    sample = RowSample(200, seed="s")
    assert sum(batch.num_rows for batch in sample.wrap(numbered_batches(150, 40))) == 150
    assert [row["n"] for row in sample.rows] == list(range(150)) and sample.seen == 150
    empty = RowSample(200, seed="s")
    assert list(empty.wrap(iter([]))) == [] and empty.seen == 0
