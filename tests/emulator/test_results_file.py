"""Results files: made once (in the background, or by the first download), kept compressed, streamed."""

from __future__ import annotations

import threading
import time

import httpx
import orjson
import pytest
from claude_batch.emulator.results_file import BLOCK_LINES, ResultsFile, ResultsWorker

from .contract import validate
from .helpers import finish, items

SIZE = 2 * BLOCK_LINES + 300  # three blocks, the last one short


def _wait_made(emu, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while emu.stats()["results_lines_pending"]:
        assert time.monotonic() < deadline, "the background worker did not make the results"
        time.sleep(0.02)


def _create(http: httpx.Client, count: int, prefix: str = "req") -> str:
    response = http.post("/v1/messages/batches", content=orjson.dumps({"requests": items(count, prefix)}))
    assert response.status_code == 200, response.text
    return response.json()["id"]


def _download(http: httpx.Client, batch_id: str) -> bytes:
    response = http.get(f"/v1/messages/batches/{batch_id}/results")
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-jsonl"
    lines = response.content.split(b"\n")
    assert lines[-1] == b""
    for line in lines[:3] + lines[BLOCK_LINES - 1 : BLOCK_LINES + 2] + lines[-4:-1]:  # around the block seams
        validate("MessageBatchIndividualResponse", orjson.loads(line))  # (validating them all takes seconds)
    return response.content


def test_lines_are_made_in_the_background_and_served_from_the_stored_blocks(http, emu):
    batch_id = _create(http, SIZE)
    _wait_made(emu)
    stats = emu.stats()
    assert stats["results_lines_pending"] == 0
    assert 0 < stats["results_stored_bytes"] < SIZE * 200  # compressed: far less than ~700 bytes a line
    finish(emu)
    first = _download(http, batch_id)
    assert first.count(b"\n") == SIZE
    assert _download(http, batch_id) == first
    assert [orjson.loads(line)["custom_id"] for line in first.splitlines()] == [
        f"req-{i}" for i in range(SIZE)
    ]


def _without_ids(data: bytes) -> list[dict]:
    """The lines without what depends on the batch id (message and request ids)."""
    lines = []
    for line in data.splitlines():
        parsed = orjson.loads(line)
        result = parsed["result"]
        if result["type"] == "succeeded":
            result["message"]["id"] = None
        elif result["type"] == "errored":
            result["error"]["request_id"] = None
        lines.append(parsed)
    return lines


def test_without_precomputing_the_first_download_makes_the_same_lines(http, emu):
    emu.configure(faults={"batch": {"errored_rate": 0.1}})
    made = _create(http, SIZE)
    _wait_made(emu)
    finish(emu)
    made_lines = _download(http, made)
    emu.reset()  # the same seed: the same outcomes for the same requests
    emu.configure(precompute_results=False, faults={"batch": {"errored_rate": 0.1}})
    lazy = _create(http, SIZE)
    time.sleep(0.2)
    assert emu.stats()["results_lines_pending"] == SIZE  # nothing made until someone downloads
    finish(emu)
    lazy_lines = _download(http, lazy)
    assert emu.stats()["results_lines_pending"] == 0
    assert _without_ids(lazy_lines) == _without_ids(made_lines)
    assert _download(http, lazy) == lazy_lines


def test_a_download_while_lines_are_still_being_made_gets_them_all(http, emu):
    emu.configure(precompute_results=False)
    batch_id = _create(http, SIZE)
    finish(emu)
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(_download(http, batch_id))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 3 and len(set(results)) == 1 and results[0].count(b"\n") == SIZE


def test_canceled_and_expired_lines_are_swapped_in_across_blocks(http, emu):
    emu.configure(processing_seconds=1000.0, processing_jitter=0.0)
    canceled = _create(http, SIZE, "c")
    emu.configure(processing_seconds=30 * 3600.0)
    expired = _create(http, SIZE, "e")
    _wait_made(emu)  # made as if every request ran to its end
    emu.advance(500)
    http.post(f"/v1/messages/batches/{canceled}/cancel").raise_for_status()
    emu.advance(86_400 + 60)
    for batch_id, unfinished in ((canceled, "canceled"), (expired, "expired")):
        batch = http.get(f"/v1/messages/batches/{batch_id}").json()
        lines = [orjson.loads(line) for line in _download(http, batch_id).splitlines()]
        types = [line["result"]["type"] for line in lines]
        assert types.count(unfinished) == batch["request_counts"][unfinished] > 0
        assert types.count("succeeded") == batch["request_counts"]["succeeded"] > 0
        assert {types[i] for i in range(BLOCK_LINES)} == {unfinished, "succeeded"}  # swapped inside a block


@pytest.mark.parametrize("after_lines", [0, 5, BLOCK_LINES - 1, BLOCK_LINES, BLOCK_LINES + 7, SIZE - 1])
def test_a_results_cut_falls_where_asked_across_blocks(http, emu, after_lines):
    batch_id = _create(http, SIZE)
    finish(emu)
    emu.configure(faults={"results_cut": {"after_lines": after_lines, "times": 1}})
    received = b""
    with pytest.raises(httpx.RemoteProtocolError):
        with http.stream("GET", f"/v1/messages/batches/{batch_id}/results") as stream:
            for chunk in stream.iter_bytes():
                received += chunk
    assert received.count(b"\n") == after_lines
    assert not received.endswith(b"\n")  # half of the next line
    assert emu.stats()["results_served"] == after_lines
    assert _download(http, batch_id).count(b"\n") == SIZE  # the next download is whole


def test_delete_and_reset_drop_the_stored_results(http, emu):
    kept, dropped = _create(http, 50, "k"), _create(http, 50, "d")
    _wait_made(emu)
    finish(emu)
    before = emu.stats()["results_stored_bytes"]
    http.delete(f"/v1/messages/batches/{dropped}").raise_for_status()
    assert 0 < emu.stats()["results_stored_bytes"] < before
    assert _download(http, kept).count(b"\n") == 50
    emu.reset()
    assert emu.stats()["results_stored_bytes"] == 0 and emu.stats()["results_lines_pending"] == 0


def test_results_file_blocks_and_steps():
    results = ResultsFile(BLOCK_LINES + 10)
    assert results.block_count == 2 and results.block_span(1) == (BLOCK_LINES, BLOCK_LINES + 10)
    start, end = results.next_step(BLOCK_LINES + 100)
    assert (start, end) == (0, BLOCK_LINES)  # a step never crosses a block's end
    results.add_lines([b"%d\n" % i for i in range(start, end)])
    assert len(results.blocks) == 1 and not results.complete
    results.add_lines([b"%d\n" % i for i in range(*results.next_step(3))])
    assert len(results.blocks) == 1 and results.next_index == BLOCK_LINES + 3
    results.add_lines([b"%d\n" % i for i in range(*results.next_step(100))])
    assert results.complete and len(results.blocks) == 2
    assert results.block(1) == b"".join(b"%d\n" % i for i in range(BLOCK_LINES, BLOCK_LINES + 10))


def test_the_worker_waits_while_the_server_is_busy():
    busy = threading.Event()
    busy.set()
    steps: list[str] = []

    def step(name: str) -> bool:
        steps.append(name)
        return len([s for s in steps if s == name]) >= 3

    worker = ResultsWorker(step, busy.is_set, pause=0.001, linger=0.05)
    worker.submit("a")
    worker.submit("b")
    time.sleep(0.1)
    assert steps == []  # busy: nothing done
    busy.clear()
    deadline = time.monotonic() + 5
    while worker.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert steps == ["a", "a", "a", "b", "b", "b"]
    worker.close()
    worker.submit("c")
    time.sleep(0.1)
    assert "c" not in steps
