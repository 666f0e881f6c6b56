"""Injected HTTP faults on create, list/retrieve and results: nothing fails, nothing is paid twice."""

from __future__ import annotations

import asyncio

import pytest
from claude_batch.hooks import ClaudeBatchAuthError, ClaudeBatchHook, ClaudeBatchRateLimitError
from claude_batch.storage import ObjectStore
from claude_batch.submission import BatchSubmitter, InlineRequests
from claude_batch.triggers import ClaudeBatchTrigger

from tests.batchcore.conftest import make_requests

STATE = "dag/run/state/submit.part-00000.json"


def _fault(endpoint: str, status: int, rate: float = 1.0, times: int | None = None) -> dict:
    return {"endpoint": endpoint, "status": status, "rate": rate, "times": times, "retry_after": 0.05}


@pytest.mark.parametrize("status", [429, 500, 529])
def test_create_survives_faults_without_a_second_batch(anthropic_conn, tmp_path, status):
    anthropic_conn.configure(faults={"http": [_fault("create", status, times=2)]})
    result = BatchSubmitter(ClaudeBatchHook(), ObjectStore(str(tmp_path)), STATE).submit(
        InlineRequests(make_requests(50))
    )
    stats = anthropic_conn.stats()
    assert result.how == "created"
    assert stats["batches_created"] == 1 and stats["http_requests"]["create"] == 3
    assert sum(stats["faults_injected"].values()) == 2
    if status == 500:  # ambiguous: the API was asked whether the batch exists before resending
        assert stats["http_requests"]["list"] >= 2
    else:  # 429/529 mean "not created": resent without asking
        assert stats["http_requests"]["list"] == 0


def test_create_at_a_30_percent_fault_rate(anthropic_conn, tmp_path):
    # 10% each of 429, 500 and 529: about 27% of create calls fail
    anthropic_conn.configure(faults={"http": [_fault("create", s, rate=0.1) for s in (429, 500, 529)]})
    store = ObjectStore(str(tmp_path))
    ids = [
        BatchSubmitter(ClaudeBatchHook(), store, f"dag/run/state/submit.part-{i:05d}.json")
        .submit(InlineRequests(make_requests(5 + i, prefix=f"s{i}_")))
        .batch_id
        for i in range(8)
    ]
    assert len(set(ids)) == 8
    assert anthropic_conn.stats()["batches_created"] == 8


def test_persistent_rate_limit_fails_with_a_clear_message(anthropic_conn, tmp_path):
    anthropic_conn.configure(faults={"http": [_fault("create", 429)]})
    hook = ClaudeBatchHook()
    with pytest.raises(ClaudeBatchRateLimitError, match="rate-limited or overloaded.*smaller Airflow pool"):
        hook.create_batch_from_body([b'{"requests":[]}'], 15, 0, recover=lambda: None, max_attempts=2)
    assert anthropic_conn.stats()["batches_created"] == 0


def test_wrong_key_is_explained_without_leaking_it(anthropic_conn, monkeypatch, tmp_path):
    import json

    secret = "sk-ant-wrong-secret-key-987654321"
    monkeypatch.setenv(
        "AIRFLOW_CONN_ANTHROPIC_DEFAULT",
        json.dumps({"conn_type": "anthropic", "host": anthropic_conn.base_url, "password": secret}),
    )
    with pytest.raises(
        ClaudeBatchAuthError, match="password field of Airflow connection 'anthropic_default'"
    ) as info:
        BatchSubmitter(ClaudeBatchHook(), ObjectStore(str(tmp_path)), STATE).submit(
            InlineRequests(make_requests(2))
        )
    assert secret not in str(info.value)


def test_polling_and_results_survive_faults(anthropic_conn):
    client = ClaudeBatchHook().conn
    anthropic_conn.configure(processing_seconds=3600)
    ids = [client.messages.batches.create(requests=make_requests(3, prefix=f"p{i}_")).id for i in range(5)]
    anthropic_conn.configure(
        faults={
            "http": [
                _fault(ep, s, rate=0.3) for ep in ("list", "retrieve", "results") for s in (429, 500, 529)
            ]
        }
    )

    async def wait():
        trigger = ClaudeBatchTrigger(batch_ids=ids, min_poll_interval=0.1, max_poll_interval=0.2)
        task = asyncio.create_task(anext(trigger.run()))
        await asyncio.sleep(0.5)
        anthropic_conn.advance(3 * 3600)
        return await asyncio.wait_for(task, 30)

    event = asyncio.run(wait())
    assert event.payload["status"] == "success"
    lines = [line for batch_id in ids for line in client.messages.batches.results(batch_id)]
    assert len(lines) == 15
    stats = anthropic_conn.stats()
    assert sum(stats["faults_injected"].values()) > 0
