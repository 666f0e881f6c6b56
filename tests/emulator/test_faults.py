"""Fault injection: HTTP errors, latency, faulty requests inside batches, stalls, cut result streams."""

from __future__ import annotations

import asyncio
import time

import anthropic
import httpx
import httpx2
import orjson
import pytest
from anthropic.types.messages import MessageBatchIndividualResponse
from claude_batch.emulator.cli import faults_from_args, parse_args

from .helpers import API_KEY, finish, items

# What a client sees when the connection drops mid-body (the SDK runs on httpx2).
BROKEN_STREAM = (httpx2.RemoteProtocolError, anthropic.APIConnectionError)


@pytest.mark.parametrize(
    ("endpoint", "status", "error_class", "error_type"),
    [
        ("create", 429, anthropic.RateLimitError, "rate_limit_error"),
        ("retrieve", 500, anthropic.InternalServerError, "api_error"),
        ("list", 529, anthropic.OverloadedError, "overloaded_error"),
    ],
)
def test_http_fault_reaches_the_sdk(client, emu, endpoint, status, error_class, error_type):
    batch = client.messages.batches.create(requests=items(1))
    emu.configure(faults={"http": [{"endpoint": endpoint, "status": status, "times": 1}]})
    calls = {
        "create": lambda: client.messages.batches.create(requests=items(1)),
        "retrieve": lambda: client.messages.batches.retrieve(batch.id),
        "list": lambda: client.messages.batches.list(),
    }
    with pytest.raises(error_class) as caught:
        calls[endpoint]()
    assert caught.value.status_code == status
    assert caught.value.body["error"]["type"] == error_type
    assert caught.value.response.headers["request-id"].startswith("req_")
    if status in (429, 529):
        assert caught.value.response.headers["retry-after"] == "1"
    calls[endpoint]()  # times=1: the next call goes through
    assert emu.stats()["faults_injected"] == {f"http_{status}": 1}


def test_sdk_retries_through_faults_honouring_retry_after(emu):
    emu.configure(faults={"http": [{"endpoint": "create", "status": 529, "times": 2, "retry_after": 0.05}]})
    with anthropic.Anthropic(api_key=API_KEY, base_url=emu.base_url, max_retries=2) as client:
        started = time.monotonic()
        batch = client.messages.batches.create(requests=items(2))
        elapsed = time.monotonic() - started
    assert batch.processing_status == "in_progress"
    assert elapsed >= 0.1  # two waits of retry-after-ms = 50
    stats = emu.stats()
    assert stats["http_requests"]["create"] == 3
    assert stats["batches_created"] == 1
    assert stats["faults_injected"] == {"http_529": 2}


def test_fault_rate_is_seeded(http, emu):
    def pattern() -> list[int]:
        emu.configure(faults={"http": [{"endpoint": "*", "status": 500, "rate": 0.3}]})
        return [http.get("/v1/messages/batches").status_code for _ in range(40)]

    first = pattern()
    assert 4 <= first.count(500) <= 20
    emu.reset()
    assert pattern() == first


def test_wildcard_fault_and_config_round_trip(http, emu):
    faults = {"http": [{"endpoint": "*", "status": 504, "rate": 1.0}], "latency": {"list": 0.0}}
    response = http.post("/_emulator/config", content=orjson.dumps({"faults": faults}))
    assert response.status_code == 200
    assert response.json()["faults"]["http"][0]["status"] == 504
    assert http.get("/_emulator/config").json()["faults"]["http"][0]["endpoint"] == "*"
    for path in ("/v1/messages/batches", "/v1/messages/batches/msgbatch_01x"):
        assert http.get(path).json()["error"]["type"] == "timeout_error"
    assert http.post("/_emulator/reset").status_code == 200  # admin endpoints are not faulted
    assert http.get("/v1/messages/batches").status_code == 200


@pytest.mark.parametrize(
    "faults",
    [
        {"http": [{"endpoint": "nope", "status": 500}]},
        {"http": [{"endpoint": "create", "status": 418}]},
        {"http": [{"endpoint": "create", "status": 500, "rate": 2}]},
        {"batch": {"errored_rate": 0.7, "expired_rate": 0.7}},
        {"results_cut": {"times": 1}},
        {"unknown": 1},
    ],
)
def test_bad_fault_config_is_400(http, emu, faults):
    response = http.post("/_emulator/config", content=orjson.dumps({"faults": faults}))
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_latency_slows_the_chosen_endpoint(client, emu):
    emu.configure(faults={"latency": {"list": 0.3}})
    started = time.monotonic()
    client.messages.batches.list()
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    client.messages.count_tokens(model="m", messages=[{"role": "user", "content": "hi"}])
    assert time.monotonic() - started < 0.3
    assert emu.stats()["faults_injected"] == {"latency": 1}


