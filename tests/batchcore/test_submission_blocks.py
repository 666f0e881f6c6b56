"""A staged shard scanned and sent by whole blocks of lines: the same scan and body as line by line."""

from __future__ import annotations

import hashlib

import orjson
import pytest
from claude_batch.storage import ObjectStore
from claude_batch.submission import BatchBody, Limits, ShardRejected, StoredShard, scan_requests, sources
from claude_batch.submission.sources import _line_blocks, _line_views, _read_once, _split_lines

from tests.batchcore.test_submission_unit import _request

NAME = "requests/part-00000.jsonl"


def _stored(store: ObjectStore, data: bytes) -> tuple[StoredShard, StoredShard]:
    """The shard as staging recorded it (the sha256 of its bytes) and as of unknown origin."""
    store.write_bytes(NAME, data)
    return StoredShard(store, NAME, hashlib.sha256(data).hexdigest()), StoredShard(store, NAME)


def _scan_and_body(shard: StoredShard, limits: Limits | None = None):
    with _read_once(shard) as local:
        scan = scan_requests(local, limits or Limits())
        chunks = list(BatchBody(local))
        return scan, chunks, local.in_staged_form


def _facts(scan) -> tuple:
    return scan.request_count, scan.body_bytes, scan.fingerprint, scan.custom_ids_digest


def test_a_staged_shard_is_sent_as_its_bytes_with_newlines_as_commas(tmp_path):
    lines = [orjson.dumps(_request(f"r-{i}_x", "y" * (i % 13) * 700)) for i in range(900)]
    recorded, unknown = _stored(ObjectStore(str(tmp_path)), b"".join(line + b"\n" for line in lines))
    scan, chunks, in_staged_form = _scan_and_body(recorded)
    full, full_chunks, _ = _scan_and_body(unknown)
    body = b"".join(chunks)
    assert in_staged_form  # the block scan saw every line in staging's form
    assert body == b'{"requests":[' + b",".join(lines) + b"]}" == b"".join(full_chunks)
    assert len(body) == scan.body_bytes and len(chunks) > 3 and max(map(len, chunks)) <= 1 << 20
    assert _facts(scan) == _facts(full)
    assert (scan.id_hashes == full.id_hashes).all()


@pytest.mark.parametrize(
    "reshape",
    [
        lambda lines: b"\n".join(lines) + b"\n\n",  # a blank line at the end
        lambda lines: b"\n".join(lines[:3]) + b"\n\n" + b"\n".join(lines[3:]) + b"\n",  # one inside
        lambda lines: b"\r\n".join(lines) + b"\r\n",  # CRLF
        lambda lines: b"\n".join(lines),  # no final newline
        lambda lines: b"\n".join(lines[:5] + [b"  " + lines[5]] + lines[6:]) + b"\n",  # padded
        lambda lines: b"\n".join(lines[:-1] + [orjson.dumps({"params": {}, "custom_id": "last"})]) + b"\n",
    ],
    ids=["blank-at-end", "blank-inside", "crlf", "no-final-newline", "padded", "keys-reordered"],
)
def test_a_recorded_shard_not_in_staging_form_gives_the_full_scan_and_its_lines(tmp_path, reshape):
    lines = [orjson.dumps(_request(f"r{i}")) for i in range(20)]
    recorded, unknown = _stored(ObjectStore(str(tmp_path)), reshape(lines))
    scan, chunks, in_staged_form = _scan_and_body(recorded)
    full, full_chunks, _ = _scan_and_body(unknown)
    assert not in_staged_form
    assert _facts(scan) == _facts(full)
    assert b"".join(chunks) == b"".join(full_chunks)
    assert orjson.loads(b"".join(chunks))["requests"][5] == _request("r5")
    assert len(b"".join(chunks)) == scan.body_bytes


def test_a_staged_shard_over_a_limit_is_refused_naming_the_line(tmp_path):
    lines = [orjson.dumps(_request(f"r{i}")) for i in range(11)]
    recorded, _ = _stored(ObjectStore(str(tmp_path)), b"".join(line + b"\n" for line in lines))
    with pytest.raises(ShardRejected, match="line 11: more than 10 requests"):
        _scan_and_body(recorded, Limits(max_requests=10))
    with pytest.raises(ShardRejected, match="line 3: the request body passes"):
        _scan_and_body(recorded, Limits(max_body_bytes=2 * len(lines[0]) + 20))


def test_a_staged_shard_with_a_repeated_custom_id_names_the_line(tmp_path):
    lines = [orjson.dumps(_request(f"r{i}")) for i in range(10)]
    lines[7] = lines[2]
    recorded, _ = _stored(ObjectStore(str(tmp_path)), b"".join(line + b"\n" for line in lines))
    with pytest.raises(ShardRejected, match="line 8: duplicate custom_id 'r2'"):
        _scan_and_body(recorded)


def test_blocks_end_at_line_ends_and_a_long_line_is_gathered_once():
    chunks = [b"ab", b"c\nde", b"f", b"g\nh\n", b"i"]
    assert list(_line_blocks(chunks)) == [b"abc\n", b"defg\nh\n", b"i"]
    assert list(_line_blocks([b"a\n", b"b\n"])) == [b"a\n", b"b\n"]
    assert list(_split_lines(_line_blocks(chunks))) == [b"abc", b"defg", b"h", b"i"]


@pytest.mark.parametrize("buffer_bytes", [8, 1 << 20])
def test_line_views_cover_the_file_at_line_ends_through_one_reused_buffer(monkeypatch, buffer_bytes):
    import io

    monkeypatch.setattr(sources, "_READ_BYTES", buffer_bytes)
    data = b"a" * 10 + b"\nb\n" + b"c" * (3 << 20) + b"\n\nd\ne"  # a line longer than the buffer
    views = [bytes(view) for view in _line_views(io.BytesIO(data))]
    assert b"".join(views) == data
    assert all(view.endswith(b"\n") for view in views[:-1]) and views[-1] == b"e"
    assert [bytes(view) for view in _line_views(io.BytesIO(b""))] == []


def test_a_staged_shard_in_s3_is_downloaded_in_one_read_and_sent_whole(s3_store, monkeypatch):
    lines = [orjson.dumps(_request(f"r{i}", "z" * 3000)) for i in range(400)]
    recorded, _ = _stored(s3_store, b"".join(line + b"\n" for line in lines))
    downloads = []
    real_get_file = s3_store.fs.get_file
    monkeypatch.setattr(
        s3_store.fs,
        "get_file",
        lambda remote, local, **kw: (downloads.append(kw), real_get_file(remote, local, **kw))[1],
    )
    scan, chunks, in_staged_form = _scan_and_body(recorded)
    assert downloads == [{"max_concurrency": 1}]  # one streamed GET, not ten 50 MB parts in memory
    assert in_staged_form and scan.request_count == 400
    assert b"".join(chunks) == b'{"requests":[' + b",".join(lines) + b"]}"
