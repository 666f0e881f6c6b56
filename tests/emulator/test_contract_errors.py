"""Every error body the emulator answers checked against Anthropic's OpenAPI document.

Each error case, each injected fault status and a fault on every endpoint: their bodies match
the document's error envelope (``contract.py``), and the SDK raises its errors with them.
Split from ``test_contract.py``, which covers the successful answers.
"""

from __future__ import annotations

from collections.abc import Callable

import anthropic
import httpx
import orjson
import pytest
from claude_batch.emulator.errors import ERROR_TYPE_BY_STATUS
from claude_batch.emulator.faults import BATCH_ERROR_TYPES, ENDPOINTS

from .contract import check_error_body, checked, create, results
from .helpers import API_KEY, HEADERS, PROCESSING_SECONDS, finish, items, request_item


# ---- error bodies ---------------------------------------------------------------------------
def _ended_batch(http, emu) -> str:
    batch_id = create(http, items(1))["id"]
    emu.advance(PROCESSING_SECONDS * 2)
    return batch_id


def _post(http, body: bytes | dict) -> httpx.Response:
    return http.post("/v1/messages/batches", content=body if isinstance(body, bytes) else orjson.dumps(body))


ErrorCase = Callable[[httpx.Client, object], httpx.Response]
ERROR_CASES: dict[str, tuple[str, int, str, ErrorCase]] = {
    "create-bad-json": (
        "message_batches_post",
        400,
        "invalid_request_error",
        lambda h, e: _post(h, b"{nope"),
    ),
    "create-empty": (
        "message_batches_post",
        400,
        "invalid_request_error",
        lambda h, e: _post(h, {"requests": []}),
    ),
    "create-too-many": (
        "message_batches_post",
        400,
        "invalid_request_error",
        lambda h, e: (e.configure(max_requests_per_batch=2), _post(h, {"requests": items(3)}))[1],
    ),
    "create-duplicate-id": (
        "message_batches_post",
        400,
        "invalid_request_error",
        lambda h, e: _post(h, {"requests": [request_item("a"), request_item("a")]}),
    ),
    "create-bad-item": (
        "message_batches_post",
        400,
        "invalid_request_error",
        lambda h, e: _post(h, {"requests": [{"params": {}}]}),
    ),
    "create-body-too-large": (
        "message_batches_post",
        413,
        "request_too_large",
        lambda h, e: (e.configure(max_body_bytes=1000), _post(h, {"requests": items(20)}))[1],
    ),
    "create-queue-full": (
        "message_batches_post",
        429,
        "rate_limit_error",
        lambda h, e: (e.configure(max_queued_requests=1), _post(h, {"requests": items(2)}))[1],
    ),
    "create-rate-limited": (
        "message_batches_list",
        429,
        "rate_limit_error",
        lambda h, e: (
            e.configure(batch_requests_per_minute=1),
            h.get("/v1/messages/batches"),
            h.get("/v1/messages/batches"),
        )[2],
    ),  # fmt: skip
    "no-api-key": (
        "message_batches_list",
        401,
        "authentication_error",
        lambda h, e: httpx.get(
            f"{e.base_url}/v1/messages/batches", headers={"anthropic-version": "2023-06-01"}
        ),
    ),
    "wrong-api-key": (
        "message_batches_list",
        401,
        "authentication_error",
        lambda h, e: httpx.get(
            f"{e.base_url}/v1/messages/batches", headers=HEADERS | {"x-api-key": "sk-wrong"}
        ),
    ),
    "no-version": (
        "message_batches_list",
        400,
        "invalid_request_error",
        lambda h, e: httpx.get(f"{e.base_url}/v1/messages/batches", headers={"x-api-key": API_KEY}),
    ),
    "list-bad-limit": (
        "message_batches_list",
        400,
        "invalid_request_error",
        lambda h, e: h.get("/v1/messages/batches?limit=0"),
    ),
    "list-unknown-cursor": (
        "message_batches_list",
        400,
        "invalid_request_error",
        lambda h, e: h.get("/v1/messages/batches?after_id=msgbatch_01nope"),
    ),
    "retrieve-unknown": (
        "message_batches_retrieve",
        404,
        "not_found_error",
        lambda h, e: h.get("/v1/messages/batches/msgbatch_01nope"),
    ),
    "cancel-ended": (
        "message_batches_cancel",
        400,
        "invalid_request_error",
        lambda h, e: h.post(f"/v1/messages/batches/{_ended_batch(h, e)}/cancel"),
    ),
    "cancel-unknown": (
        "message_batches_cancel",
        404,
        "not_found_error",
        lambda h, e: h.post("/v1/messages/batches/msgbatch_01x/cancel"),
    ),
    "delete-in-progress": (
        "message_batches_delete",
        400,
        "invalid_request_error",
        lambda h, e: h.delete(f"/v1/messages/batches/{create(h, items(1))['id']}"),
    ),
    "delete-unknown": (
        "message_batches_delete",
        404,
        "not_found_error",
        lambda h, e: h.delete("/v1/messages/batches/msgbatch_01x"),
    ),
    "results-before-the-end": (
        "message_batches_results",
        400,
        "invalid_request_error",
        lambda h, e: h.get(f"/v1/messages/batches/{create(h, items(1))['id']}/results"),
    ),
    "results-unknown": (
        "message_batches_results",
        404,
        "not_found_error",
        lambda h, e: h.get("/v1/messages/batches/msgbatch_01x/results"),
    ),
    "messages-bad-json": (
        "messages_post",
        400,
        "invalid_request_error",
        lambda h, e: h.post("/v1/messages", content=b"["),
    ),
    "messages-bad-params": (
        "messages_post",
        400,
        "invalid_request_error",
        lambda h, e: h.post(
            "/v1/messages", content=orjson.dumps({"model": "m", "max_tokens": 0, "messages": []})
        ),
    ),
    "count-tokens-bad-params": (
        "messages_count_tokens_post",
        400,
        "invalid_request_error",
        lambda h, e: h.post("/v1/messages/count_tokens", content=orjson.dumps({"messages": []})),
    ),
    "unknown-route": ("message_batches_list", 404, "not_found_error", lambda h, e: h.get("/v1/nothing/here")),
    "wrong-method": (
        "message_batches_list",
        405,
        "invalid_request_error",
        lambda h, e: h.put("/v1/messages/batches"),
    ),
}


