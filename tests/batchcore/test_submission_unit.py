"""The submitter's checks and body, without the API: every refusal names the line."""

from __future__ import annotations

import orjson
import pytest
from claude_batch.storage import ObjectStore
from claude_batch.submission import (
    BatchBody,
    InlineRequests,
    Limits,
    ShardRejected,
    StoredShard,
    scan_requests,
)


def _request(custom_id: str, text: str = "hi") -> dict:
    return {
        "custom_id": custom_id,
        "params": {
            "model": "claude-haiku-4-5",
            "max_tokens": 16,
            "messages": [{"role": "user", "content": text}],
        },
    }


def _write_shard(tmp_path, lines: list[bytes]) -> StoredShard:
    store = ObjectStore(str(tmp_path))
    store.write_bytes("requests/part-00000.jsonl", b"\n".join(lines) + b"\n")
    return StoredShard(store, "requests/part-00000.jsonl")


def test_scan_counts_sizes_and_fingerprints_a_shard(tmp_path):
    requests = [_request(f"r{i}") for i in range(50)]
    shard = _write_shard(tmp_path, [orjson.dumps(r) for r in requests])
    scan = scan_requests(shard)
    body = b"".join(BatchBody(shard))
    assert scan.request_count == 50
    assert scan.body_bytes == len(body)
    assert orjson.loads(body) == {"requests": requests}
    # the same requests inline give the same fingerprint; one changed character does not
    assert scan_requests(InlineRequests(requests)).fingerprint == scan.fingerprint
    requests[7]["params"]["messages"][0]["content"] = "hj"
    assert scan_requests(InlineRequests(requests)).fingerprint != scan.fingerprint


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([orjson.dumps(_request("a")), b"{not json"], "line 2: not valid JSON"),
        ([orjson.dumps(_request("a")), orjson.dumps(_request("a"))], "line 2: duplicate custom_id 'a'"),
        ([orjson.dumps(_request("has space"))], "line 1: custom_id 'has space' does not match"),
        ([orjson.dumps(_request("x" * 65))], "line 1: custom_id"),
        ([orjson.dumps({"custom_id": "a", "params": []})], "line 1: 'params' must be an object"),
        ([b"[1, 2]"], "line 1: a request must be a JSON object"),
        ([], "no requests"),
    ],
)
def test_scan_refuses_what_the_api_would_reject(tmp_path, lines, expected):
    shard = _write_shard(tmp_path, lines) if lines else InlineRequests([])
    with pytest.raises(ShardRejected, match=expected):
        scan_requests(shard)


def test_scan_enforces_count_and_byte_limits_naming_the_line():
    requests = InlineRequests([_request(f"r{i}") for i in range(11)])
    with pytest.raises(ShardRejected, match="line 11: more than 10 requests"):
        scan_requests(requests, Limits(max_requests=10))
    one = len(orjson.dumps(_request("r0")))
    with pytest.raises(ShardRejected, match="line 3: the request body passes"):
        scan_requests(requests, Limits(max_body_bytes=2 * one + 20))


def test_body_is_streamed_in_chunks_and_can_be_sent_twice(tmp_path):
    big = "x" * 5000
    shard = _write_shard(tmp_path, [orjson.dumps(_request(f"r{i}", big)) for i in range(600)])
    chunks = list(BatchBody(shard))
    assert len(chunks) > 1 and max(len(c) for c in chunks) < 2 << 20
    assert b"".join(chunks) == b"".join(BatchBody(shard))
    assert len(orjson.loads(b"".join(chunks))["requests"]) == 600


def _recorded(shard: StoredShard) -> StoredShard:
    """The shard with the sha256 staging would have recorded for it (a hash of the file's bytes)."""
    import hashlib

    return StoredShard(
        shard.store, shard.relpath, hashlib.sha256(shard.store.read_bytes(shard.relpath)).hexdigest()
    )


def test_a_staged_shard_is_scanned_without_parsing_its_lines_and_gives_the_same_scan(tmp_path, monkeypatch):
    import claude_batch.submission.scan as submission

    requests = [_request(f"r{i}", "text " * (i % 7)) for i in range(200)]
    shard = _write_shard(tmp_path, [orjson.dumps(r) for r in requests])
    full = scan_requests(shard)
    parsed = []
    real_loads = orjson.loads
    monkeypatch.setattr(submission.orjson, "loads", lambda data: parsed.append(1) or real_loads(data))
    trusted = scan_requests(_recorded(shard))
    assert parsed == []  # not one line parsed
    assert (trusted.request_count, trusted.body_bytes, trusted.fingerprint, trusted.custom_ids_digest) == (
        full.request_count, full.body_bytes, full.fingerprint, full.custom_ids_digest,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda lines: lines.__setitem__(3, lines[3][:-1]), "line 4: not valid JSON"),  # cut short
        (
            lambda lines: lines.__setitem__(5, lines[5].replace(b'"model"', b'"mod"el"')),
            "line 6: not valid JSON",
        ),
        (lambda lines: lines.__setitem__(7, lines[2]), "line 8: duplicate custom_id 'r2'"),
    ],
)
def test_a_shard_that_differs_from_its_recorded_digest_is_scanned_in_full(tmp_path, damage, expected):
    lines = [orjson.dumps(_request(f"r{i}")) for i in range(10)]
    recorded = _recorded(_write_shard(tmp_path, lines))
    damage(lines)
    _write_shard(tmp_path, lines)  # edited after staging: the recorded digest no longer matches
    with pytest.raises(ShardRejected, match=expected):
        scan_requests(recorded)


def test_a_submit_reads_the_shard_from_the_store_once(tmp_path, monkeypatch):
    from claude_batch.submission import BatchSubmitter

    shard = _recorded(_write_shard(tmp_path, [orjson.dumps(_request(f"r{i}")) for i in range(300)]))
    reads = []
    real_open = shard.store.open
    shard.store.open = lambda path, mode="rb", **kw: (
        reads.append((path, mode)),
        real_open(path, mode, **kw),
    )[1]
    real_get_file = shard.store.fs.get_file
    monkeypatch.setattr(
        shard.store.fs,
        "get_file",
        lambda remote, local, **kw: (
            reads.append((shard.relpath if remote == shard.description else remote, "rb")),
            real_get_file(remote, local, **kw),
        )[1],
    )
    sent = []

    class Api:
        def create_batch_from_body(self, body, body_bytes, request_count, recover):
            from anthropic.types.messages import MessageBatch

            sent.append(b"".join(body))
            sent.append(b"".join(body))  # a resend streams the body again
            return MessageBatch.model_validate({
                "id": "msgbatch_1", "type": "message_batch", "processing_status": "in_progress",
                "request_counts": {"processing": request_count, "succeeded": 0, "errored": 0, "canceled": 0,
                                   "expired": 0},
                "created_at": "2026-01-01T00:00:00Z", "expires_at": "2026-01-02T00:00:00Z", "ended_at": None,
                "archived_at": None, "cancel_initiated_at": None, "results_url": None,
            })  # fmt: skip

    result = BatchSubmitter(Api(), shard.store, "state/part-00000.json").submit(shard)
    assert result.how == "created" and result.request_count == 300
    assert [path for path, mode in reads if path == shard.relpath] == [shard.relpath]
    assert sent[0] == sent[1] and orjson.loads(sent[0])["requests"][299]["custom_id"] == "r299"
