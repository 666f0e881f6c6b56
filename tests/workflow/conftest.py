"""Fixtures for the workflow tests: the repository's DAGs over a seeded DuckDB file, moto S3 and the
emulator."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest

from tests.conftest import REPO

# The seeded period is the three days before END; its last day holds the bad rows and the invoices.
END = datetime(2026, 11, 10)
LAST_DAY = END - timedelta(days=1)
TICKETS = 36


@pytest.fixture(scope="session")
def sample_data():
    from claude_batch.demo import load_sample_data

    return load_sample_data(REPO)


@pytest.fixture
def warehouse(tmp_path, monkeypatch, sample_data) -> Path:
    """A DuckDB warehouse file with the sample tables, as ``claude_batch_warehouse``."""
    path = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(path)) as conn:
        sample_data.seed_warehouse(conn, end=END, tickets=TICKETS)
    monkeypatch.setenv(
        "AIRFLOW_CONN_CLAUDE_BATCH_WAREHOUSE", json.dumps({"conn_type": "duckdb", "host": str(path)})
    )
    return path


@pytest.fixture
def workflow_dags(airflow_db, anthropic_conn, aws_conn, s3_store, warehouse, monkeypatch) -> dict[str, Any]:
    """The DAGs in dags/, parsed with the connections and storage root of this test."""
    monkeypatch.setenv("CLAUDE_BATCH_STORAGE_ROOT", s3_store.root)
    # The DAG files read the first poll interval at parse time; the emulator runs 60x fast.
    monkeypatch.setenv("CLAUDE_BATCH_MIN_POLL_SECONDS", "0.2")
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags


def query(path: Path, sql: str, *params: Any) -> list[tuple]:
    """Rows of ``sql`` on the warehouse file (a read-write connection: the tasks' may still be open)."""
    with duckdb.connect(str(path)) as conn:
        return conn.execute(sql, list(params)).fetchall()


def task_states(run) -> dict[str, str]:
    """{task_id (without the group): state} of a finished dag.test() run (mapped tasks: their last state)."""
    return {ti.task_id.split(".", 1)[-1]: ti.state for ti in run.get_task_instances()}
