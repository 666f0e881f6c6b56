"""The load's ledger state machine, table-driven: every from-state x outcome, on each warehouse.

The expected moves are written out here from docs/architecture.md (*Ledger states*), not derived
from the code: the SQL the load runs and :func:`claude_batch.warehouse.ledger.outcome_status`
(the same rules in Python) must both agree with them.
"""

from __future__ import annotations

import datetime as dt
import itertools

import pyarrow as pa
import pytest
from claude_batch.validation import STATUSES
from claude_batch.warehouse import LEDGER_STATUSES, Warehouse
from claude_batch.warehouse.ledger import VERDICTS, outcome_status

from tests.datapath.conftest import make_workload, query

RUN = "run-1"
LIMIT = 3
# (verdict, API error type): every kind of validated row a load meets.
OUTCOMES = [
    ("valid", None),
    ("invalid", None),
    ("errored", "invalid_request_error"),
    ("errored", "overloaded_error"),
    ("expired", None),
    ("canceled", None),
]
# (attempts, invalid answers) of the item before this answer: a first answer, one after an
# invalid answer, and the last attempt the limit allows.
HISTORIES = {"first": (0, 0), "after_invalid": (1, 1), "last_attempt": (LIMIT - 1, 0)}
# What an open item of the loading run becomes: outcome -> history -> next state.
EXPECTED = {
    ("valid", None): {"first": "succeeded", "after_invalid": "succeeded", "last_attempt": "succeeded"},
    ("invalid", None): {"first": "invalid", "after_invalid": "dead", "last_attempt": "dead"},
    ("errored", "invalid_request_error"): {"first": "dead", "after_invalid": "dead", "last_attempt": "dead"},
    ("errored", "overloaded_error"): {"first": "retry", "after_invalid": "retry", "last_attempt": "dead"},
    ("expired", None): {"first": "retry", "after_invalid": "retry", "last_attempt": "dead"},
    ("canceled", None): {"first": "retry", "after_invalid": "retry", "last_attempt": "dead"},
}
OPEN = ("pending", "submitted")
# Every from-state, held by the loading run, plus open items another run holds.
FROM_STATES = [(status, RUN) for status in LEDGER_STATUSES] + [(status, "run-other") for status in OPEN]
CASES = list(itertools.product(FROM_STATES, OUTCOMES, HISTORIES))


def case_key(number: int) -> str:
    return f"k{number:04d}"


def test_the_verdicts_are_validations_statuses():
    assert VERDICTS == STATUSES


@pytest.mark.parametrize(("outcome", "history"), itertools.product(OUTCOMES, HISTORIES))
def test_the_rules_in_python_match_the_table(outcome, history):
    attempts, invalid_answers = HISTORIES[history]
    assert outcome_status(*outcome, attempts, invalid_answers, LIMIT) == EXPECTED[outcome][history]


def test_every_from_state_and_outcome_moves_as_the_table_says(warehouse_conn):
    workload = make_workload()
    warehouse = Warehouse(warehouse_conn, attempt_limit=LIMIT)
    warehouse.ensure_tables(workload)
    d = warehouse.dialect
    now = dt.datetime(2026, 1, 1)
    ledger_rows, outcome_rows = [], []
    for number, ((status, run_id), (verdict, error_type), history) in enumerate(CASES):
        attempts, invalid_answers = HISTORIES[history]
        key = case_key(number)
        ledger_rows.append(
            {"workload": workload.name, "record_key": key, "prompt_version": workload.prompt_version,
             "custom_id": key, "status": status, "attempts": attempts, "invalid_answers": invalid_answers,
             "last_error": "before", "batch_id": "msgbatch_old", "run_id": run_id, "updated_at": now}
        )  # fmt: skip
        outcome_rows.append(
            {"record_key": key, "status": verdict, "reason": None if verdict == "valid" else f"{verdict}!",
             "error_type": error_type, "batch_id": "msgbatch_new"}
        )  # fmt: skip
    with d.transaction(warehouse.conn) as cursor:
        d.load_arrow(cursor, warehouse.ledger_table, pa.Table.from_pylist(ledger_rows))
    outcomes = pa.Table.from_pylist(
        outcome_rows,
        pa.schema(
            [(name, pa.string()) for name in ("record_key", "status", "reason", "error_type", "batch_id")]
        ),
    )
    with (
        d.transaction(warehouse.conn) as cursor,
        d.rows_relation(cursor, "cb_outcomes", outcomes) as relation,
    ):
        moved = warehouse._apply_outcomes(cursor, workload, relation, RUN)

    after = {
        row[0]: row[1:]
        for row in query(
            warehouse.conn,
            "SELECT record_key, status, attempts, invalid_answers, last_error, batch_id "
            "FROM claude_batch_ledger",
        )
    }
    expected_moves = 0
    for number, ((status, run_id), (verdict, error_type), history) in enumerate(CASES):
        attempts, invalid_answers = HISTORIES[history]
        if status in OPEN and run_id == RUN:
            expected_moves += 1
            expected = (
                EXPECTED[(verdict, error_type)][history],
                attempts + 1,
                invalid_answers + (verdict == "invalid"),
                None if verdict == "valid" else f"{verdict}!",
                "msgbatch_new",
            )
        else:  # not this run's open item: the load leaves it as it was
            expected = (status, attempts, invalid_answers, "before", "msgbatch_old")
        assert after[case_key(number)] == expected, (status, run_id, verdict, error_type, history)
    assert moved in (expected_moves, -1)
