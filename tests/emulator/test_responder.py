"""Answers, usage and prompt caching: the default responder, messages, count_tokens, custom responders."""

from __future__ import annotations

import enum
from typing import Literal

import anthropic
import jsonschema
import orjson
import pytest
from anthropic.types import Message, MessageTokensCount
from claude_batch.emulator import EmulatorServer, ResponderError, ResponseContext
from claude_batch.emulator.answers import SchemaAnswerer
from pydantic import BaseModel, Field

from .helpers import API_KEY, finish, request_item

TICKET_SCHEMA = {
    "type": "object",
    "properties": {
        "category": {"type": "string", "enum": ["bug", "billing", "feature_request", "account", "other"]},
        "priority": {"type": "integer", "minimum": 1, "maximum": 5},
        "summary": {"type": "string", "maxLength": 40},
    },
    "required": ["category", "priority", "summary"],
    "additionalProperties": False,
}


def structured(text: str, schema: dict = TICKET_SCHEMA, **params: object) -> dict:
    body = {
        "model": "claude-haiku-4-5",
        "max_tokens": 512,
        "messages": [{"role": "user", "content": text}],
        "output_config": {"format": {"type": "json_schema", "schema": schema}},
    }
    return body | params


def create_message(http, params: dict) -> dict:
    response = http.post("/v1/messages", content=orjson.dumps(params))
    assert response.status_code == 200, response.text
    body = response.json()
    Message.model_validate(body)
    return body


@pytest.mark.parametrize(
    ("text", "category"),
    [
        ("I was charged twice this month, please refund the second payment.", "billing"),
        ("Where is my invoice for March?", "billing"),
        ("The app crashes with an error every time I open settings.", "bug"),
        ("It would be nice if you could add a dark mode feature.", "feature_request"),
        ("I cannot log in, my password reset link does not work.", "account"),
        ("Good morning, just saying hi.", "other"),
    ],
)
def test_enum_follows_the_text(text, category):
    answer = SchemaAnswerer(text).answer(TICKET_SCHEMA)
    jsonschema.validate(answer, TICKET_SCHEMA)
    assert answer["category"] == category


def test_numbers_come_from_the_text_within_bounds():
    schema = {
        "type": "object",
        "properties": {
            "invoice_number": {"type": "integer"},
            "total_amount": {"type": "number", "minimum": 0},
            "tax": {"type": "number", "minimum": 0},
            "items": {"type": "integer", "minimum": 1, "maximum": 100},
            "due_date": {"type": "string", "format": "date"},
            "vendor": {"type": "string"},
            "email": {"type": "string", "format": "email"},
        },
    }
    text = (
        "Invoice #4471 from ACME Tools Ltd.\nVendor: ACME Tools Ltd\nItems: 12\nTax: $23.50\n"
        "Total: $1,250.00\nDue date: 2025-01-15\nQuestions? billing@acme.example"
    )
    answer = SchemaAnswerer(text).answer(schema)
    jsonschema.validate(answer, schema)
    assert answer == {
        "invoice_number": 4471,
        "total_amount": 1250.0,
        "tax": 23.5,
        "items": 12,
        "due_date": "2025-01-15",
        "vendor": "ACME Tools Ltd",
        "email": "billing@acme.example",
    }


