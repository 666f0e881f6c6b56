"""Submitting through the hook to the emulator over HTTP: exactly once, whatever happens."""

from __future__ import annotations

import orjson
import pytest
from claude_batch.hooks import ClaudeBatchHook
from claude_batch.storage import ObjectStore
from claude_batch.submission import (
    BatchSubmitter,
    InlineRequests,
    Limits,
    RecoveryPending,
    ShardRejected,
    StoredShard,
    SubmissionUndecidable,
)

from tests.batchcore.conftest import make_requests

STATE = "dag/run/state/submit.part-00000.json"


def _shard(
    store: ObjectStore, requests: list[dict], name: str = "dag/run/requests/part-00000.jsonl"
) -> StoredShard:
    store.write_bytes(name, b"".join(orjson.dumps(r) + b"\n" for r in requests))
    return StoredShard(store, name)


def test_submit_creates_once_and_reattaches(anthropic_conn, s3_store):
    shard = _shard(s3_store, make_requests(300))
    submitter = BatchSubmitter(ClaudeBatchHook(), s3_store, STATE)
    first = submitter.submit(shard)
    second = BatchSubmitter(ClaudeBatchHook(), s3_store, STATE).submit(shard)
    assert first.how == "created" and second.how == "reattached"
    assert first.batch_id == second.batch_id
    stats = anthropic_conn.stats()
    assert stats["batches_created"] == 1 and stats["requests_received"] == 300
    state = s3_store.read_json(STATE)
    assert (
        state["phase"] == "submitted"
        and state["batch_id"] == first.batch_id
        and state["request_count"] == 300
    )
    batch = ClaudeBatchHook().retrieve_batch(first.batch_id)
    assert batch.request_counts.processing == 300


def test_crash_between_paid_call_and_state_write_does_not_pay_twice(anthropic_conn, s3_store, monkeypatch):
    shard = _shard(s3_store, make_requests(120))
    # a sibling shard of the same size already recorded its batch: it must not be adopted
    sibling = BatchSubmitter(ClaudeBatchHook(), s3_store, "dag/run/state/submit.part-00001.json").submit(
        _shard(s3_store, make_requests(120, prefix="s"), "dag/run/requests/part-00001.jsonl")
    )
    submitter = BatchSubmitter(ClaudeBatchHook(), s3_store, STATE)
    real_write = submitter._write_state

    def crash_on_second_phase(state):
        if state.phase == "submitted":
            raise SystemExit("worker killed after the paid call")
        real_write(state)

    monkeypatch.setattr(submitter, "_write_state", crash_on_second_phase)
    with pytest.raises(SystemExit):
        submitter.submit(shard)
    assert s3_store.read_json(STATE)["phase"] == "intent"
    retried = BatchSubmitter(ClaudeBatchHook(), s3_store, STATE).submit(shard)
    assert retried.how == "recovered" and retried.batch_id != sibling.batch_id
    assert anthropic_conn.stats()["batches_created"] == 2  # the sibling's and ours, nothing more
    assert s3_store.read_json(STATE)["batch_id"] == retried.batch_id


def test_undecidable_recovery_refuses_to_guess(anthropic_conn, s3_store):
    shard = _shard(s3_store, make_requests(40))
    submitter = BatchSubmitter(ClaudeBatchHook(), s3_store, STATE)
    ours = submitter.submit(shard).batch_id
    state = s3_store.read_json(STATE)
    # another unclaimed batch of the same size and the same custom_ids appears after the intent
    # (another run sent the same requests), and the id was never recorded
    client = ClaudeBatchHook().conn
    twin = client.messages.batches.create(requests=make_requests(40, text="the same ids, other text")).id
    s3_store.write_json(STATE, {**state, "phase": "intent", "batch_id": None})
    anthropic_conn.advance(3600)  # both ended: their results are read, and both hold the shard's ids
    with pytest.raises(SubmissionUndecidable, match="Refusing to guess") as info:
        BatchSubmitter(ClaudeBatchHook(), s3_store, STATE).submit(shard)
    assert not isinstance(info.value, RecoveryPending)
    assert s3_store.uri(STATE) in str(info.value) and ours in str(info.value) and twin in str(info.value)
    assert anthropic_conn.stats()["batches_created"] == 2


def test_changed_input_cancels_the_stale_batch_before_resubmitting(anthropic_conn, s3_store):
    submitter = BatchSubmitter(ClaudeBatchHook(), s3_store, STATE)
    old = submitter.submit(_shard(s3_store, make_requests(10)))
    new = submitter.submit(_shard(s3_store, make_requests(11)))
    assert new.how == "created" and new.batch_id != old.batch_id
    stale = ClaudeBatchHook().retrieve_batch(old.batch_id)
    assert stale.processing_status in ("canceling", "ended") and stale.cancel_initiated_at is not None
    assert s3_store.read_json(STATE)["superseded_batch_ids"] == [old.batch_id]


def test_over_limit_input_is_refused_before_any_call(anthropic_conn, s3_store):
    submitter = BatchSubmitter(ClaudeBatchHook(), s3_store, STATE, limits=Limits(max_requests=5))
    with pytest.raises(ShardRejected, match="line 6: more than 5 requests"):
        submitter.submit(InlineRequests(make_requests(6)))
    bad = make_requests(3)
    bad[2]["custom_id"] = "bad id!"
    with pytest.raises(ShardRejected, match="line 3: custom_id 'bad id!'"):
        BatchSubmitter(ClaudeBatchHook(), s3_store, STATE).submit(_shard(s3_store, bad))
    stats = anthropic_conn.stats()
    assert stats["batches_created"] == 0 and stats["http_requests"].get("create", 0) == 0
    assert not s3_store.exists(STATE)
