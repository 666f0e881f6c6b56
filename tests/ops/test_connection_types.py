"""Warehouse connections through the providers' hooks: DuckDB (``duckdb``, ``duckdb_aws``) and PostgreSQL.

The connection a user makes in the Airflow UI's form or with ``airflow connections add`` is the one
a task opens: the README's command creates ``claude_batch_warehouse`` with the DuckDB provider's
type in the metadata database, and a project DAG runs on it; the ops CLI reads it from there too.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import duckdb
import pytest
from claude_batch.connections import open_warehouse
from claude_batch.warehouse import DuckDBDialect, PostgresDialect, WarehouseError

from tests.conftest import REPO
from tests.ops.conftest import cli_json, postgres_connection

END = datetime(2026, 11, 10)
INVOICE_RUN = (END - timedelta(hours=4)).replace(tzinfo=UTC)  # the 8 pm run: the five invoices


def airflow_cli(monkeypatch, *argv: str) -> None:
    """``airflow ARGV``, parsed and run by Airflow's own CLI in this process (no 10 s start-up)."""
    from airflow.cli import cli_parser

    monkeypatch.setenv("_AIRFLOW_PROCESS_CONTEXT", "server")  # as the command sets it; put back after
    args = cli_parser.get_parser().parse_args(list(argv))
    args.func(args)


@pytest.mark.airflow
def test_a_dag_runs_on_a_duckdb_connection_made_with_airflow_connections_add(
    airflow_db, anthropic_conn, aws_conn, s3_store, tmp_path, monkeypatch, capsys
):
    from airflow.dag_processing.dagbag import DagBag
    from claude_batch.demo import load_sample_data

    path = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(path)) as conn:
        load_sample_data(REPO).seed_warehouse(conn, end=END, tickets=12)
    monkeypatch.delenv(
        "AIRFLOW_CONN_CLAUDE_BATCH_WAREHOUSE", raising=False
    )  # only the metadata database has it
    monkeypatch.setenv("CLAUDE_BATCH_STORAGE_ROOT", s3_store.root)
    monkeypatch.setenv("CLAUDE_BATCH_MIN_POLL_SECONDS", "0.2")
    # The README's command, word for word but the path.
    airflow_cli(monkeypatch, "connections", "add", "claude_batch_warehouse", "--conn-type", "duckdb",
                "--conn-host", str(path))  # fmt: skip
    assert "Successfully added" in capsys.readouterr().out
    try:
        bag = DagBag(dag_folder=str(REPO / "dags" / "invoice_approval.py"))
        assert not bag.import_errors, bag.import_errors
        run = bag.dags["invoice_approval"].test(logical_date=INVOICE_RUN)
        assert run.state == "success", {ti.task_id: ti.state for ti in run.get_task_instances()}
        with duckdb.connect(str(path)) as conn:
            assert conn.execute("SELECT count(*) FROM invoice_approval_results").fetchone() == (5,)
        assert anthropic_conn.stats()["batches_created"] == 1
        # The ops CLI finds the same connection in the metadata database.
        (line,) = cli_json("runs", "--workload", "invoice_approval")
        assert (line["dag_id"], line["run_id"], line["succeeded"]) == ("invoice_approval", run.run_id, 5)
    finally:
        airflow_cli(monkeypatch, "connections", "delete", "claude_batch_warehouse")


def test_a_duckdb_connection_opens_through_the_providers_hook_with_its_extra(tmp_path, monkeypatch):
    from airflow.providers.duckdb.hooks.duckdb import DuckDBHook

    opened: list[str] = []
    original = DuckDBHook.get_conn

    def spy(self):
        opened.append(type(self).__name__)
        return original(self)

    monkeypatch.setattr(DuckDBHook, "get_conn", spy)
    path = tmp_path / "from-extra.duckdb"
    # The database named in the extra (the hook's precedence over the host); its settings apply.
    monkeypatch.setenv(
        "AIRFLOW_CONN_CB_DUCK",
        json.dumps({"conn_type": "duckdb", "host": str(tmp_path / "unused.duckdb"),
                    "extra": {"database": str(path), "threads": 1, "memory_limit": "300MB"}}),
    )  # fmt: skip
    with open_warehouse("cb_duck") as warehouse:
        assert isinstance(warehouse.dialect, DuckDBDialect)
        assert warehouse.conn.execute("SELECT current_setting('threads')").fetchone() == (1,)
        assert (tmp_path / "from-extra.duckdb.lock").exists()  # taken in turn, as every DuckDB warehouse
        warehouse.ensure_tables()
    assert opened == ["DuckDBHook"] and path.exists() and not (tmp_path / "unused.duckdb").exists()


def test_a_duckdb_connection_without_a_file_is_refused(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_CB_DUCK_MEMORY", json.dumps({"conn_type": "duckdb"}))
    with pytest.raises(
        WarehouseError, match="'cb_duck_memory' names no database file: set its Database path"
    ):
        with open_warehouse("cb_duck_memory"):
            pass


def test_a_duckdb_aws_connection_is_accepted(tmp_path, monkeypatch):
    """The Amazon provider's "DuckDB on AWS" type, the one DuckDB type the form offered before."""
    from airflow.providers.amazon.aws.hooks.duckdb import AwsDuckDBHook

    path = tmp_path / "aws.duckdb"
    extra = {"autoinstall_extensions": False, "credential_strategy": "none"}  # nothing downloaded here
    monkeypatch.setenv(
        "AIRFLOW_CONN_CB_DUCK_AWS", json.dumps({"conn_type": "duckdb_aws", "host": str(path), "extra": extra})
    )
    # Its hook loads DuckDB's httpfs and aws extensions; this machine has neither and may not download.
    with pytest.raises(WarehouseError, match=r"httpfs.*a plain duckdb connection needs neither"):
        with open_warehouse("cb_duck_aws"):
            pass
    # Where the extensions are installed (here: as if), the warehouse opens through that hook.
    monkeypatch.setattr(AwsDuckDBHook, "required_extensions", ())
    with open_warehouse("cb_duck_aws") as warehouse:
        assert isinstance(warehouse.dialect, DuckDBDialect)
        warehouse.ensure_tables()
    assert path.exists()


def test_a_postgres_connection_opens_through_the_postgres_hook(postgres_dsn, monkeypatch):
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    monkeypatch.setenv("AIRFLOW_CONN_CB_PG", json.dumps(postgres_connection(postgres_dsn)))
    with open_warehouse("cb_pg") as warehouse:
        assert isinstance(warehouse.dialect, PostgresDialect)
        assert type(warehouse.conn).__module__.startswith("psycopg2")  # COPY through copy_expert
        with warehouse.conn.cursor() as cur:
            # Every extra reaches libpq, as the provider documents (psycopg2 alone passed three).
            cur.execute("SELECT current_setting('application_name'), current_schema()")
            name, schema = cur.fetchone()
        assert name == "claude-batch-ops-test" and schema == postgres_dsn.rsplit("%3D", 1)[1]
    assert warehouse.conn.closed
    from claude_batch.connections import postgres_hook

    assert isinstance(postgres_hook("cb_pg"), PostgresHook)