def test_numbers_outside_the_bounds_fall_back_inside():
    schema = {
        "type": "object",
        "properties": {"score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}},
    }
    answer = SchemaAnswerer("Order 123 arrived 45 minutes late").answer(schema)
    jsonschema.validate(answer, schema)


def test_strings_are_excerpts_about_the_field():
    schema = {
        "type": "object",
        "properties": {"shipping_note": {"type": "string"}, "summary": {"type": "string", "maxLength": 20}},
    }
    text = "Hello team. The shipping was late again! Thanks, Ann"
    # The summary is the telling sentence, not the greeting, cut at a word to its maxLength.
    assert SchemaAnswerer(text).answer(schema) == {
        "shipping_note": "The shipping was late again!",
        "summary": "The shipping was",
    }


def test_rating_follows_the_mood_of_the_text():
    schema = {"type": "object", "properties": {"rating": {"type": "integer", "minimum": 1, "maximum": 5}}}
    assert SchemaAnswerer("Terrible, awful product, I hate it").answer(schema) == {"rating": 1}
    assert SchemaAnswerer("I love it, excellent and amazing").answer(schema) == {"rating": 5}
    assert SchemaAnswerer("It arrived on Tuesday").answer(schema) == {"rating": 3}


class Severity(enum.StrEnum):
    low = "low"
    high = "high"


class LineItem(BaseModel):
    description: str = Field(max_length=30)
    quantity: int = Field(ge=1, le=1000)
    unit_price: float = Field(gt=0)


class Extraction(BaseModel):
    sentiment: Literal["positive", "negative", "neutral"]
    severity: Severity
    urgent: bool
    tags: list[Literal["refund", "shipping", "quality", "price"]] = Field(min_length=1, max_length=3)
    line_items: list[LineItem] = Field(min_length=2)
    note: str | None
    confidence: float = Field(ge=0, le=1)


def test_pydantic_schema_with_refs_nesting_and_arrays_validates():
    schema = Extraction.model_json_schema()
    assert "$defs" in schema  # the nested models come as $ref
    text = "URGENT: the package arrived broken, terrible quality. I want a refund. 2 chairs at 49.99 each."
    answer = SchemaAnswerer(text).answer(schema)
    jsonschema.validate(answer, schema)
    parsed = Extraction.model_validate(answer)
    assert parsed.sentiment == "negative"
    assert parsed.urgent is True
    assert set(parsed.tags) >= {"refund", "quality"}
    assert len(parsed.line_items) == 2


def test_structured_output_message_is_json_matching_the_schema(http, emu):
    body = create_message(http, structured("My card was charged twice, refund please. Priority 4."))
    assert body["stop_reason"] == "end_turn"
    assert body["usage"]["service_tier"] == "standard"
    assert [block["type"] for block in body["content"]] == ["text"]
    answer = orjson.loads(body["content"][0]["text"])
    jsonschema.validate(answer, TICKET_SCHEMA)
    assert answer["category"] == "billing"
    assert answer["priority"] == 4


def test_beta_output_format_is_honoured_too(http, emu):
    params = structured("crash on startup")
    params["output_format"] = params.pop("output_config")["format"]
    answer = orjson.loads(create_message(http, params)["content"][0]["text"])
    assert answer["category"] == "bug"


def test_forced_tool_answers_with_tool_use(client, emu):
    message = client.messages.create(
        model="claude-sonnet-4-5",
        max_tokens=300,
        messages=[{"role": "user", "content": "The export button throws an error"}],
        tools=[
            {"name": "noop", "description": "unused", "input_schema": {"type": "object", "properties": {}}},
            {"name": "classify", "description": "Classify", "input_schema": TICKET_SCHEMA},
        ],
        tool_choice={"type": "tool", "name": "classify"},
    )
    assert message.stop_reason == "tool_use"
    assert len(message.content) == 1 and message.content[0].type == "tool_use"
    block = message.content[0]
    assert block.name == "classify" and block.id.startswith("toolu_")
    jsonschema.validate(block.input, TICKET_SCHEMA)
    assert block.input["category"] == "bug"


def test_plain_request_gets_short_text_and_model_snapshot(client, emu):
    message = client.messages.create(
        model="claude-haiku-4-5", max_tokens=100, messages=[{"role": "user", "content": "Say hello"}]
    )
    assert message.model == "claude-haiku-4-5-20251001"
    assert message.stop_reason == "end_turn"
    assert "Say hello" in message.content[0].text
    assert (
        message.usage.input_tokens
        == client.messages.count_tokens(
            model="claude-haiku-4-5", messages=[{"role": "user", "content": "Say hello"}]
        ).input_tokens
    )


def test_unknown_models_pass_through_and_aliases_are_configurable(http, emu):
    params = {
        "model": "claude-imaginary-9",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}],
    }
    assert create_message(http, params)["model"] == "claude-imaginary-9"
    emu.configure(model_aliases={"claude-imaginary-9": "claude-imaginary-9-20300101"})
    assert create_message(http, params)["model"] == "claude-imaginary-9-20300101"


def test_max_tokens_cuts_the_answer(http, emu):
    body = create_message(http, structured("I was charged twice, refund please", max_tokens=5))
    assert body["stop_reason"] == "max_tokens"
    assert body["usage"]["output_tokens"] == 5
    text = body["content"][0]["text"]
    assert len(text) <= 20
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(text)  # the JSON was cut, as a real truncated answer would be


def test_stop_sequences_end_the_answer(http, emu):
    params = {
        "model": "claude-haiku-4-5",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "alpha beta gamma"}],
        "stop_sequences": ["beta"],
    }
    body = create_message(http, params)
    assert body["stop_reason"] == "stop_sequence"
    assert body["stop_sequence"] == "beta"
    assert "beta" not in body["content"][0]["text"]