def test_errored_and_expired_requests_inside_a_batch(client, emu, http):
    emu.configure(faults={"batch": {"errored_rate": 0.2, "expired_rate": 0.1}})
    batch = client.messages.batches.create(requests=items(300))
    finish(emu)
    ended = client.messages.batches.retrieve(batch.id)
    counts = ended.request_counts
    assert counts.succeeded + counts.errored + counts.expired == 300
    assert 30 <= counts.errored <= 90 and 10 <= counts.expired <= 50
    lines = [orjson.loads(line) for line in http.get(ended.results_url).content.splitlines()]
    for line in lines:
        MessageBatchIndividualResponse.model_validate(line)
    types = [line["result"]["type"] for line in lines]
    assert types.count("errored") == counts.errored and types.count("expired") == counts.expired
    error_types = {
        line["result"]["error"]["error"]["type"] for line in lines if line["result"]["type"] == "errored"
    }
    assert error_types == {"api_error", "overloaded_error"}
    stats = emu.stats()["faults_injected"]
    assert stats == {"batch_errored": counts.errored, "batch_expired": counts.expired}


def test_stalled_batch_runs_into_expiry(client, emu):
    emu.configure(faults={"batch": {"stall_rate": 1.0}})
    batch = client.messages.batches.create(requests=items(50))
    emu.advance(3600)
    assert client.messages.batches.retrieve(batch.id).processing_status == "in_progress"
    emu.advance(86_400)
    ended = client.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended"
    assert ended.ended_at == ended.expires_at
    assert ended.request_counts.expired > 0
    assert ended.request_counts.expired + ended.request_counts.succeeded == 50
    assert emu.stats()["faults_injected"]["batch_stalled"] == 1


def test_results_stream_cut_short_once(client, emu):
    batch = client.messages.batches.create(requests=items(40))
    finish(emu)
    emu.configure(faults={"results_cut": {"after_lines": 7, "times": 1}})
    received = []
    with pytest.raises(BROKEN_STREAM):
        for line in client.messages.batches.results(batch.id):
            received.append(line.custom_id)
    assert len(received) == 7  # the half line after them is never parsed
    assert len(list(client.messages.batches.results(batch.id))) == 40  # the next download is whole
    stats = emu.stats()
    assert stats["faults_injected"] == {"results_cut": 1}
    assert stats["results_served"] == 47


def test_results_cut_by_fraction_on_a_line_boundary(emu, http):
    response = http.post("/v1/messages/batches", content=orjson.dumps({"requests": items(20)}))
    finish(emu)
    emu.configure(faults={"results_cut": {"fraction": 0.5, "mid_line": False}})
    url = http.get(f"/v1/messages/batches/{response.json()['id']}").json()["results_url"]
    received = b""
    with pytest.raises(httpx.RemoteProtocolError):
        with http.stream("GET", url) as stream:
            for chunk in stream.iter_bytes():
                received += chunk
    assert received.count(b"\n") == 10 and received.endswith(b"\n")


def test_async_client_sees_faults_and_cuts(emu):
    async def scenario() -> None:
        async with anthropic.AsyncAnthropic(api_key=API_KEY, base_url=emu.base_url, max_retries=0) as client:
            batch = await client.messages.batches.create(requests=items(5))
            emu.configure(faults={"http": [{"endpoint": "retrieve", "status": 500, "times": 1}]})
            with pytest.raises(anthropic.InternalServerError):
                await client.messages.batches.retrieve(batch.id)
            finish(emu)
            emu.configure(faults={"results_cut": {"after_lines": 2}})
            received = []
            with pytest.raises(BROKEN_STREAM):
                async for line in await client.messages.batches.results(batch.id):
                    received.append(line)
            assert len(received) == 2

    asyncio.run(scenario())


def test_batch_endpoint_rate_limit_per_emulated_minute(client, emu):
    emu.configure(batch_requests_per_minute=3, time_scale=1.0)
    for _ in range(3):
        client.messages.batches.list()
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.batches.list()
    assert float(caught.value.response.headers["retry-after-ms"]) > 0
    client.messages.count_tokens(
        model="m", messages=[{"role": "user", "content": "hi"}]
    )  # not a batch endpoint
    emu.advance(61)
    client.messages.batches.list()
    assert emu.stats()["faults_injected"] == {"rate_limit": 1}


def test_processing_queue_limit(client, emu):
    emu.configure(max_queued_requests=10)
    client.messages.batches.create(requests=items(8))
    with pytest.raises(anthropic.RateLimitError, match="processing queue"):
        client.messages.batches.create(requests=items(3))
    finish(emu)
    client.messages.batches.create(requests=items(10))


def test_cli_fault_flags_build_the_fault_config():
    args = parse_args(
        [
            "--fault", "create:429:0.5:2", "--fault", "results:500", "--latency", "list:0.25",
            "--batch-errored-rate", "0.1", "--results-cut-after", "5",
        ]
    )  # fmt: skip
    assert faults_from_args(args) == {
        "http": [
            {"endpoint": "create", "status": 429, "rate": 0.5, "times": 2, "retry_after": None},
            {"endpoint": "results", "status": 500, "rate": 1.0, "times": None, "retry_after": None},
        ],
        "latency": {"list": 0.25},
        "batch": {"errored_rate": 0.1},
        "results_cut": {"after_lines": 5, "fraction": None},
    }
    with pytest.raises(ValueError):
        faults_from_args(parse_args(["--fault", "create"]))
