"""Every kind of emulator answer checked against Anthropic's OpenAPI document, and parsed by the SDK.

The document is the vendored subset in ``spec/`` (see ``contract.py`` for how answers are
validated: JSON Schema 2020-12, ``required`` and ``additionalProperties`` as stated, and closed).
Covered: every endpoint's answers; every result type (succeeded with text and with tool_use,
errored, canceled, expired); every error body, including each injected fault status.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import anthropic
import httpx
import orjson
import pytest
from anthropic.types import Message, MessageTokensCount
from anthropic.types.messages import DeletedMessageBatch, MessageBatch, MessageBatchIndividualResponse
from anthropic.types.shared import ErrorResponse
from claude_batch.emulator.errors import ERROR_TYPE_BY_STATUS
from claude_batch.emulator.faults import BATCH_ERROR_TYPES, ENDPOINTS

from .contract import ERROR_TYPES_OUTSIDE_THE_DOCUMENT, SPEC, check, check_error_body, operation_ids, validate
from .helpers import API_KEY, HEADERS, PROCESSING_SECONDS, finish, items, request_item

DAY = 86_400.0
SCHEMA = {
    "type": "object",
    "properties": {
        "category": {"type": "string", "enum": ["billing", "bug", "other"]},
        "priority": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["category", "priority"],
    "additionalProperties": False,
}
TOOL = {"name": "classify", "description": "File the ticket.", "input_schema": SCHEMA}
SYSTEM = [
    {"type": "text", "text": "You triage support tickets. " * 800, "cache_control": {"type": "ephemeral"}}
]
SDK_MODEL = {
    "message_batches_post": MessageBatch,
    "message_batches_retrieve": MessageBatch,
    "message_batches_cancel": MessageBatch,
    "message_batches_delete": DeletedMessageBatch,
    "message_batches_results": MessageBatchIndividualResponse,
    "messages_post": Message,
    "messages_count_tokens_post": MessageTokensCount,
}


def checked(response: httpx.Response, operation_id: str, status: int = 200):
    """The parsed body, checked against the document and, for successes, parsed by the SDK's model."""
    assert response.status_code == status, response.text
    body = check(response, operation_id)
    if status == 200:
        if operation_id == "message_batches_list":
            for batch in body["data"]:
                MessageBatch.model_validate(batch)
        else:
            for value in body if isinstance(body, list) else [body]:
                SDK_MODEL[operation_id].model_validate(value)
    elif body["error"]["type"] not in ERROR_TYPES_OUTSIDE_THE_DOCUMENT:
        ErrorResponse.model_validate(body)
    return body


def create(http: httpx.Client, requests: list[dict]) -> dict:
    return checked(
        http.post("/v1/messages/batches", content=orjson.dumps({"requests": requests})),
        "message_batches_post",
    )


def retrieve(http: httpx.Client, batch_id: str) -> dict:
    return checked(http.get(f"/v1/messages/batches/{batch_id}"), "message_batches_retrieve")


def results(http: httpx.Client, batch_id: str) -> list[dict]:
    return checked(http.get(f"/v1/messages/batches/{batch_id}/results"), "message_batches_results")


def structured_item(custom_id: str, text: str) -> dict:
    return request_item(custom_id, text, output_config={"format": {"type": "json_schema", "schema": SCHEMA}})


def tool_item(custom_id: str, text: str) -> dict:
    return request_item(custom_id, text, tools=[TOOL], tool_choice={"type": "tool", "name": "classify"})


def mixed_items(prefix: str, count: int) -> list[dict]:
    """Plain text, JSON-schema text, forced tool_use, cached system prompts, stop sequences, max_tokens cuts."""
    kinds = [
        lambda i: request_item(f"{prefix}-plain-{i}", f"Hello number {i}"),
        lambda i: structured_item(f"{prefix}-json-{i}", f"I was charged twice, invoice {i}."),
        lambda i: tool_item(f"{prefix}-tool-{i}", f"The app crashes on start, ticket {i}."),
        lambda i: request_item(f"{prefix}-cached-{i}", f"Ticket {i}", system=SYSTEM),
        lambda i: request_item(f"{prefix}-stop-{i}", f"Stop here {i}", stop_sequences=["here"]),
        lambda i: request_item(f"{prefix}-cut-{i}", "A long text " * 50, max_tokens=3),
    ]
    return [kinds[i % len(kinds)](i) for i in range(count)]


