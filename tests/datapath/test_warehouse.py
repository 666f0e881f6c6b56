"""The warehouse over DuckDB and PostgreSQL: extract, ledger transitions, atomic bulk loads, accounting."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import replace

import pytest
from claude_batch.staging import StagingLimits, stage_requests
from claude_batch.storage import ObjectStore, RunLayout
from claude_batch.validation import validate_part, validated_path
from claude_batch.warehouse import (
    AccountingError,
    Dialect,
    DuckDBDialect,
    SourceSpec,
    Warehouse,
    WarehouseError,
    _memory_bytes,
    dialect_for,
)

from tests.datapath.conftest import INTERVAL, Invoice, make_workload, query, ticket_rows
from tests.datapath.helpers import ended, errored, succeeded, write_results_part
from tests.services import create_tickets

GOOD = '{"category": "billing", "total_amount": 300000, "summary": "charged twice"}'
SOURCE = SourceSpec(key_column="id", table="tickets", interval_column="created_at")


def run_once(warehouse, workload, store, run_id, outcome_for, interval=INTERVAL, source=SOURCE):
    """One run of the data path with answers chosen per record key (no API in between)."""
    layout = RunLayout(store, "invoices_dag", run_id)
    rows = warehouse.extract(workload, source, run_id, interval, chunk_rows=7)
    manifest = stage_requests(rows, workload, layout, key_field=source.key_column, cache_setting="off")
    warehouse.claim_staged(workload, layout, manifest)
    for shard in manifest.shards:
        write_results_part(layout, manifest, shard.part, outcome_for)
        validate_part(workload, layout, shard.part)
    load = warehouse.load_run(workload, layout, manifest)
    report = warehouse.check_accounting(workload, manifest)
    warehouse.record_run(workload, manifest, load, report)
    return manifest, load, report


def all_valid(record_key, custom_id):
    return succeeded(custom_id, GOOD)


def ledger(conn, key=None):
    rows = query(
        conn, "SELECT record_key, status, attempts, last_error, run_id FROM claude_batch_ledger ORDER BY 1"
    )
    table = {r[0]: r[1:] for r in rows}
    return table[key] if key else table


def test_dialects_are_detected(warehouse_conn):
    assert dialect_for(warehouse_conn).name in ("duckdb", "postgres")
    with pytest.raises(WarehouseError):
        dialect_for(object())


@pytest.mark.parametrize("name", ["tickets; DROP TABLE x", 'tickets"', "a.b.c", "1abc", "", "x-y"])
def test_identifiers_are_validated(name):
    with pytest.raises(WarehouseError):
        SourceSpec(key_column="id", table=name)
    with pytest.raises(WarehouseError):
        SourceSpec(key_column=name, table="tickets")
    with pytest.raises(WarehouseError):
        Warehouse(None, DuckDBDialect(), ledger_table=name)


def test_extract_streams_the_interval_plus_retries_minus_done(setup):
    warehouse, workload, store = setup
    conn = warehouse.conn
    rows = list(ticket_rows(20)) + list(ticket_rows(5, start=100, day=dt.datetime(2026, 1, 5)))
    rows.append({"id": "quote'\"; DROP TABLE tickets;--", "body": "it's data", "created_at": INTERVAL[0]})
    create_tickets(conn, rows)

    def first_run(record_key, custom_id):
        return (
            errored(custom_id, "overloaded_error") if record_key.endswith("3") else succeeded(custom_id, GOOD)
        )

    manifest, _, report = run_once(warehouse, workload, store, "run-1", first_run)
    assert manifest.extracted_rows == 21
    assert report.by_status == {"succeeded": 19, "retry": 2}
    # Next day's run: its own interval, plus the two retries from yesterday; nothing done comes back.
    next_day = (dt.datetime(2026, 1, 5), dt.datetime(2026, 1, 6))
    keys = {row["id"] for row in warehouse.extract(workload, SOURCE, "run-2", next_day)}
    assert keys == {"t000003", "t000013"} | {f"t{i:06d}" for i in range(100, 105)}
    # Re-extracting yesterday's interval gives only the retries.
    assert {r["id"] for r in warehouse.extract(workload, SOURCE, "run-3", INTERVAL)} == {"t000003", "t000013"}
    # Without an interval: everything not done.
    assert len(list(warehouse.extract(workload, SOURCE, "run-4", None))) == 7
    # A different prompt version starts from scratch.
    other = make_workload(max_tokens=301)
    assert len(list(warehouse.extract(other, SOURCE, "run-5", INTERVAL))) == 21
    assert query(conn, "SELECT COUNT(*) FROM tickets")[0][0] == 26


def test_items_in_flight_for_another_run_are_not_extracted_again(setup):
    warehouse, workload, store = setup
    create_tickets(warehouse.conn, ticket_rows(4))
    layout = RunLayout(store, "invoices_dag", "run-a")
    manifest = stage_requests(
        warehouse.extract(workload, SOURCE, "run-a", INTERVAL),
        workload,
        layout,
        key_field="id",
        cache_setting="off",
    )
    warehouse.claim_staged(workload, layout, manifest)
    assert list(warehouse.extract(workload, SOURCE, "run-b", INTERVAL)) == []
    assert len(list(warehouse.extract(workload, SOURCE, "run-a", INTERVAL))) == 4  # its own re-run


def test_a_source_query_with_percent_signs_and_question_marks(setup):
    warehouse, workload, store = setup
    create_tickets(warehouse.conn, [*ticket_rows(3), {"id": "q", "body": "what?", "created_at": INTERVAL[0]}])
    source = SourceSpec(
        key_column="id",
        query="SELECT * FROM tickets WHERE body LIKE '%refund%' OR body = 'what?'",
        interval_column="created_at",
    )
    assert len(list(warehouse.extract(workload, source, "run-1", INTERVAL))) == 4


def test_ledger_transitions_over_runs(setup):
    warehouse, workload, store = setup
    conn = warehouse.conn
    keys = ["t000000", "t000001", "t000002", "t000003", "t000004", "t000005", "t000006"]
    create_tickets(conn, ticket_rows(7))
    plan = {
        "t000000": [succeeded],
        "t000001": [lambda c: errored(c, "invalid_request_error", "bad params")],
        "t000002": [lambda c: errored(c, "api_error")] * 3,
        "t000003": [lambda c: ended(c, "expired"), lambda c: ended(c, "canceled"), succeeded],
        "t000004": [lambda c: succeeded(c, "not json")] * 2,
        "t000005": [lambda c: succeeded(c, GOOD, stop_reason="max_tokens"), succeeded],
        "t000006": [lambda c: errored(c, "overloaded_error"), lambda c: succeeded(c, "{}")] + [succeeded],
    }
    history = []
    for attempt in range(3):

        def outcome_for(record_key, custom_id, attempt=attempt):
            maker = plan[record_key][attempt]
            return succeeded(custom_id, GOOD) if maker is succeeded else maker(custom_id)

        _, _, report = run_once(warehouse, workload, store, f"run-{attempt}", outcome_for)
        history.append({key: ledger(conn, key)[:2] for key in keys})
    assert history[0] == {
        "t000000": ("succeeded", 1),
        "t000001": ("dead", 1),  # invalid_request_error: dead at once
        "t000002": ("retry", 1),
        "t000003": ("retry", 1),  # expired
        "t000004": ("invalid", 1),  # an invalid answer is retried once
        "t000005": ("invalid", 1),  # cut at max_tokens
        "t000006": ("retry", 1),
    }
    assert history[1]["t000002"] == ("retry", 2)
    assert history[1]["t000003"] == ("retry", 2)  # canceled
    assert history[1]["t000004"] == ("dead", 2)  # ... then dead
    assert history[1]["t000005"] == ("succeeded", 2)
    assert history[1]["t000006"] == ("invalid", 2)
    assert history[2]["t000002"] == ("dead", 3)  # out of attempts
    assert history[2]["t000003"] == ("succeeded", 3)
    assert history[2]["t000006"] == ("succeeded", 3)
    assert "bad params" in ledger(conn, "t000001")[2]
    assert "not valid JSON" in ledger(conn, "t000004")[2]
    assert report.by_status == {"succeeded": 2, "dead": 1}
    results = query(
        conn, "SELECT record_key, approval_required, total_amount FROM invoices_results ORDER BY 1"
    )
    assert [r[0] for r in results] == ["t000000", "t000003", "t000005", "t000006"]
    assert all(r[1] is True and r[2] == 300000 for r in results)


def test_rejected_rows_are_dead_in_the_ledger_and_accounted(setup):
    warehouse, workload, store = setup
    rows = list(ticket_rows(3)) + [
        {"id": None, "body": "no key", "created_at": INTERVAL[0]},
        {"id": "empty", "body": "", "created_at": INTERVAL[0]},
        {"id": "t000001", "body": "duplicate", "created_at": INTERVAL[0]},
    ]
    create_tickets(warehouse.conn, rows)
    manifest, _, report = run_once(warehouse, workload, store, "run-1", all_valid)
    assert manifest.extracted_rows == 6 and manifest.rejected_rows == 3
    assert report.by_status == {"succeeded": 3, "dead": 3}
    dead = {key: value for key, value in ledger(warehouse.conn).items() if value[0] == "dead"}
    assert dead["empty"][2] == "row 5: field 'body' is empty"
    assert any(key.startswith("null_key#") for key in dead)
    assert any(key.startswith("t000001#dup-") for key in dead)


def test_loading_twice_changes_nothing(setup):
    warehouse, workload, store = setup
    create_tickets(warehouse.conn, ticket_rows(10))
    manifest, _, _ = run_once(warehouse, workload, store, "run-1", all_valid)
    before = ledger(warehouse.conn)
    layout = RunLayout(store, "invoices_dag", "run-1")
    warehouse.load_run(workload, layout, manifest)
    warehouse.check_accounting(workload, manifest)
    assert ledger(warehouse.conn) == before
    assert query(warehouse.conn, "SELECT COUNT(*), COUNT(DISTINCT record_key) FROM invoices_results")[0] == (
        10,
        10,
    )


def test_a_load_that_fails_midway_leaves_nothing_behind(setup, monkeypatch):
    warehouse, workload, store = setup
    create_tickets(warehouse.conn, ticket_rows(30))
    layout = RunLayout(store, "invoices_dag", "run-1")
    manifest = stage_requests(
        warehouse.extract(workload, SOURCE, "run-1", INTERVAL),
        workload,
        layout,
        key_field="id",
        cache_setting="off",
    )
    warehouse.claim_staged(workload, layout, manifest)
    write_results_part(layout, manifest, 0, all_valid)
    validate_part(workload, layout, 0, batch_rows=10)
    before = ledger(warehouse.conn)
    real = Warehouse._upsert_results
    calls = []

    def failing(self, *args):
        # The ledger has already moved inside the transaction when the results upsert fails.
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("disk full")
        return real(self, *args)

    monkeypatch.setattr(Warehouse, "_upsert_results", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        warehouse.load_run(workload, layout, manifest, batch_rows=10)
    monkeypatch.undo()
    assert ledger(warehouse.conn) == before
    assert query(warehouse.conn, "SELECT COUNT(*) FROM invoices_results")[0][0] == 0
    warehouse.load_run(workload, layout, manifest, batch_rows=10)
    assert warehouse.check_accounting(workload, manifest).by_status == {"succeeded": 30}


def test_accounting_fails_loudly_naming_the_gap(setup):
    warehouse, workload, store = setup
    create_tickets(warehouse.conn, ticket_rows(5))
    layout = RunLayout(store, "invoices_dag", "run-1")
    manifest = stage_requests(
        warehouse.extract(workload, SOURCE, "run-1", INTERVAL),
        workload,
        layout,
        key_field="id",
        cache_setting="off",
    )
    warehouse.claim_staged(workload, layout, manifest)
    warehouse.mark_submitted(workload, layout, manifest, 0, "msgbatch_lost")
    with pytest.raises(AccountingError) as failure:
        warehouse.check_accounting(workload, manifest)
    message = str(failure.value)
    assert "extracted 5 but succeeded + invalid + retry + dead = 0 (gap 5" in message
    assert "5 items never got an outcome" in message
    assert "t000000 (submitted, batch msgbatch_lost)" in message


def test_run_history_feeds_the_cache_policy(setup):
    warehouse, workload, store = setup
    create_tickets(warehouse.conn, ticket_rows(4))
    usage = {
        "input_tokens": 50,
        "output_tokens": 10,
        "cache_creation_input_tokens": 4000,
        "cache_read_input_tokens": 0,
    }

    def cached(record_key, custom_id):
        read = record_key != "t000000"
        return succeeded(
            custom_id,
            GOOD,
            usage={
                **usage,
                "cache_creation_input_tokens": 0 if read else 4000,
                "cache_read_input_tokens": 4000 if read else 0,
            },
        )

    layout = RunLayout(store, "invoices_dag", "run-1")
    manifest = stage_requests(
        warehouse.extract(workload, SOURCE, "run-1", INTERVAL),
        workload,
        layout,
        key_field="id",
        cache_setting="1h",
    )
    warehouse.claim_staged(workload, layout, manifest)
    write_results_part(layout, manifest, 0, cached)
    validate_part(workload, layout, 0)
    load = warehouse.load_run(workload, layout, manifest)
    warehouse.record_run(workload, manifest, load)
    observations = warehouse.recent_cache_observations(workload)
    assert [(o.setting, o.cache_read_tokens, o.cache_write_tokens) for o in observations] == [
        ("1h", 12000, 4000)
    ]
    row = query(
        warehouse.conn,
        "SELECT succeeded, cost_usd, realtime_cost_usd, batch_uncached_cost_usd, batching_saving_usd, "
        "caching_saving_usd, answers FROM claude_batch_runs",
    )[0]
    # The references are the same tokens uncached: Haiku 4.5 ($1 in, $5 out), 4 x (50 + 4,000) input
    # and 4 x 10 output tokens as plain real-time calls, then in batches (half).
    assert row[0] == 4 and row[6] == 4
    assert row[2] == pytest.approx((4 * 4050 * 1.0 + 40 * 5.0) / 1e6)
    assert row[3] == pytest.approx(row[2] / 2) and row[4] == pytest.approx(row[2] - row[3])
    assert row[5] == pytest.approx(row[3] - row[1]) and row[5] > 0  # three 0.1x reads beat one 2x write
    big = make_workload(system_prompt="Long shared instructions. " * 800, cache="auto")
    # 75% hits, but over 4 requests only: 1h (break-even 53%) is not sure to pay, so auto does not
    # use it yet; over 400 requests it is.
    assert big.choose_cache_setting(observations) == "off"
    many = [
        replace(o, cache_read_tokens=o.cache_read_tokens * 100, cache_write_tokens=o.cache_write_tokens * 100)
        for o in observations
    ]
    assert big.choose_cache_setting(many) == "1h"


def test_requeue_puts_dead_items_back(setup):
    warehouse, workload, store = setup
    create_tickets(warehouse.conn, ticket_rows(2))
    run_once(warehouse, workload, store, "run-1", lambda k, c: errored(c, "invalid_request_error"))
    assert warehouse.ledger_counts(workload) == {"dead": 2}
    warehouse.requeue(workload, ["t000000"])
    assert {r["id"] for r in warehouse.extract(workload, SOURCE, "run-2", INTERVAL)} == {"t000000"}


def test_a_new_schema_field_adds_a_column(setup):
    warehouse, workload, store = setup
    create_tickets(warehouse.conn, ticket_rows(2))
    run_once(warehouse, workload, store, "run-1", all_valid)

    class Richer(Invoice):
        currency: str = "USD"

    richer = make_workload(output_schema=Richer)
    warehouse.ensure_tables(richer)
    run_once(warehouse, richer, store, "run-2", all_valid)
    rows = query(
        warehouse.conn, "SELECT record_key, prompt_version, currency FROM invoices_results ORDER BY 2, 1"
    )
    assert len(rows) == 4 and {r[2] for r in rows} == {None, "USD"}


# -- bulk loads: streamed parts, re-runs, the dialects' load paths ----------------------------


def stage_in_shards(warehouse, workload, store, run_id, shard_rows):
    """Stage the run's tickets in shards of ``shard_rows`` and record them in the ledger."""
    layout = RunLayout(store, "invoices_dag", run_id)
    manifest = stage_requests(
        warehouse.extract(workload, SOURCE, run_id, INTERVAL),
        workload,
        layout,
        key_field="id",
        cache_setting="off",
        limits=StagingLimits(max_requests_per_shard=shard_rows),
    )
    warehouse.claim_staged(workload, layout, manifest)
    return layout, manifest


