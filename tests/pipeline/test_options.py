"""Run options: the data interval, the Params' window, and model overrides."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from claude_batch.pipeline import PipelineConfig, RunOptions, SourceSpec, effective_workload, run_interval

from tests.dags.pipeline_dags import TINY_TRIAGE


def test_the_data_interval_applies_unless_a_window_is_given():
    start, end = datetime(2026, 11, 10, tzinfo=UTC), datetime(2026, 11, 11, tzinfo=UTC)
    assert run_interval(RunOptions(), start, end) == (datetime(2026, 11, 10), datetime(2026, 11, 11))
    window = RunOptions(window_start="2026-10-01", window_end="2026-10-03")
    assert run_interval(window, start, end) == (datetime(2026, 10, 1), datetime(2026, 10, 3))
    assert run_interval(RunOptions(), None, None) is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (RunOptions(window_start="2026-10-01"), "Give both window_start and window_end"),
        (RunOptions(window_end="2026-10-01"), "Give both window_start and window_end"),
        (RunOptions(window_start="2026-10-03", window_end="2026-10-01"), "must be before window_end"),
    ],
)
def test_a_half_given_or_backwards_window_is_an_error(options, message):
    with pytest.raises(ValueError, match=message):
        run_interval(options, None, None)


def test_model_override_is_checked_and_changes_the_prompt_version():
    config = PipelineConfig(
        workload=TINY_TRIAGE,
        source=SourceSpec(table="tickets", key_column="ticket_id"),
        allowed_models=("claude-haiku-4-5", "claude-sonnet-4-5"),
    )
    assert effective_workload(config, RunOptions()) is TINY_TRIAGE
    sonnet = effective_workload(config, RunOptions(model="claude-sonnet-4-5"))
    assert sonnet.model == "claude-sonnet-4-5" and sonnet.prompt_version != TINY_TRIAGE.prompt_version
    with pytest.raises(ValueError, match="model 'gpt-4' is not one of the allowed models"):
        effective_workload(config, RunOptions(model="gpt-4"))
    assert RunOptions.from_params({"model": "", "row_limit": 5, "unknown": 1}) == RunOptions(row_limit=5)


def test_a_postgres_warehouse_connection_opens_with_psycopg2(postgres_dsn, monkeypatch):
    import json

    from claude_batch.connections import open_warehouse
    from claude_batch.warehouse import PostgresDialect

    monkeypatch.setenv(
        "AIRFLOW_CONN_CLAUDE_BATCH_WAREHOUSE",
        json.dumps({"conn_type": "postgres", "host": "127.0.0.1", "login": "postgres", "schema": "test"}),
    )
    with open_warehouse("claude_batch_warehouse") as warehouse:
        assert isinstance(warehouse.dialect, PostgresDialect)
    assert warehouse.conn.closed, "the task's connection is closed when its stage ends"


def test_a_duckdb_warehouse_file_is_released_when_the_stage_ends(tmp_path, monkeypatch):
    import json

    import duckdb
    from claude_batch.connections import open_warehouse

    path = tmp_path / "warehouse.duckdb"
    monkeypatch.setenv(
        "AIRFLOW_CONN_CLAUDE_BATCH_WAREHOUSE", json.dumps({"conn_type": "duckdb", "host": str(path)})
    )
    with pytest.raises(RuntimeError), open_warehouse("claude_batch_warehouse") as warehouse:
        warehouse.conn.execute("CREATE TABLE t AS SELECT 1 AS x")
        raise RuntimeError("the stage failed")
    with pytest.raises(duckdb.ConnectionException):
        warehouse.conn.execute("SELECT 1")
    # Another process could open the file now; here, a fresh connection reads what was written.
    assert duckdb.connect(str(path)).execute("SELECT x FROM t").fetchall() == [(1,)]
