"""Orphan recovery: after a crash between the paid create and the state write, a retry finds its
own batch by the custom_ids it holds, waits (retryably) while that cannot be told, and never
creates a second batch."""

from __future__ import annotations

import random
import threading
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from anthropic.types.messages import MessageBatch
from claude_batch.hooks import ClaudeBatchHook
from claude_batch.storage import ObjectStore
from claude_batch.submission import (
    BatchSubmitter,
    InlineRequests,
    RecoveryPending,
    StoredShard,
    SubmissionState,
    SubmissionUndecidable,
    custom_ids_digest,
    result_custom_ids,
    scan_requests,
)

from tests.batchcore.conftest import make_requests

STATE = "dag/run/state/submit.part-00000.json"


# --- a fake API: batches with the custom_ids they hold, results only once ended ---------------


class FakeApi:
    """The :class:`BatchApi` calls plus ``result_custom_ids``, counting what was read."""

    def __init__(self) -> None:
        self.batches: dict[str, MessageBatch] = {}
        self.ids: dict[str, Callable[[], Iterator[str]]] = {}
        self.created = 0
        self.lines_read: Counter[str] = Counter()
        self.crash_after_create = False
        self.cut_results: set[str] = set()

    def add(
        self, custom_ids: Callable[[], Iterator[str]] | list[str], count: int | None = None
    ) -> MessageBatch:
        if isinstance(custom_ids, list):
            ids = list(custom_ids)
            custom_ids, count = (lambda: iter(random.sample(ids, len(ids)))), len(ids)  # any order
        now = datetime.now(UTC) + timedelta(microseconds=len(self.batches))
        batch = MessageBatch(
            id=f"msgbatch_{len(self.batches):04d}",
            created_at=now,
            expires_at=now + timedelta(days=1),
            processing_status="in_progress",
            request_counts={"processing": count, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0},
            type="message_batch",
        )
        self.batches[batch.id] = batch
        self.ids[batch.id] = custom_ids
        return batch

    def end(self, *batch_ids: str) -> None:
        for batch_id in batch_ids:
            batch = self.batches[batch_id]
            total = batch.request_counts.processing
            self.batches[batch_id] = batch.model_copy(
                update={
                    "processing_status": "ended",
                    "request_counts": batch.request_counts.model_copy(
                        update={"processing": 0, "succeeded": total}
                    ),
                }
            )

    def create_batch_from_body(self, body, body_bytes, request_count, recover) -> MessageBatch:
        ids = [request["custom_id"] for request in orjson.loads(b"".join(body))["requests"]]
        batch = self.add(ids)
        self.created += 1
        if self.crash_after_create:
            raise SystemExit("worker killed after the paid call")
        return batch

    def batches_created_since(self, created_after: datetime) -> Iterator[MessageBatch]:
        for batch in sorted(self.batches.values(), key=lambda b: b.created_at, reverse=True):
            if batch.created_at >= created_after:
                yield batch

    def retrieve_batch(self, batch_id: str) -> MessageBatch:
        return self.batches[batch_id]

    def cancel_batch(self, batch_id: str) -> MessageBatch:
        return self.batches[batch_id]

    def result_custom_ids(self, batch_id: str) -> Iterator[str]:
        assert self.batches[batch_id].processing_status == "ended", (
            "results exist only once a batch has ended"
        )
        for number, custom_id in enumerate(self.ids[batch_id](), start=1):
            if batch_id in self.cut_results and number > 3:
                raise ConnectionResetError("the download was cut")
            self.lines_read[batch_id] += 1
            yield custom_id


def _ids(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(count)]


def _crashed_submit(api: FakeApi, store: ObjectStore, requests: list[dict]) -> str:
    """Submit with a worker that dies after the paid create; returns the orphaned batch's id."""
    api.crash_after_create = True
    with pytest.raises(SystemExit):
        BatchSubmitter(api, store, STATE).submit(InlineRequests(requests))
    api.crash_after_create = False
    assert store.read_json(STATE)["phase"] == "intent"
    return list(api.batches)[-1]