def answer(summary):
    def outcome_for(record_key, custom_id):
        body = f'{{"category": "billing", "total_amount": 10, "summary": "{summary} {record_key}"}}'
        return succeeded(custom_id, body)

    return outcome_for


def test_a_reload_overwrites_stored_results_and_adds_new_ones(setup):
    warehouse, workload, store = setup
    create_tickets(warehouse.conn, ticket_rows(10))
    layout, manifest = stage_in_shards(warehouse, workload, store, "run-1", 4)
    assert [shard.count for shard in manifest.shards] == [4, 4, 2]
    for shard in manifest.shards:
        write_results_part(layout, manifest, shard.part, answer("first"))
        validate_part(workload, layout, shard.part)
    first = warehouse.load_run(workload, layout, manifest, parts=[0])
    assert (first.rows, first.results_upserted, first.ledger_updated) == (4, 4, 4)
    # Part 0 answered again differently (re-collected and re-validated), then the whole run:
    # part 0's rows are overwritten in place, parts 1 and 2 come in new, in batches of 3 rows.
    write_results_part(layout, manifest, 0, answer("second"))
    validate_part(workload, layout, 0)
    load = warehouse.load_run(workload, layout, manifest, batch_rows=3)
    assert (load.rows, load.results_upserted, load.ledger_updated) == (10, 10, 6)
    rows = query(warehouse.conn, "SELECT record_key, summary FROM invoices_results ORDER BY 1")
    assert rows == [(f"t{i:06d}", f"{'second' if i < 4 else 'first'} t{i:06d}") for i in range(10)]
    assert warehouse.check_accounting(workload, manifest).by_status == {"succeeded": 10}


