"""Params and workload settings cannot inject SQL: hostile values are refused or only ever bound.

Three layers: the DAG's Params (validated by Airflow before a run starts), the pipeline's own
checks (model, window), and the warehouse (identifiers validated and quoted, values bound).
Row content is covered by the bad-input corpus (SQL-looking text and keys end up as data).
"""

from __future__ import annotations

import datetime as dt

import duckdb
import pytest
from claude_batch.pipeline import (
    PipelineConfig,
    RunOptions,
    effective_workload,
    run_interval,
    run_params,
    run_stage,
)
from claude_batch.storage import ObjectStore, RunLayout
from claude_batch.warehouse import SourceSpec, Warehouse, WarehouseError, validate_identifier
from claude_batch.workloads import Rule, Workload, WorkloadError
from pydantic import BaseModel, create_model

from tests.reliability.harness import SOURCE, WORKLOAD

DROP = "'; DROP TABLE tickets; --"
HOSTILE_IDENTIFIERS = [
    "tickets; DROP TABLE tickets",
    'tickets" ; DROP TABLE tickets; --',
    "tickets--",
    "tickets/* */",
    "a.b.c",
    "1tickets",
    "",
    "tick ets",
    "tick\x00ets",
    "tickets\n",  # a trailing newline: patterns ending in $ matched it with re.match
    "tіckets",  # a Cyrillic i: looks the same, is not an identifier here
    "x" * 64,
]
CONFIG = PipelineConfig(
    workload=WORKLOAD, source=SOURCE, allowed_models=("claude-haiku-4-5", "claude-sonnet-4-5")
)


@pytest.fixture
def warehouse():
    conn = duckdb.connect()
    conn.execute("CREATE TABLE tickets (id VARCHAR, body VARCHAR, created_at TIMESTAMP)")
    conn.execute("INSERT INTO tickets VALUES ('t1', 'charged twice', TIMESTAMP '2026-03-01 10:00:00')")
    house = Warehouse(conn)
    house.ensure_tables(WORKLOAD)
    yield house
    conn.close()


def tables(warehouse: Warehouse) -> set[str]:
    return {
        name
        for (name,) in warehouse.conn.execute("SELECT table_name FROM information_schema.tables").fetchall()
    }


@pytest.mark.parametrize(
    "conf",
    [
        {"model": f"claude-haiku-4-5{DROP}"},
        {"model": "claude-opus-4-5"},  # a real model, but not one this DAG allows
        {"window_start": f"2026-01-01{DROP}", "window_end": "2026-01-02"},
        {"window_end": "2026-01-02 OR 1=1"},
        {"row_limit": "5; DROP TABLE tickets"},
        {"row_limit": -1},
        {"budget_usd": "0 OR 1=1"},
        {"dry_run": "false; DROP TABLE tickets"},
    ],
)
def test_params_refuse_hostile_values_before_a_run_starts(conf):
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    params = ParamsDict(run_params(CONFIG))
    with pytest.raises(ParamValidationError):
        params.update(conf)
        params.validate()


def test_a_hostile_window_that_got_past_the_params_is_refused_or_bound(warehouse):
    # Refused: the window is parsed as dates before anything else.
    with pytest.raises(ValueError):
        run_interval(RunOptions(window_start=f"2026-03-01{DROP}", window_end="2026-03-02"), None, None)
    # Bound: even a raw string interval reaches SQL only as a parameter, never as text.
    hostile = (f"2026-03-01{DROP}", "2026-03-02")
    sql, params = warehouse.extract_query(WORKLOAD, SOURCE, "run-1", hostile)
    assert "DROP" not in sql and hostile[0] in params
    with pytest.raises(duckdb.Error):  # DuckDB cannot read it as a timestamp: an error, not a statement
        list(warehouse.extract(WORKLOAD, SOURCE, "run-1", hostile))
    assert {"tickets", "claude_batch_ledger", WORKLOAD.results_table} <= tables(warehouse)
    assert warehouse.conn.execute("SELECT COUNT(*) FROM tickets").fetchone()[0] == 1


def test_a_hostile_model_is_refused_before_anything_is_extracted_or_staged(warehouse, tmp_path):
    options = RunOptions(model=f"claude-haiku-4-5{DROP}")
    with pytest.raises(ValueError, match="is not one of the allowed models"):
        effective_workload(CONFIG, options)
    layout = RunLayout(ObjectStore(str(tmp_path)), "dag", "run-1")
    with pytest.raises(ValueError, match="is not one of the allowed models"):
        run_stage(CONFIG, warehouse, layout, options, None)
    assert not layout.store.exists(layout.manifest)


@pytest.mark.parametrize("name", HOSTILE_IDENTIFIERS)
def test_source_and_warehouse_identifiers_are_validated(name):
    with pytest.raises(WarehouseError):
        validate_identifier(name)
    for spec in (
        {"table": name, "key_column": "id"},
        {"table": "tickets", "key_column": name},
        {"table": "tickets", "key_column": "id", "interval_column": name},
        {"table": "tickets", "key_column": "id", "columns": ("id", name)},
    ):
        with pytest.raises(WarehouseError):
            SourceSpec(**spec)
    for setting in ("ledger_table", "runs_table", "schema"):
        if setting == "schema" and name == "":
            continue  # no schema: the connection's default
        with pytest.raises(WarehouseError):
            Warehouse(duckdb.connect(), **{setting: name})


@pytest.mark.parametrize("name", [n for n in HOSTILE_IDENTIFIERS if n != ""])
def test_workload_names_fields_and_rules_are_validated(name):
    base = {
        "system_prompt": "Classify.",
        "user_template": "Ticket {id}: {body}",
        "model": "claude-haiku-4-5",
        "max_tokens": 10,
        "output_schema": WORKLOAD.output_schema,
    }
    with pytest.raises(WorkloadError):
        Workload(name=name, **base)  # the results table is <name>_results
    with pytest.raises(WorkloadError):
        Workload(name="w", **{**base, "user_template": "Ticket {" + name + "}"})
    with pytest.raises(WorkloadError):
        Workload(name="w", rules=(Rule(name, lambda out: True),), **base)
    hostile_schema = create_model("Hostile", __base__=BaseModel, **{"category": (str, ...)})
    hostile_schema.model_fields[name] = hostile_schema.model_fields["category"]
    with pytest.raises(WorkloadError):
        Workload(name="w", **{**base, "output_schema": hostile_schema}).output_columns  # noqa: B018


def test_valid_identifiers_are_quoted_not_just_filtered(tmp_path):
    """SQL keywords are legal names: quoting, not a blocklist, keeps them identifiers."""
    conn = duckdb.connect()
    conn.execute('CREATE TABLE "order" ("select" VARCHAR, "from" VARCHAR, "where" TIMESTAMP)')
    conn.execute("INSERT INTO \"order\" VALUES ('k1', 'charged twice', TIMESTAMP '2026-03-01 10:00:00')")
    workload = Workload(
        name="w",
        system_prompt="Classify.",
        user_template="Ticket {select}: {from}",
        model="claude-haiku-4-5",
        max_tokens=10,
        output_schema=WORKLOAD.output_schema,
    )
    house = Warehouse(conn)
    house.ensure_tables(workload)
    source = SourceSpec(table="order", key_column="select", interval_column="where")
    rows = list(house.extract(workload, source, "run-1", (dt.datetime(2026, 3, 1), dt.datetime(2026, 3, 2))))
    assert [row["select"] for row in rows] == ["k1"]
