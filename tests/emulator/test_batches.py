"""The batch endpoints through the official SDK: lifecycle, results, cancel, delete, expiry, archive."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import anthropic
import orjson
import pytest
from anthropic.types.messages import DeletedMessageBatch, MessageBatch, MessageBatchIndividualResponse

from .helpers import API_KEY, PROCESSING_SECONDS, RFC3339, finish, items, request_item

DAY = 86_400.0


def raw_batch(client: anthropic.Anthropic, batch_id: str) -> dict:
    """The batch as raw JSON, checked strictly against the SDK's model."""
    response = client.messages.batches.with_raw_response.retrieve(batch_id)
    assert response.headers["request-id"].startswith("req_")
    body = response.json()
    MessageBatch.model_validate(body)
    return body


def raw_result_lines(http, batch: dict) -> list[dict]:
    """The results file as raw lines, each checked against the SDK's model."""
    response = http.get(batch["results_url"])
    assert response.status_code == 200
    text = response.content
    assert b"\r" not in text
    lines = text.split(b"\n")
    assert lines[-1] == b""  # newline-terminated, and no blank line anywhere else
    parsed = [orjson.loads(line) for line in lines[:-1]]
    for line in parsed:
        MessageBatchIndividualResponse.model_validate(line)
    return parsed


def test_create_returns_in_progress_batch_with_api_shape(client, emu):
    response = client.messages.batches.with_raw_response.create(requests=items(3))
    body = response.json()
    MessageBatch.model_validate(body)
    assert list(body) == [
        "id", "type", "processing_status", "request_counts", "ended_at", "created_at", "expires_at",
        "archived_at", "cancel_initiated_at", "results_url",
    ]  # fmt: skip
    assert body["id"].startswith("msgbatch_01") and len(body["id"]) == len("msgbatch_01") + 22
    assert body["type"] == "message_batch"
    assert body["processing_status"] == "in_progress"
    assert body["request_counts"] == {
        "processing": 3,
        "succeeded": 0,
        "errored": 0,
        "canceled": 0,
        "expired": 0,
    }
    assert (
        body["ended_at"] is body["archived_at"] is body["cancel_initiated_at"] is body["results_url"] is None
    )
    assert RFC3339.match(body["created_at"]) and RFC3339.match(body["expires_at"])
    batch = MessageBatch.model_validate(body)
    assert batch.expires_at - batch.created_at == timedelta(hours=24)
    assert response.headers["request-id"].startswith("req_")


def test_batch_ends_after_processing_seconds_and_counts_move_at_once(client, emu, http):
    batch = client.messages.batches.create(requests=items(5))
    emu.advance(PROCESSING_SECONDS * 0.5)
    assert raw_batch(client, batch.id)["request_counts"]["processing"] == 5
    emu.advance(PROCESSING_SECONDS)
    body = raw_batch(client, batch.id)
    assert body["processing_status"] == "ended"
    assert body["request_counts"] == {
        "processing": 0,
        "succeeded": 5,
        "errored": 0,
        "canceled": 0,
        "expired": 0,
    }
    assert RFC3339.match(body["ended_at"])
    assert body["results_url"] == f"{emu.base_url}/v1/messages/batches/{batch.id}/results"
    lines = raw_result_lines(http, body)
    assert sorted(line["custom_id"] for line in lines) == sorted(f"req-{i}" for i in range(5))
    assert {line["result"]["type"] for line in lines} == {"succeeded"}


def test_batch_ends_in_wall_clock_time_too(client, emu):
    emu.configure(time_scale=600.0, processing_seconds=60.0, processing_jitter=0.0)  # 0.1 s of wall clock
    batch = client.messages.batches.create(requests=items(1))
    assert batch.processing_status == "in_progress"
    deadline = time.monotonic() + 5
    while client.messages.batches.retrieve(batch.id).processing_status != "ended":
        assert time.monotonic() < deadline, "the batch did not end in emulated time"
        time.sleep(0.02)