def test_duckdb_reads_the_parquet_of_a_remote_store_through_its_filesystem(duckdb_conn, local_store):
    workload = make_workload()
    warehouse = Warehouse(duckdb_conn)
    warehouse.ensure_tables(workload)
    create_tickets(duckdb_conn, ticket_rows(6))
    layout, manifest = stage_in_shards(warehouse, workload, local_store, "run-1", 4)
    # The validated parts copied to fsspec's memory filesystem, which stands in for S3: not a
    # local path, so DuckDB reads them through fsspec.
    remote = RunLayout(
        ObjectStore(f"memory://warehouse-test-{uuid.uuid4().hex[:8]}/store"), "invoices_dag", "run-1"
    )
    for shard in manifest.shards:
        write_results_part(layout, manifest, shard.part, all_valid)
        validate_part(workload, layout, shard.part)
        path = validated_path(layout, shard.part)
        remote.store.write_bytes(path, local_store.read_bytes(path))
    load = warehouse.load_run(workload, remote, manifest)
    assert (load.rows, load.results_upserted) == (6, 6)
    assert warehouse.check_accounting(workload, manifest).by_status == {"succeeded": 6}
    assert duckdb_conn.list_filesystems() == []  # registered for the load only


def test_duckdb_loads_within_its_memory_budget_and_restores_the_limit(duckdb_conn, local_store):
    workload = make_workload()
    warehouse = Warehouse(duckdb_conn, DuckDBDialect(load_memory_limit="64MiB"))
    warehouse.ensure_tables(workload)
    create_tickets(duckdb_conn, ticket_rows(3))
    limits = []
    real = Warehouse._apply_outcomes

    def recording(self, cursor, *args):
        limits.append(cursor.execute("SELECT current_setting('memory_limit')").fetchone()[0])
        return real(self, cursor, *args)

    setting = "SELECT current_setting('memory_limit')"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Warehouse, "_apply_outcomes", recording)
        duckdb_conn.execute("SET memory_limit = '2GiB'")
        run_once(warehouse, workload, local_store, "run-1", all_valid)
        assert duckdb_conn.execute(setting).fetchone()[0] == "2.0 GiB"
        duckdb_conn.execute("SET memory_limit = '32MiB'")  # a lower limit is the user's: kept
        run_once(warehouse, make_workload(max_tokens=301), local_store, "run-2", all_valid)
        assert duckdb_conn.execute(setting).fetchone()[0] == "32.0 MiB"
    assert limits == ["64.0 MiB", "32.0 MiB"]


