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
        "params": {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": text}]},
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