@pytest.mark.parametrize("name", sorted(ERROR_CASES))
def test_every_error_body_matches_the_document(http, emu, name):
    operation_id, status, error_type, call = ERROR_CASES[name]
    body = checked(call(http, emu), operation_id, status)
    assert body["error"]["type"] == error_type


@pytest.mark.parametrize("status", sorted(ERROR_TYPE_BY_STATUS))
def test_every_injected_fault_status_has_a_documented_body(http, emu, status):
    emu.configure(faults={"http": [{"endpoint": "retrieve", "status": status}]})
    body = checked(http.get("/v1/messages/batches/msgbatch_01x"), "message_batches_retrieve", status)
    assert body["error"]["type"] == ERROR_TYPE_BY_STATUS[status]


OPERATION_BY_ENDPOINT = {
    "create": ("message_batches_post", lambda h: _post(h, {"requests": items(1)})),
    "retrieve": ("message_batches_retrieve", lambda h: h.get("/v1/messages/batches/msgbatch_01x")),
    "list": ("message_batches_list", lambda h: h.get("/v1/messages/batches")),
    "cancel": ("message_batches_cancel", lambda h: h.post("/v1/messages/batches/msgbatch_01x/cancel")),
    "delete": ("message_batches_delete", lambda h: h.delete("/v1/messages/batches/msgbatch_01x")),
    "results": ("message_batches_results", lambda h: h.get("/v1/messages/batches/msgbatch_01x/results")),
    "messages": (
        "messages_post",
        lambda h: h.post("/v1/messages", content=orjson.dumps(request_item("x")["params"])),
    ),
    "count_tokens": (
        "messages_count_tokens_post",
        lambda h: h.post("/v1/messages/count_tokens", content=orjson.dumps(request_item("x")["params"])),
    ),
}


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_a_fault_on_every_endpoint_has_a_documented_body(http, emu, endpoint):
    emu.configure(faults={"http": [{"endpoint": endpoint, "status": 529}]})
    operation_id, call = OPERATION_BY_ENDPOINT[endpoint]
    assert checked(call(http), operation_id, 529)["error"]["type"] == "overloaded_error"


def test_an_emulator_failure_is_a_documented_500(http, emu, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(emu.store, "retrieve", broken)
    body = checked(http.get("/v1/messages/batches/msgbatch_01x"), "message_batches_retrieve", 500)
    assert body["error"]["type"] == "api_error"


def test_errored_results_nest_a_documented_error_body(http, emu):
    emu.configure(faults={"batch": {"errored_rate": 1.0, "error_types": list(BATCH_ERROR_TYPES)}})
    batch = create(http, items(40))
    finish(emu)
    for line in results(http, batch["id"]):
        check_error_body(line["result"]["error"], 200)
        assert line["result"]["error"]["request_id"].startswith("req_")


def test_sdk_errors_carry_the_documented_bodies(client, emu):
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.batches.retrieve("msgbatch_01nope")
    check_error_body(caught.value.body, 404)
    emu.configure(max_requests_per_batch=1)
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.batches.create(requests=items(2))
    check_error_body(caught.value.body, 400)