def _out_of_memory_first(limits, failures):
    """Warehouse._load_reading_parquet that records each attempt's limit and fails the first ``failures``."""
    import duckdb

    real = Warehouse._load_reading_parquet

    def loading(self, *args):
        limits.append(self.conn.execute("SELECT current_setting('memory_limit')").fetchone()[0])
        if len(limits) <= failures:
            with self.dialect.transaction(self.conn) as cursor:  # a write the rollback must undo
                cursor.execute(f"DELETE FROM {self.ledger_table}")
                raise duckdb.OutOfMemoryException("Out of Memory Error: failed to allocate data")
        return real(self, *args)

    return loading


@pytest.mark.parametrize(
    ("database_limit", "failures", "attempts", "statuses"),
    [
        # Run again with twice the budget; the failed attempts' writes were rolled back.
        ("2GiB", 2, ["64.0 MiB", "128.0 MiB", "256.0 MiB"], [("succeeded", 3)]),
        # At the database's own limit it stops, naming it, with nothing loaded.
        ("100MiB", 99, ["64.0 MiB", "100.0 MiB"], [("pending", 3)]),
    ],
)
def test_a_duckdb_load_out_of_memory_is_rolled_back_and_run_again_with_twice_the_budget(
    duckdb_conn, local_store, database_limit, failures, attempts, statuses
):
    workload = make_workload()
    warehouse = Warehouse(duckdb_conn, DuckDBDialect(load_memory_limit="64MiB"))
    warehouse.ensure_tables(workload)
    create_tickets(duckdb_conn, ticket_rows(3))
    limits: list[str] = []
    duckdb_conn.execute(f"SET memory_limit = '{database_limit}'")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Warehouse, "_load_reading_parquet", _out_of_memory_first(limits, failures))
        if statuses[0][0] == "succeeded":
            run_once(warehouse, workload, local_store, "run-1", all_valid)
        else:
            failure = r"out of memory loading 3 rows .*100\.0 MiB.*nothing was loaded"
            with pytest.raises(WarehouseError, match=failure):
                run_once(warehouse, workload, local_store, "run-1", all_valid)
    assert limits == attempts
    restored = duckdb_conn.execute("SELECT current_setting('memory_limit')").fetchone()[0]
    assert restored == {"2GiB": "2.0 GiB", "100MiB": "100.0 MiB"}[database_limit]  # the database's own
    ledger = f"SELECT status, COUNT(*) FROM {warehouse.ledger_table} GROUP BY status"
    assert query(duckdb_conn, ledger) == statuses


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("512MiB", 512 * 2**20),
        ("18.8 GiB", 18.8 * 2**30),
        ("1GB", 1e9),
        ("100KB", 1e5),
        ("123bytes", 123.0),
        ("16383.9 PiB", 16383.9 * 2**50),
        ("-1", None),
        ("lots", None),
        ("1GB'; SET x=1; --", None),
    ],
)
def test_memory_sizes_are_read_as_duckdb_writes_them(size, expected):
    assert _memory_bytes(size) == expected