def test_the_intent_records_an_order_independent_digest_of_the_custom_ids(tmp_path):
    requests = make_requests(30)
    scan = scan_requests(InlineRequests(requests))
    shuffled = scan_requests(InlineRequests(list(reversed(requests))))
    assert scan.custom_ids_digest == shuffled.custom_ids_digest == custom_ids_digest(_ids("r", 30)[::-1])
    assert scan.fingerprint != shuffled.fingerprint  # the fingerprint is over the bytes, in order
    assert (
        scan_requests(InlineRequests(make_requests(30, prefix="s"))).custom_ids_digest
        != scan.custom_ids_digest
    )
    store = ObjectStore(str(tmp_path))
    BatchSubmitter(FakeApi(), store, STATE).submit(InlineRequests(requests))
    assert store.read_json(STATE)["custom_ids_digest"] == scan.custom_ids_digest
    # a state written before the field existed still loads
    old = {k: v for k, v in store.read_json(STATE).items() if k != "custom_ids_digest"}
    assert SubmissionState.from_json(old).custom_ids_digest is None


def test_a_single_unclaimed_candidate_is_taken_at_once(tmp_path):
    api, store = FakeApi(), ObjectStore(str(tmp_path))
    ours = _crashed_submit(api, store, make_requests(20))
    result = BatchSubmitter(api, store, STATE).submit(InlineRequests(make_requests(20)))
    assert (result.how, result.batch_id) == ("recovered", ours)
    assert api.created == 1 and not api.lines_read  # still in progress, and no results needed


def test_ended_candidates_of_the_same_size_are_told_apart_by_their_custom_ids(tmp_path):
    api, store = FakeApi(), ObjectStore(str(tmp_path))
    ours = _crashed_submit(api, store, make_requests(50))
    theirs = api.add(_ids("other", 50)).id  # another run's shard, listed first (newer)
    api.end(ours, theirs)
    result = BatchSubmitter(api, store, STATE).submit(InlineRequests(make_requests(50)))
    assert (result.how, result.batch_id) == ("recovered", ours)
    assert api.created == 1
    assert api.lines_read[theirs] == 1  # ruled out at its first custom_id
    assert api.lines_read[ours] == 50
    assert store.read_json(STATE)["batch_id"] == ours


def test_an_in_progress_candidate_makes_recovery_retryable_and_creates_nothing(tmp_path):
    api, store = FakeApi(), ObjectStore(str(tmp_path))
    ours = _crashed_submit(api, store, make_requests(40))
    theirs = api.add(_ids("other", 40)).id
    with pytest.raises(RecoveryPending, match=f"decidable when batches {theirs}, {ours} end") as info:
        BatchSubmitter(api, store, STATE).submit(InlineRequests(make_requests(40)))
    assert isinstance(info.value, SubmissionUndecidable) and set(info.value.batch_ids) == {ours, theirs}
    assert "Nothing was created" in str(info.value)
    api.end(theirs)  # theirs is ruled out; ours has not ended yet
    with pytest.raises(RecoveryPending, match=f"decidable when batch {ours} ends") as info:
        BatchSubmitter(api, store, STATE).submit(InlineRequests(make_requests(40)))
    assert info.value.batch_ids == [ours]
    assert api.created == 1 and store.read_json(STATE)["phase"] == "intent"
    api.end(ours)
    result = BatchSubmitter(api, store, STATE).submit(InlineRequests(make_requests(40)))
    assert (result.how, result.batch_id, api.created) == ("recovered", ours, 1)


def test_an_ended_exact_match_is_taken_while_a_foreign_candidate_still_runs(tmp_path):
    api, store = FakeApi(), ObjectStore(str(tmp_path))
    ours = _crashed_submit(api, store, make_requests(40))
    api.add(_ids("other", 40))
    api.end(ours)
    result = BatchSubmitter(api, store, STATE).submit(InlineRequests(make_requests(40)))
    assert (result.how, result.batch_id, api.created) == ("recovered", ours, 1)


def test_when_no_candidate_holds_the_shard_the_create_never_landed_and_is_sent(tmp_path):
    api, store = FakeApi(), ObjectStore(str(tmp_path))
    scan = scan_requests(InlineRequests(make_requests(30)))
    intent = SubmissionState(
        phase="intent",
        fingerprint=scan.fingerprint,
        request_count=30,
        body_bytes=scan.body_bytes,
        source="inline requests",
        intent_at=datetime.now(UTC).isoformat(),
        custom_ids_digest=scan.custom_ids_digest,
    )
    store.write_json(STATE, asdict(intent))
    others = [api.add(_ids(prefix, 30)).id for prefix in ("a", "b")]
    api.end(*others)
    result = BatchSubmitter(api, store, STATE).submit(InlineRequests(make_requests(30)))
    assert result.how == "created" and result.batch_id not in others and api.created == 1