# ---- the document itself -------------------------------------------------------------------
def test_the_vendored_subset_names_its_source_and_holds_the_emulated_operations():
    source = SPEC["x-vendored-from"]
    assert source["repository"] == "github.com/stackql-registry/stackql-provider-anthropic"
    assert source["path"] == "stackql_anthropic_provider/provider-dev/downloaded/anthropic-openapi.yml"
    assert re.fullmatch(r"[0-9a-f]{40}", source["commit"])
    assert SPEC["openapi"].startswith("3.1")
    assert operation_ids() == sorted(
        [
            "message_batches_post", "message_batches_list", "message_batches_retrieve", "message_batches_cancel",
            "message_batches_delete", "message_batches_results", "messages_post", "messages_count_tokens_post",
        ]
    )  # fmt: skip
    refs = set(re.findall(r'"\$ref":"#/components/schemas/([^"]+)"', orjson.dumps(SPEC).decode()))
    assert refs == set(SPEC["components"]["schemas"])  # every reference resolves, nothing unreferenced
    assert (
        SPEC["components"]["schemas"]["CreateMessageBatchParams"]["properties"]["requests"]["maxItems"]
        == 100_000
    )


def test_the_validator_is_strict():
    message = {
        "id": "msg_01", "type": "message", "role": "assistant", "model": "m", "stop_reason": "end_turn",
        "stop_sequence": None, "stop_details": None, "container": None,
        "content": [{"type": "text", "text": "hi", "citations": None}],
        "usage": {
            "input_tokens": 1, "output_tokens": 1, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
            "cache_creation": None, "inference_geo": None, "output_tokens_details": None, "server_tool_use": None,
            "service_tier": "batch",
        },
    }  # fmt: skip
    validate("Message", message)
    for broken in (
        {k: v for k, v in message.items() if k != "container"},  # a required nullable field missing
        message | {"content": [{"type": "text", "text": "hi"}]},  # citations missing
        message
        | {"content": [{"type": "tool_use", "id": "toolu_1", "name": "t", "input": {}}]},  # caller missing
        message | {"usage": {k: v for k, v in message["usage"].items() if k != "inference_geo"}},
        message | {"surprise": 1},  # undeclared (the closed check)
    ):
        with pytest.raises(AssertionError):
            validate("Message", broken)
    tool_use = {
        "type": "tool_use",
        "id": "t",
        "name": "n",
        "input": {"any": "thing"},
        "caller": {"type": "direct"},
    }
    validate("ResponseToolUseBlock", tool_use)  # input is open, as the document says
    with pytest.raises(AssertionError):  # DirectCaller is closed in the document itself
        validate("ResponseToolUseBlock", tool_use | {"caller": {"type": "direct", "extra": 1}})
    with pytest.raises(AssertionError):
        validate("MessageBatch", {"id": "x", "type": "message_batch"})


# ---- batch endpoints ------------------------------------------------------------------------
def test_every_batch_endpoint_answers_as_documented(http, emu):
    created = create(http, items(3))
    assert created["processing_status"] == "in_progress"
    assert retrieve(http, created["id"])["processing_status"] == "in_progress"
    page = checked(http.get("/v1/messages/batches", params={"limit": 5}), "message_batches_list")
    assert [batch["id"] for batch in page["data"]] == [created["id"]]
    other = create(http, items(2, "other"))
    canceling = checked(http.post(f"/v1/messages/batches/{other['id']}/cancel"), "message_batches_cancel")
    assert canceling["processing_status"] == "canceling" and canceling["cancel_initiated_at"]
    assert retrieve(http, other["id"])["processing_status"] == "canceling"
    finish(emu)
    ended = retrieve(http, created["id"])
    assert ended["processing_status"] == "ended" and ended["results_url"]
    assert retrieve(http, other["id"])["request_counts"]["canceled"] == 2
    assert len(results(http, created["id"])) == 3
    for params in ({}, {"limit": 1}, {"limit": 1, "after_id": other["id"]}, {"before_id": created["id"]}):
        checked(http.get("/v1/messages/batches", params=params), "message_batches_list")
    deleted = checked(http.delete(f"/v1/messages/batches/{other['id']}"), "message_batches_delete")
    assert deleted == {"id": other["id"], "type": "message_batch_deleted"}
    emu.advance(29 * DAY)
    archived = retrieve(http, created["id"])
    assert archived["archived_at"] is not None
    checked(http.get(f"/v1/messages/batches/{created['id']}/results"), "message_batches_results", 404)
    assert checked(http.get("/v1/messages/batches"), "message_batches_list")["data"] == [archived]


def test_results_are_served_as_jsonl(http, emu):
    batch = create(http, items(2))
    finish(emu)
    response = http.get(f"/v1/messages/batches/{batch['id']}/results")
    assert response.headers["content-type"] == "application/x-jsonl"
    assert response.content.count(b"\n") == 2