def test_sdk_results_stream_parses_every_line(client, emu):
    batch = client.messages.batches.create(requests=items(25))
    finish(emu)
    results = list(client.messages.batches.results(batch.id))
    assert len(results) == 25
    for result in results:
        assert result.result.type == "succeeded"
        message = result.result.message
        assert message.model == "claude-haiku-4-5-20251001"
        assert message.usage.service_tier == "batch"
        assert message.id.startswith("msg_")
    # Re-downloading gives the same file.
    again = [r.model_dump() for r in client.messages.batches.results(batch.id)]
    assert again == [r.model_dump() for r in results]
    assert emu.stats()["results_served"] == 50


def test_results_url_follows_the_host_the_client_used(client, emu):
    batch = client.messages.batches.create(requests=items(1))
    finish(emu)
    with anthropic.Anthropic(
        api_key=API_KEY, base_url=f"http://localhost:{emu.port}", max_retries=0
    ) as other:
        url = other.messages.batches.retrieve(batch.id).results_url
        assert url == f"http://localhost:{emu.port}/v1/messages/batches/{batch.id}/results"
        assert len(list(other.messages.batches.results(batch.id))) == 1
    emu.configure(public_base_url="http://emulator.internal:9999")
    assert client.messages.batches.retrieve(batch.id).results_url.startswith(
        "http://emulator.internal:9999/v1/"
    )


def test_results_before_the_end_are_refused(client, emu, http):
    batch = client.messages.batches.create(requests=items(2))
    with pytest.raises(anthropic.AnthropicError, match="No `results_url`"):
        client.messages.batches.results(batch.id)
    response = http.get(f"/v1/messages/batches/{batch.id}/results")
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_retrieve_unknown_batch_is_404(client, emu, http):
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve("msgbatch_01doesnotexist")
    body = http.get("/v1/messages/batches/msgbatch_01doesnotexist").json()
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error"


def test_cancel_before_any_progress_cancels_everything(client, emu, http):
    batch = client.messages.batches.create(requests=items(4))
    response = client.messages.batches.with_raw_response.cancel(batch.id)
    body = response.json()
    MessageBatch.model_validate(body)
    assert body["processing_status"] == "canceling"
    assert RFC3339.match(body["cancel_initiated_at"])
    assert body["request_counts"]["processing"] == 4
    again = client.messages.batches.cancel(batch.id)  # canceling twice is harmless
    assert again.processing_status == "canceling"
    emu.advance(10)
    ended = raw_batch(client, batch.id)
    assert ended["processing_status"] == "ended"
    assert ended["request_counts"] == {
        "processing": 0,
        "succeeded": 0,
        "errored": 0,
        "canceled": 4,
        "expired": 0,
    }
    assert [line["result"] for line in raw_result_lines(http, ended)] == [{"type": "canceled"}] * 4


def test_cancel_midway_keeps_finished_results_and_cancels_the_rest(client, emu, http):
    emu.configure(processing_seconds=1000.0, processing_jitter=0.0)
    batch = client.messages.batches.create(requests=items(200))
    emu.advance(500)
    client.messages.batches.cancel(batch.id)
    emu.advance(10)
    ended = raw_batch(client, batch.id)
    counts = ended["request_counts"]
    assert counts["succeeded"] + counts["canceled"] == 200
    assert 60 < counts["succeeded"] < 140  # about half had finished when the cancel came
    types = [line["result"]["type"] for line in raw_result_lines(http, ended)]
    assert types.count("succeeded") == counts["succeeded"]
    assert types.count("canceled") == counts["canceled"]


def test_cancel_of_an_ended_batch_is_refused(client, emu):
    batch = client.messages.batches.create(requests=items(1))
    finish(emu)
    with pytest.raises(anthropic.BadRequestError, match="already ended"):
        client.messages.batches.cancel(batch.id)