def test_two_batches_holding_exactly_the_shards_ids_refuse_to_guess(tmp_path):
    api, store = FakeApi(), ObjectStore(str(tmp_path))
    ours = _crashed_submit(api, store, make_requests(25))
    twin = api.add(_ids("r", 25)).id  # another run sent the same custom_ids
    api.end(ours, twin)
    with pytest.raises(SubmissionUndecidable, match="Refusing to guess") as info:
        BatchSubmitter(api, store, STATE).submit(InlineRequests(make_requests(25)))
    assert not isinstance(info.value, RecoveryPending)
    assert ours in str(info.value) and twin in str(info.value) and store.uri(STATE) in str(info.value)
    assert api.created == 1


def test_a_cut_results_download_proves_nothing_and_is_retried(tmp_path):
    api, store = FakeApi(), ObjectStore(str(tmp_path))
    ours = _crashed_submit(api, store, make_requests(30))
    theirs = api.add(_ids("other", 30)).id
    api.end(ours, theirs)
    api.cut_results.add(ours)
    with pytest.raises(RecoveryPending, match=f"{ours} \\(ended, but its results could not be read whole"):
        BatchSubmitter(api, store, STATE).submit(InlineRequests(make_requests(30)))
    api.cut_results.clear()
    result = BatchSubmitter(api, store, STATE).submit(InlineRequests(make_requests(30)))
    assert (result.how, result.batch_id, api.created) == ("recovered", ours, 1)


def test_a_state_without_the_digest_recovers_through_the_shards_scan(tmp_path):
    api, store = FakeApi(), ObjectStore(str(tmp_path))
    ours = _crashed_submit(api, store, make_requests(30))
    old = {k: v for k, v in store.read_json(STATE).items() if k != "custom_ids_digest"}
    store.write_json(STATE, old)
    theirs = api.add(_ids("other", 30)).id
    api.end(ours, theirs)
    result = BatchSubmitter(api, store, STATE).submit(InlineRequests(make_requests(30)))
    assert (result.how, result.batch_id, api.created) == ("recovered", ours, 1)
    assert store.read_json(STATE)["custom_ids_digest"] == custom_ids_digest(_ids("r", 30))


def test_a_state_without_the_digest_for_a_changed_input_cannot_be_checked(tmp_path):
    api, store = FakeApi(), ObjectStore(str(tmp_path))
    ours = _crashed_submit(api, store, make_requests(30))
    store.write_json(STATE, {k: v for k, v in store.read_json(STATE).items() if k != "custom_ids_digest"})
    api.end(ours, api.add(_ids("other", 30)).id)
    with pytest.raises(SubmissionUndecidable, match="no digest of its custom_ids") as info:
        BatchSubmitter(api, store, STATE).submit(InlineRequests(make_requests(31)))
    assert not isinstance(info.value, RecoveryPending) and api.created == 1


class _GeneratedRequests:
    """100,000 requests made line by line, never held."""

    description = "generated requests"

    def __init__(self, count: int) -> None:
        self.count = count

    def lines(self) -> Iterator[bytes]:
        for i in range(self.count):
            yield (
                b'{"custom_id":"r%d","params":{"model":"claude-haiku-4-5","max_tokens":16,"messages":[]}}' % i
            )


