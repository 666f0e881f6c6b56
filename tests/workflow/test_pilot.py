"""The pilot done right: split off at the gate, sent and judged like a round, its answers kept.

The plain steps run on an in-memory DuckDB and a local store (fast); two dag.test() runs of the
invoice DAG ask a person to decide: a reviewer thread answers the ``pilot_approval`` task the
way the HITL REST API does (``PATCH .../taskInstances/{task_id}/-1/hitlDetails``), once with
Approve (the full run goes on, the pilot's items are not sent again) and once with Reject (the
run stops and gives its other items back).
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any

import duckdb
import pytest
from claude_batch.pilot import judge_pilot, pilot_layout, read_pilot, with_pilot
from claude_batch.pilot_approval import PilotApprovalOperator
from claude_batch.pipeline import (
    PilotFailed,
    PipelineConfig,
    RunOptions,
    run_gate,
    run_load,
    run_pilot_decide,
    run_pilot_load,
    run_pilot_shards,
)
from claude_batch.recovery import recover_stranded
from claude_batch.staging import StagingLimits, read_manifest, read_shard_keys, stage_requests
from claude_batch.storage import ObjectStore, RunLayout
from claude_batch.validation import validate_part
from claude_batch.warehouse import RECORD_KEY_COLUMN, SourceSpec, Warehouse

from tests.datapath.conftest import INTERVAL, make_workload, ticket_rows
from tests.datapath.helpers import errored, succeeded, write_results_part
from tests.services import create_tickets
from tests.workflow.conftest import query, task_states
from tests.workflow.test_runs import INVOICE_RUN

GOOD = '{"category": "billing", "total_amount": 12, "summary": "charged twice"}'
LOG = logging.getLogger("tests.pilot")
RUN_ID = "manual__2026-01-02T00:00:00+00:00"


# --- the plain steps ------------------------------------------------------------------------


@pytest.fixture
def staged(tmp_path):
    """25 tickets staged in shards of 10 (10, 10, 5) on a local store, over an in-memory DuckDB."""
    workload = make_workload()
    conn = duckdb.connect()
    create_tickets(conn, list(ticket_rows(25)))
    warehouse = Warehouse(conn)
    warehouse.ensure_tables(workload)
    config = PipelineConfig(
        workload=workload,
        source=SourceSpec(table="tickets", key_column="id", interval_column="created_at"),
        staging_limits=StagingLimits(max_requests_per_shard=10),
    )
    layout = RunLayout(ObjectStore(str(tmp_path / "store")), "invoices_dag", RUN_ID)
    rows = warehouse.extract(workload, config.source, RUN_ID, INTERVAL)
    stage_requests(
        rows, workload, layout, key_field=RECORD_KEY_COLUMN, cache_setting="off", limits=config.staging_limits
    )
    yield config, warehouse, layout
    conn.close()


def keys_of(layout: RunLayout, manifest) -> list[str]:
    return [
        key
        for shard in manifest.shards
        for key in read_shard_keys(layout, shard).column("record_key").to_pylist()
    ]


def gate(config, warehouse, layout, **options) -> list[str]:
    return run_gate(config, warehouse, layout, RunOptions(**options), None, None, LOG)


def answer(layout: RunLayout, manifest, outcome_for) -> None:
    """What collect and validate leave for each shard: results, then validated parts."""
    for shard in manifest.shards:
        write_results_part(layout, manifest, shard.part, outcome_for)
        validate_part(make_workload(), layout, shard.part)


def ledger(warehouse: Warehouse) -> list[tuple]:
    return warehouse.conn.execute(
        "SELECT status, run_id IS NULL, count(*) FROM claude_batch_ledger GROUP BY ALL ORDER BY ALL"
    ).fetchall()


def test_the_gate_splits_the_pilot_off_once_and_round_one_keeps_the_rest(staged):
    config, warehouse, layout = staged
    staged_keys = keys_of(layout, read_manifest(layout))
    shards = gate(config, warehouse, layout, pilot_size=12)
    pilot = read_pilot(layout)
    rest = read_manifest(layout)
    # The first 12 requests, in shards within the staging limits; round 1 keeps the other 13 and
    # still counts all 25 as extracted (the run accounts for the pilot's items too).
    assert [shard.count for shard in pilot.shards] == [10, 2] and pilot.staged_requests == 12
    assert rest.staged_requests == 13 and rest.extracted_rows == 25
    assert (
        keys_of(pilot_layout(layout), pilot) == staged_keys[:12] and keys_of(layout, rest) == staged_keys[12:]
    )
    assert shards == [f"{layout.prefix}/{shard.requests}" for shard in rest.shards]
    assert run_pilot_shards(config, layout, RunOptions(pilot_size=12)) == [
        f"{layout.prefix}/pilot/requests/part-00000.jsonl",
        f"{layout.prefix}/pilot/requests/part-00001.jsonl",
    ]
    assert rest.estimate["cost_usd_expected"] == pytest.approx(
        pilot.estimate["cost_usd_expected"] * 13 / 12, rel=0.2
    )
    whole = with_pilot(layout, rest)
    assert (whole.staged_requests, whole.extracted_rows, len(whole.shards)) == (25, 25, 4)

    # A retried gate takes no second pilot, and every item stays claimed by the run.
    assert gate(config, warehouse, layout, pilot_size=12) == shards
    assert read_pilot(layout) == pilot and read_manifest(layout) == rest
    assert ledger(warehouse) == [("pending", False, 25)]


def test_a_gate_that_died_midway_through_the_split_finishes_it(staged):
    config, warehouse, layout = staged
    before = read_manifest(layout).to_dict()
    gate(config, warehouse, layout, pilot_size=4)
    after = read_manifest(layout)
    layout.store.write_json(layout.manifest, before)  # round 1's manifest as it was before the split
    shards = gate(config, warehouse, layout, pilot_size=4)
    again = read_manifest(layout)
    assert again.staged_requests == after.staged_requests == 21 and again.extracted_rows == 25
    assert not set(keys_of(layout, again)) & set(keys_of(pilot_layout(layout), read_pilot(layout)))
    assert len(shards) == 3 and read_pilot(layout).staged_requests == 4


def test_a_pilot_as_large_as_the_run_is_no_pilot(staged):
    config, warehouse, layout = staged
    assert len(gate(config, warehouse, layout, pilot_size=25)) == 3
    assert read_pilot(layout) is None and read_manifest(layout).staged_requests == 25


def test_the_pilots_answers_are_loaded_once_and_the_run_accounts_for_them(staged):
    config, warehouse, layout = staged
    options = RunOptions(pilot_size=5)
    gate(config, warehouse, layout, pilot_size=5)
    pilot_at = pilot_layout(layout)
    answer(pilot_at, read_pilot(layout), lambda key, custom_id: succeeded(custom_id, GOOD))
    pilot_loaded = run_pilot_load(config, warehouse, pilot_at, options)
    assert pilot_loaded["rounds"] == [{"round": 0, "pilot": True, "sent": 5, "by_status": {"valid": 5}}]
    decision = run_pilot_decide(config, warehouse, layout, options, LOG)
    assert (decision["valid"], decision["judged"], decision["pass_rate"], decision["approval"]) == (
        5,
        5,
        1.0,
        False,
    )
    assert decision["rest_requests"] == 20
    answer(layout, read_manifest(layout), lambda key, custom_id: succeeded(custom_id, GOOD))
    loaded = run_load(config, warehouse, layout, options, pilot_loaded)
    # Every item answered once; the run's totals and history include the pilot's.
    assert loaded["ledger"] == {"succeeded": 25} and loaded["extracted"] == 25
    assert loaded["load"]["rows"] == 25 and [r["round"] for r in loaded["rounds"]] == [0, 1]
    assert warehouse.conn.execute(
        "SELECT attempts, count(*) FROM claude_batch_ledger GROUP BY 1"
    ).fetchall() == [(1, 25)]
    assert warehouse.conn.execute("SELECT staged, succeeded FROM claude_batch_runs").fetchall() == [(25, 25)]


def test_a_failing_pilot_gives_the_rest_back_and_a_reviewer_sees_why(staged):
    config, warehouse, layout = staged
    gate(config, warehouse, layout, pilot_size=6)
    pilot_at = pilot_layout(layout)
    bad = {
        0: errored,
        1: lambda custom_id: succeeded(custom_id, "I cannot say."),
        2: lambda c: succeeded(c, '{"x": 1}'),
    }

    def outcome(key: str, custom_id: str) -> dict[str, Any]:
        number = int(key[1:])
        return (
            bad[number](custom_id)
            if number in bad
            else succeeded(custom_id, GOOD.replace("charged", f"`{number}` *charged*"))
        )

    answer(pilot_at, read_pilot(layout), outcome)
    run_pilot_load(config, warehouse, pilot_at, RunOptions(pilot_size=6))
    verdict = judge_pilot(pilot_at, read_pilot(layout))
    assert (verdict.valid, verdict.judged, verdict.failures) == (
        3,
        6,
        {"api_error": 1, "invalid_json": 1, "schema_mismatch": 1},
    )
    # Failures first, then valid answers: up to five, each with its verdict.
    assert [(s["status"], s["reason_code"]) for s in verdict.samples] == [
        ("errored", "api_error"), ("invalid", "invalid_json"), ("invalid", "schema_mismatch"),
        ("valid", None), ("valid", None),
    ]  # fmt: skip

    # With approval asked for, the threshold does not stop the run: a person decides.
    asked = run_pilot_decide(config, warehouse, layout, RunOptions(pilot_size=6, pilot_approval=True), LOG)
    assert asked["approval"] is True and ("retry", True, 19) not in ledger(warehouse)
    assert asked["subject"].startswith(
        "invoices: the pilot passed 50% (3 of 6). Send the other 19 requests (estimated $"
    )
    body = asked["body"]
    assert "**Validation pass rate: 50%** (3 of 6 valid); it is under the threshold 80%." in body
    assert (
        "- `t000000` **errored (api_error)**:" in body
        and "- `t000002` **invalid (schema_mismatch)**:" in body
    )
    assert "- `t000003` **valid**: `{" in body and "'3' *charged*" in body  # answers stay in code spans
    assert (
        f"estimated cost **${asked['rest_estimated_cost_usd']:,.4f}**" in body
        and "19 more request(s)" in body
    )

    # Without it, 50% is under the threshold: the run stops and its other 19 items go back.
    with pytest.raises(
        PilotFailed, match=r"pass rate is 50% \(3 of 6\), under the threshold 80%; nothing else"
    ):
        run_pilot_decide(config, warehouse, layout, RunOptions(pilot_size=6), LOG)
    counts = dict(((status, free), n) for status, free, n in ledger(warehouse))
    assert counts[("retry", True)] == 19 and counts[("succeeded", False)] == 3  # the pilot's answers are kept
    assert sum(counts.values()) == 25


def test_a_run_over_after_its_split_strands_nothing(staged):
    """Recovery knows the pilot (round 0): a pilot never submitted is released with the rest."""
    config, warehouse, layout = staged
    gate(config, warehouse, layout, pilot_size=5)
    warehouse.conn.execute("UPDATE claude_batch_ledger SET dag_id = 'invoices_dag'")
    report = recover_stranded(config.workload, warehouse, layout.store, None, lambda dag, run: "failed",
                              current_run_id="someone_else")  # fmt: skip
    assert report.released == {RUN_ID: 25}
    assert ledger(warehouse) == [("retry", True, 25)]


class FakeTI:
    def __init__(self, decision: dict[str, Any] | None) -> None:
        self.decision = decision

    def xcom_pull(self, task_ids: str) -> Any:
        assert task_ids == "g.pilot_decide"
        return self.decision


def approval_operator(released: list[str]):
    return PilotApprovalOperator(
        task_id="pilot_approval",
        decision_task_id="g.pilot_decide",
        on_reject=lambda context, reason: released.append(reason) or 19,
    )


def event(option: str, **extra: Any) -> dict[str, Any]:
    return {"chosen_options": [option], "params_input": {}, "responded_at": datetime.now(UTC),
            "responded_by_user": {"id": "7", "name": "Ann"}, **extra}  # fmt: skip


def test_the_approval_skips_unless_asked_and_only_approve_lets_the_run_go_on():
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    released: list[str] = []
    operator = approval_operator(released)
    with pytest.raises(AirflowSkipException, match="the pilot's pass rate decided"):
        operator.execute({"ti": FakeTI({"approval": False})})
    assert operator.execute_complete({}, event("Approve"))["chosen_options"] == ["Approve"] and released == []
    with pytest.raises(AirflowFailException, match="rejected by Ann; nothing else was submitted. 19 item"):
        operator.execute_complete({}, event("Reject"))
    assert released == ["The pilot was rejected by Ann; nothing else was submitted."]
    with pytest.raises(AirflowFailException, match="not answered in time"):
        operator.execute_complete({}, event("Reject", timedout=True, responded_by_user=None))


# --- a person decides: two dag.test() runs ------------------------------------------------------


class Reviewer(threading.Thread):
    """Answers the ``pilot_approval`` task once it waits for input, as the HITL REST API does.

    It calls the API's own PATCH route function (``update_hitl_detail``) on the metadata
    database dag.test() uses, which records the answer and resumes the task.
    """

    def __init__(self, task_id: str, option: str, timeout: float = 180.0) -> None:
        super().__init__(daemon=True)
        self.task_id = task_id
        self.option = option
        self.timeout = timeout
        self.detail: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.stop = threading.Event()  # set when the run is over: never answer another test's run
        # Imported here, on the test's thread: importing while dag.test() imports on its own
        # thread can deadlock on the module import locks.
        import airflow.api_fastapi.core_api.routes.public.hitl  # noqa: F401
        import airflow.models  # noqa: F401

        airflow.models.import_all_models()

    def run(self) -> None:
        from airflow.api_fastapi.core_api.datamodels.hitl import UpdateHITLDetailPayload
        from airflow.api_fastapi.core_api.routes.public.hitl import update_hitl_detail
        from airflow.models.hitl import HITLDetail
        from airflow.models.taskinstance import TaskInstance
        from airflow.utils.session import create_session
        from airflow.utils.state import TaskInstanceState
        from sqlalchemy import select

        class User:
            def get_id(self) -> str:
                return "7"

            def get_name(self) -> str:
                return "Ann"

        deadline = time.monotonic() + self.timeout
        try:
            while time.monotonic() < deadline and not self.stop.is_set():
                with create_session() as session:
                    ti = session.scalar(
                        select(TaskInstance).where(
                            TaskInstance.task_id == self.task_id,
                            TaskInstance.state == TaskInstanceState.AWAITING_INPUT,
                        )
                    )
                    if ti is not None:
                        detail = session.scalar(select(HITLDetail).where(HITLDetail.ti_id == ti.id))
                        self.detail = {
                            "subject": detail.subject,
                            "body": detail.body,
                            "options": list(detail.options),
                        }
                        update_hitl_detail(
                            dag_id=ti.dag_id,
                            dag_run_id=ti.run_id,
                            task_id=ti.task_id,
                            update_hitl_detail_payload=UpdateHITLDetailPayload(chosen_options=[self.option]),
                            user=User(),
                            session=session,
                            map_index=-1,
                        )
                        return
                time.sleep(0.5)
            raise TimeoutError(f"{self.task_id} never waited for input while the run went on")
        except BaseException as exc:  # reported by the test; dag.test() then ends on its own
            self.error = exc


def reviewed_run(dag, option: str, **conf: Any):
    reviewer = Reviewer("pilot_approval", option)
    reviewer.start()
    try:
        run = dag.test(logical_date=INVOICE_RUN, run_conf={"pilot_size": 2, "pilot_approval": True, **conf})
    finally:
        reviewer.stop.set()
        reviewer.join(timeout=5)
    assert reviewer.error is None, reviewer.error
    assert reviewer.detail is not None
    return run, reviewer.detail


@pytest.mark.airflow
def test_an_approved_pilot_lets_the_full_run_go_on(workflow_dags, anthropic_conn, warehouse):
    dag = workflow_dags["invoice_approval"]
    run, detail = reviewed_run(dag, "Approve")
    states = task_states(run)
    assert run.state == "success", states
    assert states["pilot_approval"] == "success" and states["submit"] == "success", states
    # What the reviewer saw: the pass rate, the sample answers with their verdicts, the estimate.
    assert detail["options"] == ["Approve", "Reject"]
    assert detail["subject"].startswith(
        "invoice_approval: the pilot passed 100% (2 of 2). Send the other 3 requests"
    )
    body = detail["body"]
    assert "**Validation pass rate: 100%** (2 of 2 valid); it meets the threshold 80%." in body
    assert "- `INV-001` **valid**: `{" in body and "- `INV-002` **valid**: `{" in body
    assert (
        "**The full run if approved:** 3 more request(s) in 1 batch(es), model(s) claude-sonnet-4-6" in body
    )
    assert "estimated cost **$" in body and "at the pilot's measured cost per request" in body
    stats = anthropic_conn.stats()
    assert (
        stats["batches_created"] == 2 and stats["requests_received"] == 2 + 3
    )  # the pilot's items not sent again
    assert query(warehouse, "SELECT count(*) FROM invoice_approval_results")[0][0] == 5
    assert query(warehouse, "SELECT status, attempts, count(*) FROM claude_batch_ledger GROUP BY ALL") == [
        ("succeeded", 1, 5)
    ]


@pytest.mark.airflow
def test_a_rejected_pilot_stops_the_run_and_gives_its_items_back(
    workflow_dags, anthropic_conn, warehouse, capfd
):
    # Every answer errors: 0%, under the threshold, but with approval asked for a person decides.
    anthropic_conn.configure(faults={"batch": {"errored_rate": 1.0, "error_types": ["overloaded_error"]}})
    dag = workflow_dags["invoice_approval"]
    run, detail = reviewed_run(dag, "Reject")
    states = task_states(run)
    assert run.state == "failed", states
    assert states["pilot_decide"] == "success" and states["pilot_approval"] == "failed", states
    assert states["submit"] == "upstream_failed" and states["report"] == "upstream_failed", states
    assert "**Validation pass rate: 0%** (0 of 2 valid); it is under the threshold 80%." in detail["body"]
    assert "**errored (overloaded_error)**" in detail["body"]
    assert (
        "The pilot was rejected by Ann; nothing else was submitted. 3 item(s) were given back"
        in capfd.readouterr().out
    )
    stats = anthropic_conn.stats()
    assert stats["batches_created"] == 1 and stats["requests_received"] == 2
    released = query(
        warehouse,
        "SELECT status, run_id IS NULL, count(*) FROM claude_batch_ledger GROUP BY ALL ORDER BY ALL",
    )
    assert released == [("retry", False, 2), ("retry", True, 3)]
