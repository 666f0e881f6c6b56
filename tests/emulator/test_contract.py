"""Every kind of emulator answer checked against Anthropic's OpenAPI document, and parsed by the SDK.

The document is the vendored subset in ``spec/`` (see ``contract.py`` for how answers are
validated: JSON Schema 2020-12, ``required`` and ``additionalProperties`` as stated, and closed).
Covered: every endpoint's answers; every result type (succeeded with text and with tool_use,
errored, canceled, expired). The error bodies: ``test_contract_errors.py``.
"""

from __future__ import annotations

import re

import httpx
import orjson
import pytest
from claude_batch.emulator.faults import BATCH_ERROR_TYPES

from .contract import SPEC, checked, create, operation_ids, results, retrieve, validate
from .helpers import API_KEY, HEADERS, finish, items, request_item

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


def structured_item(custom_id: str, text: str) -> dict:
    return request_item(custom_id, text, output_config={"format": {"type": "json_schema", "schema": SCHEMA}})


def tool_item(custom_id: str, text: str) -> dict:
    return request_item(custom_id, text, tools=[TOOL], tool_choice={"type": "tool", "name": "classify"})


def mixed_items(prefix: str, count: int) -> list[dict]:
    """Plain text, JSON-schema text, forced tool_use, cached system prompts, stop sequences,
    max_tokens cuts."""
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
            "message_batches_post", "message_batches_list", "message_batches_retrieve",
            "message_batches_cancel", "message_batches_delete", "message_batches_results",
            "messages_post", "messages_count_tokens_post",
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
            "input_tokens": 1, "output_tokens": 1, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0, "cache_creation": None, "inference_geo": None,
            "output_tokens_details": None, "server_tool_use": None,
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