def test_every_result_type_and_content_block_matches_the_document(http, emu):
    emu.configure(
        processing_seconds=1000.0,
        processing_jitter=0.0,
        faults={"batch": {"errored_rate": 0.2, "expired_rate": 0.05, "error_types": list(BATCH_ERROR_TYPES)}},
    )
    ran = create(
        http, mixed_items("ran", 240) + [{"custom_id": "bad", "params": {"model": "m", "messages": []}}]
    )
    halted = create(http, mixed_items("halted", 120))
    emu.advance(500)
    checked(http.post(f"/v1/messages/batches/{halted['id']}/cancel"), "message_batches_cancel")
    emu.configure(processing_seconds=30 * 3600.0)
    late = create(http, mixed_items("late", 120))  # 30 h of work: a fifth is unfinished at the 24 h expiry
    emu.advance(DAY + 60)
    lines = []
    for batch in (ran, halted, late):
        ended = retrieve(http, batch["id"])
        assert ended["processing_status"] == "ended"
        batch_lines = results(http, batch["id"])
        assert len(batch_lines) == sum(ended["request_counts"].values())
        lines += batch_lines
    by_type: dict[str, list[dict]] = {}
    for line in lines:
        by_type.setdefault(line["result"]["type"], []).append(line["result"])
    assert set(by_type) == {"succeeded", "errored", "canceled", "expired"}
    messages = [result["message"] for result in by_type["succeeded"]]
    blocks = [block for message in messages for block in message["content"]]
    assert {block["type"] for block in blocks} == {"text", "tool_use"}
    assert all(block["citations"] is None for block in blocks if block["type"] == "text")
    assert all(block["caller"] == {"type": "direct"} for block in blocks if block["type"] == "tool_use")
    assert {message["stop_reason"] for message in messages} == {
        "end_turn",
        "tool_use",
        "stop_sequence",
        "max_tokens",
    }
    assert all(message["stop_details"] is None and message["container"] is None for message in messages)
    usages = [message["usage"] for message in messages]
    assert all(
        u["output_tokens_details"] == {"thinking_tokens": 0} and u["service_tier"] == "batch" for u in usages
    )
    assert any(u["cache_creation_input_tokens"] for u in usages) and any(
        u["cache_read_input_tokens"] for u in usages
    )
    error_types = {result["error"]["error"]["type"] for result in by_type["errored"]}
    assert error_types == {"invalid_request_error", *BATCH_ERROR_TYPES}


def test_the_sdk_parses_every_result_type_with_the_new_fields(client, emu):
    emu.configure(faults={"batch": {"errored_rate": 0.3, "expired_rate": 0.1}})
    batch = client.messages.batches.create(requests=mixed_items("sdk", 60))
    to_cancel = client.messages.batches.create(requests=items(3, "c"))
    client.messages.batches.cancel(to_cancel.id)
    finish(emu)
    lines = list(client.messages.batches.results(batch.id)) + list(
        client.messages.batches.results(to_cancel.id)
    )
    assert {line.result.type for line in lines} == {"succeeded", "errored", "expired", "canceled"}
    for line in lines:
        if line.result.type != "succeeded":
            continue
        message = line.result.message
        assert message.stop_details is None and message.container is None
        assert message.usage.inference_geo is None and message.usage.server_tool_use is None
        assert message.usage.output_tokens_details.thinking_tokens == 0
        for block in message.content:
            if block.type == "tool_use":
                assert block.caller.type == "direct"
            else:
                assert block.type == "text" and block.citations is None


# ---- real-time endpoints --------------------------------------------------------------------
@pytest.mark.parametrize(
    "item",
    [
        request_item("x", "Hello"),
        structured_item("x", "I was charged twice"),
        tool_item("x", "The app crashes"),
        request_item("x", "Stop here please", stop_sequences=["here"]),
        request_item("x", "A long text " * 50, max_tokens=2),
        request_item("x", "Ticket", system=SYSTEM, inference_geo="us"),
    ],
    ids=["text", "json-schema", "tool-use", "stop-sequence", "max-tokens", "cached-with-geo"],
)
def test_messages_answer_as_documented(http, emu, item):
    message = checked(http.post("/v1/messages", content=orjson.dumps(item["params"])), "messages_post")
    assert message["usage"]["service_tier"] == "standard"
    assert message["usage"]["inference_geo"] == item["params"].get("inference_geo")
    counted = checked(
        http.post("/v1/messages/count_tokens", content=orjson.dumps(item["params"])),
        "messages_count_tokens_post",
    )
    assert set(counted) == {"input_tokens"}


def test_a_refusal_carries_stop_details(emu):
    from claude_batch.emulator import EmulatorServer

    def refuse(params, context):
        return {"content": [{"type": "text", "text": ""}], "stop_reason": "refusal"}

    with (
        EmulatorServer(api_key=API_KEY, responder=refuse) as server,
        httpx.Client(base_url=server.base_url, headers=HEADERS) as http,
    ):
        message = checked(
            http.post("/v1/messages", content=orjson.dumps(request_item("x")["params"])), "messages_post"
        )
    assert message["stop_details"] == {"type": "refusal", "category": None, "explanation": None}


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