def test_usage_estimates_about_four_characters_per_token(http, emu):
    short = create_message(
        http, {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x" * 40}]}
    )
    long = create_message(
        http, {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x" * 4040}]}
    )
    assert long["usage"]["input_tokens"] - short["usage"]["input_tokens"] == 1000
    assert long["usage"]["cache_creation_input_tokens"] == long["usage"]["cache_read_input_tokens"] == 0


def test_count_tokens_matches_the_usage_total(client, http, emu):
    system = [{"type": "text", "text": "Rules. " * 2000, "cache_control": {"type": "ephemeral"}}]
    params = {
        "model": "claude-sonnet-4-5",
        "messages": [{"role": "user", "content": "hello"}],
        "system": system,
    }
    counted = http.post("/v1/messages/count_tokens", content=orjson.dumps(params))
    MessageTokensCount.model_validate(counted.json())
    total = counted.json()["input_tokens"]
    usage = create_message(http, params | {"max_tokens": 10})["usage"]
    assert (
        usage["input_tokens"] + usage["cache_creation_input_tokens"] + usage["cache_read_input_tokens"]
        == total
    )
    assert client.messages.count_tokens(**params).input_tokens == total
    assert emu.stats()["http_requests"]["count_tokens"] == 2


def cached_system(chars: int, ttl: str | None = None) -> list[dict]:
    cache_control = {"type": "ephemeral"} | ({"ttl": ttl} if ttl else {})
    return [{"type": "text", "text": "Policy text. " * (chars // 13), "cache_control": cache_control}]


def test_messages_cache_write_then_read(http, emu):
    params = {"model": "claude-sonnet-4-5", "max_tokens": 10, "system": cached_system(8000)}
    first = create_message(http, params | {"messages": [{"role": "user", "content": "one"}]})["usage"]
    second = create_message(http, params | {"messages": [{"role": "user", "content": "two"}]})["usage"]
    assert first["cache_creation_input_tokens"] > 1024 and first["cache_read_input_tokens"] == 0
    assert first["cache_creation"] == {
        "ephemeral_5m_input_tokens": first["cache_creation_input_tokens"],
        "ephemeral_1h_input_tokens": 0,
    }
    assert second["cache_read_input_tokens"] == first["cache_creation_input_tokens"]
    assert second["cache_creation_input_tokens"] == 0
    # A different output schema is a different prefix: it writes again.
    third = create_message(
        http,
        params
        | {
            "messages": [{"role": "user", "content": "x"}],
            "output_config": {"format": {"type": "json_schema", "schema": TICKET_SCHEMA}},
        },
    )["usage"]
    assert third["cache_creation_input_tokens"] > 0


def test_cache_breakpoints_on_tools_and_message_blocks(http, emu):
    tool = {"name": "lookup", "description": "Look up. " * 800, "input_schema": {"type": "object"},
            "cache_control": {"type": "ephemeral"}}  # fmt: skip
    base = {"model": "claude-sonnet-4-5", "max_tokens": 10, "tools": [tool]}
    first = create_message(http, base | {"messages": [{"role": "user", "content": "a"}]})["usage"]
    second = create_message(http, base | {"messages": [{"role": "user", "content": "b"}]})["usage"]
    assert first["cache_creation_input_tokens"] > 1024
    assert second["cache_read_input_tokens"] == first["cache_creation_input_tokens"]

    document = {
        "type": "text",
        "text": "Contract clause. " * 1000,
        "cache_control": {"type": "ephemeral", "ttl": "1h"},
    }

    def ask(question: str) -> dict:
        content = [document, {"type": "text", "text": question}]
        params = {
            "model": "claude-sonnet-4-5",
            "max_tokens": 10,
            "messages": [{"role": "user", "content": content}],
        }
        return create_message(http, params)["usage"]

    written, read = ask("Who signs?"), ask("When does it end?")
    assert (
        written["cache_creation"]["ephemeral_1h_input_tokens"]
        == written["cache_creation_input_tokens"]
        > 1024
    )
    assert read["cache_read_input_tokens"] == written["cache_creation_input_tokens"]
    assert read["input_tokens"] < 20  # only the question is outside the cached prefix


def test_prefix_below_the_model_minimum_is_not_cached(http, emu):
    system = cached_system(8000)  # about 2,000 tokens: enough for Sonnet (1,024), not for Haiku 4.5 (4,096)
    for model, cached in (("claude-haiku-4-5", False), ("claude-sonnet-4-5", True)):
        usage = create_message(
            http,
            {
                "model": model,
                "max_tokens": 5,
                "system": system,
                "messages": [{"role": "user", "content": "hi"}],
            },
        )["usage"]
        assert (usage["cache_creation_input_tokens"] > 0) is cached
    emu.configure(min_cacheable_tokens={"": 100})
    usage = create_message(
        http,
        {
            "model": "claude-haiku-4-5",
            "max_tokens": 5,
            "system": system,
            "messages": [{"role": "user", "content": "hi"}],
        },
    )["usage"]
    assert usage["cache_creation_input_tokens"] > 0


def batch_usages(client, emu, requests: list[dict]) -> list[dict]:
    batch = client.messages.batches.create(requests=requests)
    finish(emu)
    lines = sorted(
        client.messages.batches.results(batch.id), key=lambda line: int(line.custom_id.split("-")[1])
    )
    return [line.result.message.usage.model_dump() for line in lines]


def test_batch_caching_first_writes_later_read_with_1h_ttl(client, emu):
    emu.configure(cache_hit_rate=1.0)
    system = cached_system(20_000, ttl="1h")
    requests = [request_item(f"r-{i}", f"ticket {i}", system=system) for i in range(6)]
    usages = batch_usages(client, emu, requests)
    assert usages[0]["cache_creation_input_tokens"] > 4096
    assert (
        usages[0]["cache_creation"]["ephemeral_1h_input_tokens"] == usages[0]["cache_creation_input_tokens"]
    )
    assert all(u["cache_read_input_tokens"] == usages[0]["cache_creation_input_tokens"] for u in usages[1:])
    assert all(u["service_tier"] == "batch" for u in usages)
    # A later batch with the same prefix finds it warm from the start.
    again = batch_usages(client, emu, [request_item(f"s-{i}", "x", system=system) for i in range(2)])
    assert again[0]["cache_read_input_tokens"] > 0


def test_batch_cache_hit_rate_makes_a_seeded_share_miss(client, emu):
    emu.configure(cache_hit_rate=0.5)
    system = cached_system(20_000)
    requests = [request_item(f"r-{i}", f"ticket {i}", system=system) for i in range(200)]
    usages = batch_usages(client, emu, requests)
    writes = sum(u["cache_creation_input_tokens"] > 0 for u in usages[1:])
    reads = sum(u["cache_read_input_tokens"] > 0 for u in usages[1:])
    assert writes + reads == 199
    assert 60 < writes < 140
    emu.reset()
    emu.configure(cache_hit_rate=0.5)
    assert batch_usages(client, emu, requests) == usages  # same seed, same answer


def test_custom_responder_and_responder_errors(emu):
    seen: list[ResponseContext] = []

    def responder(params: dict, context: ResponseContext) -> dict:
        seen.append(context)
        text = params["messages"][0]["content"]
        if text == "fail":
            raise ResponderError("overloaded_error", "too busy")
        if text == "garbage":
            return 42  # type: ignore[return-value]  # a broken responder
        return {"content": [{"type": "text", "text": text.upper()}], "usage": {"output_tokens": 7}}

    with EmulatorServer(api_key=API_KEY, time_scale=60, processing_seconds=30, responder=responder) as server:
        with anthropic.Anthropic(api_key=API_KEY, base_url=server.base_url, max_retries=0) as client:
            message = client.messages.create(
                model="claude-haiku-4-5", max_tokens=50, messages=[{"role": "user", "content": "shout"}]
            )
            assert message.content[0].text == "SHOUT"
            assert message.usage.output_tokens == 7
            with pytest.raises(anthropic.APIStatusError) as caught:
                client.messages.create(
                    model="m", max_tokens=5, messages=[{"role": "user", "content": "fail"}]
                )
            assert caught.value.status_code == 529
            batch = client.messages.batches.create(
                requests=[
                    request_item("ok", "quiet"),
                    request_item("bad", "fail"),
                    request_item("broken", "garbage"),
                ]
            )
            server.advance(120)
            results = {line.custom_id: line.result for line in client.messages.batches.results(batch.id)}
    assert results["ok"].message.content[0].text == "QUIET"
    assert results["bad"].type == "errored"
    assert results["bad"].error.error.type == "overloaded_error"
    assert results["broken"].error.error.type == "api_error"
    assert "responder failed" in results["broken"].error.error.message
    batch_context = next(c for c in seen if c.custom_id == "ok")
    assert batch_context.service_tier == "batch" and batch_context.batch_id == batch.id
    assert batch_context.model == "claude-haiku-4-5-20251001" and batch_context.request_index == 0