def test_recovery_memory_stays_flat_for_100000_requests(tmp_path):
    count = 100_000
    api, store = FakeApi(), ObjectStore(str(tmp_path))
    source = _GeneratedRequests(count)
    scan = scan_requests(source)
    intent = SubmissionState(
        phase="intent",
        fingerprint=scan.fingerprint,
        request_count=count,
        body_bytes=scan.body_bytes,
        source=source.description,
        intent_at=datetime.now(UTC).isoformat(),
        custom_ids_digest=scan.custom_ids_digest,
    )
    store.write_json(STATE, asdict(intent))
    del scan
    ours = api.add(lambda: (f"r{i}" for i in reversed(range(count))), count).id
    theirs = api.add(lambda: (f"x{i}" for i in range(count)), count).id
    api.end(ours, theirs)
    tracemalloc.start()
    try:
        result = BatchSubmitter(api, store, STATE).submit(source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (result.how, result.batch_id, api.lines_read[ours], api.created) == ("recovered", ours, count, 0)
    # 8 bytes an id (a few 800 kB arrays); a set of 100,000 id strings alone would take ~10 MB
    assert peak < 6_000_000, f"peak {peak:,} bytes"


# --- against the emulator over HTTP -------------------------------------------------------------


def _shard(store: ObjectStore, requests: list[dict], name: str) -> StoredShard:
    store.write_bytes(name, b"".join(orjson.dumps(r) + b"\n" for r in requests))
    return StoredShard(store, name)


def _killed_after_create(
    hook: ClaudeBatchHook, created: list[str], barrier: threading.Barrier
) -> ClaudeBatchHook:
    """The batch is created server-side, then the worker dies before the state records its id."""
    create = hook.create_batch_from_body

    def killed(*args, **kwargs):
        barrier.wait(timeout=30)  # both creates go out together
        created.append(create(*args, **kwargs).id)
        raise SystemExit("worker killed after the paid call")

    hook.create_batch_from_body = killed
    return hook


def test_concurrent_equal_size_shards_each_recover_their_own_batch(anthropic_conn, s3_store):
    # two runs (so neither state file claims the other's batch), equal sizes, different custom_ids
    runs = {
        name: (
            f"dag/run-{name}/state/submit.part-00000.json",
            _shard(s3_store, make_requests(60, prefix=name), f"dag/run-{name}/requests/part-00000.jsonl"),
        )
        for name in ("a", "b")
    }
    created: dict[str, list[str]] = {name: [] for name in runs}
    barrier = threading.Barrier(len(runs))
    with ThreadPoolExecutor(len(runs)) as pool:
        futures = [
            pool.submit(
                BatchSubmitter(
                    _killed_after_create(ClaudeBatchHook(), created[name], barrier), s3_store, state
                ).submit,
                shard,
            )
            for name, (state, shard) in runs.items()
        ]
        for future in futures:
            with pytest.raises(SystemExit):
                future.result()
    assert anthropic_conn.stats()["batches_created"] == 2
    assert all(s3_store.read_json(state)["phase"] == "intent" for state, _ in runs.values())
    anthropic_conn.advance(3600)  # both have ended: their results can be read
    client = ClaudeBatchHook().conn
    for name, (state, shard) in runs.items():
        retried = BatchSubmitter(ClaudeBatchHook(), s3_store, state).submit(shard)
        assert (retried.how, retried.batch_id) == ("recovered", created[name][0])
        assert s3_store.read_json(state)["batch_id"] == created[name][0]
        held = {line.custom_id for line in client.messages.batches.results(retried.batch_id)}
        assert held == {f"{name}{i}" for i in range(60)}
    assert anthropic_conn.stats()["batches_created"] == 2  # the two orphans, nothing more


def test_an_in_progress_same_size_candidate_is_retryable_and_nothing_is_created(anthropic_conn, s3_store):
    anthropic_conn.configure(processing_seconds=3600)
    shard = _shard(s3_store, make_requests(45), "dag/run/requests/part-00000.jsonl")
    created: list[str] = []
    hook = _killed_after_create(ClaudeBatchHook(), created, threading.Barrier(1))
    with pytest.raises(SystemExit):
        BatchSubmitter(hook, s3_store, STATE).submit(shard)
    client = ClaudeBatchHook().conn
    other = client.messages.batches.create(requests=make_requests(45, prefix="other")).id
    with pytest.raises(RecoveryPending, match="This will be decidable when batches .* end") as info:
        BatchSubmitter(ClaudeBatchHook(), s3_store, STATE).submit(shard)
    assert set(info.value.batch_ids) == {created[0], other}
    stats = anthropic_conn.stats()
    assert stats["batches_created"] == 2 and stats["http_requests"]["create"] == 2
    assert s3_store.read_json(STATE)["phase"] == "intent"
    anthropic_conn.advance(2 * 3600)
    retried = BatchSubmitter(ClaudeBatchHook(), s3_store, STATE).submit(shard)
    assert (retried.how, retried.batch_id) == ("recovered", created[0])
    assert anthropic_conn.stats()["batches_created"] == 2


def test_results_custom_ids_are_read_through_the_hook(anthropic_conn):
    client = ClaudeBatchHook().conn
    batch = client.messages.batches.create(requests=make_requests(12, prefix="h"))
    anthropic_conn.advance(3600)
    assert sorted(result_custom_ids(ClaudeBatchHook(), batch.id)) == sorted(f"h{i}" for i in range(12))