def test_a_bad_duckdb_memory_budget_is_refused_up_front():
    with pytest.raises(WarehouseError, match="not a memory size"):
        DuckDBDialect(load_memory_limit="512 megs")


def test_postgres_raises_work_mem_for_the_ledger_update_only(postgres_conn, local_store):
    workload = make_workload()
    warehouse = Warehouse(postgres_conn)
    warehouse.ensure_tables(workload)
    create_tickets(postgres_conn, ticket_rows(3))
    seen = []
    real = Warehouse._apply_outcomes

    def recording(self, cursor, *args):
        cursor.execute("SELECT current_setting('work_mem')")
        seen.append(cursor.fetchone()[0])
        return real(self, cursor, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Warehouse, "_apply_outcomes", recording)
        run_once(warehouse, workload, local_store, "run-1", all_valid)
        with postgres_conn.cursor() as cursor:  # a larger setting of the session's is kept
            cursor.execute("SET work_mem = '1GB'")
        run_once(warehouse, make_workload(max_tokens=301), local_store, "run-2", all_valid)
    assert seen == ["256MB", "1GB"]
    assert query(postgres_conn, "SELECT current_setting('work_mem')")[0][0] == "1GB"


def test_a_dialect_that_reads_parquet_must_say_how(duckdb_conn, local_store):
    class HalfDone(DuckDBDialect):
        parquet_relation = Dialect.parquet_relation

    workload = make_workload()
    warehouse = Warehouse(duckdb_conn, HalfDone())
    warehouse.ensure_tables(workload)
    create_tickets(duckdb_conn, ticket_rows(2))
    with pytest.raises(NotImplementedError, match="does not provide parquet_relation"):
        run_once(warehouse, workload, local_store, "run-1", all_valid)