def test_delete_only_once_ended(client, emu, http):
    batch = client.messages.batches.create(requests=items(2))
    with pytest.raises(anthropic.BadRequestError, match="can only be deleted once it has ended"):
        client.messages.batches.delete(batch.id)
    finish(emu)
    response = client.messages.batches.with_raw_response.delete(batch.id)
    assert response.json() == {"id": batch.id, "type": "message_batch_deleted"}
    DeletedMessageBatch.model_validate(response.json())
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve(batch.id)
    assert http.get(f"/v1/messages/batches/{batch.id}/results").status_code == 404
    assert batch.id not in [b.id for b in client.messages.batches.list()]
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.delete(batch.id)
    assert emu.stats()["batches_by_status"] == {"in_progress": 0, "canceling": 0, "ended": 0}


def test_unfinished_requests_expire_at_24_hours(client, emu, http):
    emu.configure(processing_seconds=30 * 3600.0, processing_jitter=0.0)
    batch = client.messages.batches.create(requests=items(100))
    emu.advance(DAY - 60)
    assert client.messages.batches.retrieve(batch.id).processing_status == "in_progress"
    emu.advance(120)
    ended = raw_batch(client, batch.id)
    assert ended["processing_status"] == "ended"
    assert ended["ended_at"] == ended["expires_at"]
    counts = ended["request_counts"]
    assert counts["succeeded"] + counts["expired"] == 100
    assert counts["expired"] > 5 and counts["succeeded"] > 60  # 24 of 30 hours got done
    types = [line["result"]["type"] for line in raw_result_lines(http, ended)]
    assert types.count("expired") == counts["expired"]


def test_results_are_archived_after_29_days(client, emu, http):
    batch = client.messages.batches.create(requests=items(2))
    finish(emu)
    assert raw_batch(client, batch.id)["archived_at"] is None
    emu.advance(29 * DAY)
    body = raw_batch(client, batch.id)
    created = MessageBatch.model_validate(body).created_at
    assert MessageBatch.model_validate(body).archived_at == created + timedelta(days=29)
    assert body["results_url"] is not None  # the batch stays, its results do not
    response = http.get(body["results_url"])
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.NotFoundError):
        list(client.messages.batches.results(batch.id))
    assert [b.id for b in client.messages.batches.list()] == [batch.id]


def test_processing_jitter_is_small_and_seeded(client, emu):
    emu.configure(processing_seconds=100.0, processing_jitter=0.1, time_scale=1.0)
    ids = [client.messages.batches.create(requests=items(1)).id for _ in range(10)]
    emu.advance(89.9)
    assert all(client.messages.batches.retrieve(i).processing_status == "in_progress" for i in ids)
    emu.advance(20.2)
    assert all(client.messages.batches.retrieve(i).processing_status == "ended" for i in ids)


def test_async_client_full_lifecycle(emu):
    async def scenario() -> None:
        async with anthropic.AsyncAnthropic(api_key=API_KEY, base_url=emu.base_url, max_retries=0) as client:
            created = await client.messages.batches.create(requests=[request_item("a"), request_item("b")])
            assert created.processing_status == "in_progress"
            raw = await client.messages.batches.with_raw_response.retrieve(created.id)
            MessageBatch.model_validate(await raw.json())
            to_cancel = await client.messages.batches.create(requests=[request_item("c")])
            canceling = await client.messages.batches.cancel(to_cancel.id)
            assert canceling.processing_status == "canceling"
            finish(emu)
            ended = await client.messages.batches.retrieve(created.id)
            assert ended.request_counts.succeeded == 2
            results = [line async for line in await client.messages.batches.results(created.id)]
            assert sorted(r.custom_id for r in results) == ["a", "b"]
            for line in results:
                MessageBatchIndividualResponse.model_validate(line.model_dump(mode="json"))
            listed = [batch.id async for batch in client.messages.batches.list(limit=1)]
            assert listed == [to_cancel.id, created.id]
            message = await client.messages.create(
                model="claude-opus-4-5", max_tokens=20, messages=[{"role": "user", "content": "ping"}]
            )
            assert message.model == "claude-opus-4-5-20251101" and message.usage.service_tier == "standard"
            counted = await client.messages.count_tokens(
                model="m", messages=[{"role": "user", "content": "ping"}]
            )
            assert counted.input_tokens == message.usage.input_tokens
            deleted = await client.messages.batches.delete(to_cancel.id)
            assert deleted.type == "message_batch_deleted"
            with pytest.raises(anthropic.NotFoundError):
                await client.messages.batches.retrieve(to_cancel.id)

    asyncio.run(scenario())


