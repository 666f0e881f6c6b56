"""Configuration mistakes fail at the pipeline's first step (or when the DAG is parsed), naming the cause.

Each used to give a green run with every row ``dead``, or a misleading message after staging
had begun. Here each one stops ``run_stage`` (or the DAG builder) before a row is read, no
manifest is written and the ledger stays empty, so nothing can be submitted or paid for.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import duckdb
import pytest
from claude_batch.pipeline import PipelineConfig, RunOptions, claude_batch_dag, run_stage
from claude_batch.preflight import PreflightError
from claude_batch.storage import ObjectStore, RunLayout, StorageRootError
from claude_batch.warehouse import SourceSpec, Warehouse

from tests.reliability.harness import RUN_1, SOURCE, WORKLOAD


@pytest.fixture
def warehouse():
    conn = duckdb.connect()
    conn.execute("CREATE TABLE tickets (id VARCHAR, body VARCHAR, created_at TIMESTAMP)")
    conn.execute("INSERT INTO tickets VALUES ('t1', 'charged twice', ?)", [RUN_1[0]])
    yield Warehouse(conn)
    conn.close()


def stage_fails(warehouse, tmp_path, config: PipelineConfig, options: RunOptions | None = None) -> str:
    options = options or RunOptions()
    layout = RunLayout(ObjectStore(str(tmp_path)), "dag", "run-1")
    with pytest.raises(ValueError) as raised:
        run_stage(config, warehouse, layout, options, RUN_1)
    assert not layout.store.exists(layout.manifest)
    ledger = warehouse.conn.execute(
        "SELECT COUNT(*) FROM information_schema.tables WHERE table_name = 'claude_batch_ledger'"
    ).fetchone()[0]
    if ledger:
        assert warehouse.conn.execute("SELECT COUNT(*) FROM claude_batch_ledger").fetchone()[0] == 0
    return str(raised.value)


def config(**changes) -> PipelineConfig:
    return PipelineConfig(**{"workload": WORKLOAD, "source": SOURCE, **changes})


def test_a_missing_key_column_is_named(warehouse, tmp_path):
    message = stage_fails(
        warehouse, tmp_path, config(source=dataclasses.replace(SOURCE, key_column="ticket_id"))
    )
    assert "ticket_id" in message and "key column" in message


def test_a_key_column_in_another_case_is_named_on_duckdb(warehouse, tmp_path):
    message = stage_fails(warehouse, tmp_path, config(source=dataclasses.replace(SOURCE, key_column="ID")))
    assert "'ID'" in message and "found 'id'" in message and "case-sensitive" in message


def test_a_missing_interval_column_is_named(warehouse, tmp_path):
    message = stage_fails(
        warehouse, tmp_path, config(source=dataclasses.replace(SOURCE, interval_column="received_at"))
    )
    assert "received_at" in message and "interval" in message


def test_a_missing_template_field_is_named(warehouse, tmp_path):
    workload = dataclasses.replace(WORKLOAD, user_template="Ticket {id}: {subject}\n{body}")
    message = stage_fails(warehouse, tmp_path, config(workload=workload))
    assert "subject" in message and "template" in message


def test_a_model_outside_the_allowed_models_is_named_in_the_plain_steps(warehouse, tmp_path):
    allowed = config(allowed_models=("claude-haiku-4-5",))
    message = stage_fails(warehouse, tmp_path, allowed, RunOptions(model="claude-opus-4-6"))
    assert "'claude-opus-4-6' is not one of the allowed models ['claude-haiku-4-5']" in message


def test_a_dag_whose_own_model_is_not_allowed_fails_when_parsed_naming_it():
    with pytest.raises(PreflightError, match="'claude-haiku-4-5' is not one of the allowed models"):
        claude_batch_dag(
            config(allowed_models=("claude-sonnet-4-5",)), start_date=datetime(2026, 1, 1, tzinfo=UTC)
        )


@pytest.mark.parametrize("root", ["s3:/bucket/prefix", "s3:bucket", "memory://", "s3://", "relative/dir"])
def test_a_malformed_storage_root_fails_when_parsed_naming_it(root):
    with pytest.raises(StorageRootError) as raised:
        claude_batch_dag(config(storage_root=root), start_date=datetime(2026, 1, 1, tzinfo=UTC))
    assert "s3://bucket/optional/prefix" in str(raised.value)


@pytest.mark.parametrize("root", ["s3:/bucket/prefix", "memory://"])
def test_a_malformed_storage_root_is_refused_by_the_tasks_store(root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageRootError):
        ObjectStore.from_airflow(root, None)
    assert list(tmp_path.iterdir()) == []  # the one-slash form once wrote a local "s3:" directory


def test_a_query_source_with_a_missing_column_is_named(warehouse, tmp_path):
    source = SourceSpec(
        key_column="id", query="SELECT id, created_at FROM tickets", interval_column="created_at"
    )
    message = stage_fails(warehouse, tmp_path, config(source=source))
    assert "body" in message
