"""Poke mode, waiting in place, and the Claude Console link, against the emulator."""

from __future__ import annotations

from claude_batch.hooks import ClaudeBatchHook
from claude_batch.operators import ClaudeBatchOperator, ClaudeConsoleBatchLink
from claude_batch.sensors import ClaudeBatchSensor

from tests.batchcore.conftest import make_requests

HOUR = 3600.0


def test_poke_mode_learns_many_batches_from_one_list_call(anthropic_conn):
    anthropic_conn.configure(processing_seconds=HOUR)
    client = ClaudeBatchHook().conn
    ids = [client.messages.batches.create(requests=make_requests(2, prefix=f"k{i}_")).id for i in range(4)]
    sensor = ClaudeBatchSensor(task_id="wait", batch_ids=ids, deferrable=False)
    before = anthropic_conn.stats()["http_requests"]
    assert sensor.poke({}) is False
    after = anthropic_conn.stats()["http_requests"]
    assert after["list"] - before["list"] == 1 and after["retrieve"] == before["retrieve"]
    anthropic_conn.advance(3 * HOUR)
    done = sensor.poke({})
    assert done.is_done and done.xcom_value["request_counts"]["succeeded"] == 8


def test_operator_waits_in_place_and_stores_the_console_link(anthropic_conn, tmp_path):
    anthropic_conn.configure(processing_seconds=30.0)  # half a wall second at time scale 60

    class _TaskInstance:
        dag_id, task_id, map_index = "dag", "submit", -1

        def __init__(self):
            self.pushed = {}

        def xcom_push(self, key, value):
            self.pushed[key] = value

    ti = _TaskInstance()
    operator = ClaudeBatchOperator(
        task_id="submit", requests=make_requests(3), storage_root=str(tmp_path), wait="poll", min_poll_interval=0.2
    )
    summary = operator.execute({"ti": ti, "run_id": "manual__1"})
    assert summary["request_counts"]["succeeded"] == 3
    batch_id = ti.pushed["batch_id"]
    assert ti.pushed[ClaudeConsoleBatchLink().xcom_key].endswith(f"/batches/{batch_id}")
    assert anthropic_conn.stats()["batches_created"] == 1