def test_beta_batches_client_works_too(client, emu):
    beta = client.beta.messages.batches
    created = beta.create(requests=items(2))
    assert created.processing_status == "in_progress"
    finish(emu)
    assert beta.retrieve(created.id).request_counts.succeeded == 2
    assert [b.id for b in beta.list()] == [created.id]
    assert sorted(line.custom_id for line in beta.results(created.id)) == ["req-0", "req-1"]


# ---- timestamps on the API clock ----------------------------------------------------------------
def _at(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def test_timestamps_keep_client_side_ages_and_expiry_in_step_with_the_time_scale(http, emu):
    from claude_batch.poller import BatchSnapshot

    emu.configure(time_scale=60.0, processing_seconds=600.0, processing_jitter=0.0)
    before = time.time()
    created = http.post("/v1/messages/batches", content=orjson.dumps({"requests": items(2)})).json()
    # created_at is the wall-clock time of the create; 24 emulated hours are 24 minutes at 60x
    assert before - 0.5 <= _at(created["created_at"]) <= time.time() + 0.5
    assert _at(created["expires_at"]) - _at(created["created_at"]) == pytest.approx(24 * 60, abs=1e-6)
    time.sleep(0.2)
    line = BatchSnapshot.from_api(http.get(f"/v1/messages/batches/{created['id']}").json()).progress_line(
        datetime.now(UTC)
    )
    assert "age 0m00s, expires in 23m59s" in line or "age 0m01s, expires in 23m5" in line, line
    emu.advance(3600)  # an emulated hour: a minute on the API clock
    newer = http.post("/v1/messages/batches", content=orjson.dumps({"requests": items(1, "n")})).json()
    assert _at(newer["created_at"]) - time.time() == pytest.approx(60, abs=1.0)
    ended = http.get(f"/v1/messages/batches/{created['id']}").json()
    assert ended["processing_status"] == "ended"  # 600 emulated seconds: 10 s on the API clock
    assert _at(ended["ended_at"]) - _at(ended["created_at"]) == pytest.approx(10, abs=1e-6)


def test_cancel_and_archive_times_follow_the_api_clock(http, emu):
    emu.configure(
        time_scale=3600.0, processing_seconds=10 * 3600.0, processing_jitter=0.0, cancel_seconds=60.0
    )
    created = http.post("/v1/messages/batches", content=orjson.dumps({"requests": items(2)})).json()
    emu.advance(2 * 3600)  # 2 s on the API clock
    canceled = http.post(f"/v1/messages/batches/{created['id']}/cancel").json()
    assert _at(canceled["cancel_initiated_at"]) - _at(created["created_at"]) == pytest.approx(2, abs=0.05)
    emu.advance(29 * DAY)
    archived = http.get(f"/v1/messages/batches/{created['id']}").json()
    assert _at(archived["ended_at"]) == pytest.approx(
        _at(canceled["cancel_initiated_at"]) + 60 / 3600, abs=0.05
    )
    assert _at(archived["archived_at"]) - _at(created["created_at"]) == pytest.approx(
        29 * DAY / 3600, abs=1e-6
    )


def test_the_api_clock_is_the_emulated_one_at_time_scale_1(http, emu):
    stats = emu.stats()
    assert stats["time_scale"] == 1.0
    created = http.post("/v1/messages/batches", content=orjson.dumps({"requests": items(1)})).json()
    emu.advance(DAY + 1)
    ended = http.get(f"/v1/messages/batches/{created['id']}").json()
    assert datetime.fromisoformat(ended["expires_at"]) - datetime.fromisoformat(
        ended["created_at"]
    ) == timedelta(hours=24)
    after = emu.stats()
    emulated = _at(after["emulated_now"]) - _at(stats["emulated_now"])
    api = _at(after["api_now"]) - _at(stats["api_now"])
    assert emulated == pytest.approx(api, abs=0.05) and emulated >= DAY
