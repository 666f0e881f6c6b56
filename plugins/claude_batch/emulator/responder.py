"""What the emulated model answers, and the usage figures that come with it.

The responder protocol
----------------------
A responder is any callable ``responder(params, context) -> dict``:

- ``params`` is the request's Messages params (a dict; treat it as read-only, nested objects
  may be shared between requests of one batch);
- ``context`` is a ``ResponseContext`` (custom_id, batch_id, request_index, service_tier,
  resolved model, estimated input tokens);
- it returns a Message-like dict; only ``content`` (a list of content blocks) is required.
  The emulator fills in ``id``, ``type``, ``role``, ``model``, ``stop_reason`` (``tool_use``
  when there is a tool_use block, else ``end_turn``), ``stop_sequence``, ``stop_details`` and
  ``container`` (null unless returned) and ``usage``; a returned ``usage`` dict overrides the
  computed figures key by key. Text blocks get ``citations: null`` and tool_use blocks
  ``caller: {"type": "direct"}`` unless they carry their own. The emulator then
  applies ``stop_sequences`` and ``max_tokens`` (text is cut, ``stop_reason`` becomes
  ``max_tokens``), so a custom responder does not need to;
- to make a request fail, raise ``ResponderError(error_type, message)``: the batch result is
  ``errored`` with that error (``POST /v1/messages`` answers the matching HTTP status).

``DefaultResponder`` answers structured requests (``output_config.format`` json_schema, the beta
``output_format``, or a forced tool through ``tool_choice``) with JSON that satisfies the schema
and takes its values from the user's text (see ``answers.py``); other requests get a short text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from .answers import SchemaAnswerer
from .ids import derived_id
from .tokens import json_tokens, output_schema, text_tokens

CACHE_NONE = 0
CACHE_WRITE = 1
CACHE_READ = 2


@dataclass(slots=True, frozen=True)
class ResponseContext:
    """What a responder knows about the request besides its params."""

    custom_id: str | None
    batch_id: str | None
    request_index: int | None
    service_tier: str  # "batch" for batch results, "standard" for POST /v1/messages
    model: str  # the dated snapshot the alias resolved to
    input_tokens: int  # estimated total input tokens (uncached + cache write + cache read)
    message_id: str


class Responder(Protocol):
    def __call__(self, params: dict, context: ResponseContext) -> dict: ...


class ResponderError(Exception):
    """Raised by a responder to make one request fail with an API error."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message


def user_text(params: dict) -> str:
    """The text of the last user message (what classification labels should come from)."""
    messages = params.get("messages") or []
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _content_text(message.get("content"))
    return ""


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    parts = []
    for block in content:
        if isinstance(block, dict):
            if block.get("type") == "text" and isinstance(block.get("text"), str):
                parts.append(block["text"])
            elif block.get("type") == "tool_result":
                parts.append(_content_text(block.get("content")))
    return "\n".join(parts)


def forced_tool(params: dict) -> dict | None:
    """The tool the request forces (tool_choice type tool, or any with tools), else None."""
    tools = params.get("tools")
    choice = params.get("tool_choice")
    if not isinstance(tools, list) or not isinstance(choice, dict):
        return None
    if choice.get("type") == "tool":
        return next((t for t in tools if isinstance(t, dict) and t.get("name") == choice.get("name")), None)
    if choice.get("type") == "any":
        return next((t for t in tools if isinstance(t, dict) and "name" in t), None)
    return None


class DefaultResponder:
    """Deterministic, schema-aware answers; see the module docstring."""

    def __init__(self, label_hints: dict[str, tuple[str, ...]] | None = None) -> None:
        self.label_hints = label_hints
        self._resolved: dict = {}  # the schemas' resolved parts (params are read-only: see above)

    def __call__(self, params: dict, context: ResponseContext) -> dict:
        text = user_text(params)
        tool = forced_tool(params)
        if tool is not None:
            answer = SchemaAnswerer(text, self.label_hints, self._resolved).answer(
                tool.get("input_schema") or {"type": "object"}
            )
            if not isinstance(answer, dict):
                answer = {"value": answer}
            block = {
                "type": "tool_use",
                "id": derived_id("toolu_", context.message_id),
                "name": tool["name"],
                "input": answer,
            }
            return {"content": [block], "stop_reason": "tool_use"}
        schema = output_schema(params)
        if isinstance(schema, dict):
            answer = SchemaAnswerer(text, self.label_hints, self._resolved).answer(schema)
            return {"content": [{"type": "text", "text": orjson.dumps(answer).decode()}]}
        return {"content": [{"type": "text", "text": _plain_reply(text)}]}


def _plain_reply(text: str) -> str:
    excerpt = " ".join(text.split())[:160]
    if not excerpt:
        return "Hello! This is an emulated reply."
    return f"Emulated reply. You wrote: {excerpt}"


def base_usage(
    *,
    total_tokens: int,
    cache_outcome: int,
    cache_prefix_tokens: int,
    cache_1h_tokens: int,
    service_tier: str,
    inference_geo: str | None = None,
) -> dict:
    """Usage before output: input split into uncached, cache-write and cache-read tokens."""
    written = cache_prefix_tokens if cache_outcome == CACHE_WRITE else 0
    read = cache_prefix_tokens if cache_outcome == CACHE_READ else 0
    written_1h = min(cache_1h_tokens, written)
    return {
        "input_tokens": max(total_tokens - written - read, 0),
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": read,
        "cache_creation": {
            "ephemeral_5m_input_tokens": written - written_1h,
            "ephemeral_1h_input_tokens": written_1h,
        },
        "output_tokens": 0,
        "output_tokens_details": {"thinking_tokens": 0},
        "server_tool_use": None,  # no server tools (web search, web fetch) run in the emulator
        "service_tier": service_tier,
        "inference_geo": inference_geo,
    }


def requested_inference_geo(params: dict) -> str | None:
    """The ``inference_geo`` a request asked for (the usage reports it back), else None."""
    geo = params.get("inference_geo")
    return geo if isinstance(geo, str) else None


def _block_output_tokens(block: dict) -> int:
    if block.get("type") == "text":
        return text_tokens(block.get("text") or "")
    if block.get("type") == "tool_use":
        return 8 + json_tokens(block.get("input", {}))
    if block.get("type") == "thinking":
        return text_tokens(block.get("thinking") or "")
    return json_tokens(block)


# What the API reports with stop_reason "refusal" when it gives no category or explanation.
_REFUSAL_DETAILS = {"type": "refusal", "category": None, "explanation": None}


def finish_message(reply: dict, params: dict, context: ResponseContext, usage: dict) -> dict:
    """A complete Message dict from a responder's reply: defaults, stop sequences, max_tokens, usage."""
    content = [dict(block) for block in reply.get("content") or []]
    stop_reason = reply.get("stop_reason")
    stop_sequence = reply.get("stop_sequence")

    if stop_reason is None:
        for sequence in params.get("stop_sequences") or []:
            for index, block in enumerate(content):
                position = block.get("text", "").find(sequence) if block.get("type") == "text" else -1
                if sequence and position >= 0:
                    block["text"] = block["text"][:position]
                    del content[index + 1 :]
                    stop_reason, stop_sequence = "stop_sequence", sequence
                    break
            if stop_reason:
                break

    budget = int(params.get("max_tokens") or 1)
    output_tokens = 0
    for index, block in enumerate(content):
        tokens = _block_output_tokens(block)
        if output_tokens + tokens <= budget:
            output_tokens += tokens
            continue
        # Over max_tokens: cut here, as the model would stop mid-answer (a JSON answer gets cut too).
        remaining = budget - output_tokens
        if block.get("type") == "text":
            block["text"] = block["text"][: remaining * 4]
        elif block.get("type") == "tool_use":
            block["input"] = {}
        del content[index + 1 :]
        output_tokens = budget
        stop_reason, stop_sequence = "max_tokens", None
        break

    if stop_reason is None:
        stop_reason = "tool_use" if any(b.get("type") == "tool_use" for b in content) else "end_turn"

    thinking_tokens = 0
    for block in content:
        kind = block.get("type")
        if kind == "text":
            block.setdefault("citations", None)
        elif kind == "tool_use":
            block.setdefault("caller", {"type": "direct"})
        elif kind == "thinking":
            thinking_tokens += _block_output_tokens(block)

    usage = dict(usage)
    usage["output_tokens"] = max(output_tokens, 1)
    usage["output_tokens_details"] = {"thinking_tokens": min(thinking_tokens, usage["output_tokens"])}
    usage.update(reply.get("usage") or {})
    return {
        "id": reply.get("id") or context.message_id,
        "type": "message",
        "role": "assistant",
        "model": reply.get("model") or context.model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "stop_details": reply.get(
            "stop_details", dict(_REFUSAL_DETAILS) if stop_reason == "refusal" else None
        ),
        "usage": usage,
        "container": reply.get("container"),
    }


class PromptCache:
    """Which cache prefixes are warm, by key, until an emulated expiry time."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self._expiry_by_key: dict[bytes, float] = {}
        self._max_entries = max_entries

    def is_warm(self, key: bytes, now: float) -> bool:
        expiry = self._expiry_by_key.get(key)
        return expiry is not None and expiry > now

    def write(self, key: bytes, expires_at: float, now: float) -> None:
        if key not in self._expiry_by_key and len(self._expiry_by_key) >= self._max_entries:
            self._expiry_by_key = {k: e for k, e in self._expiry_by_key.items() if e > now}
            while len(self._expiry_by_key) >= self._max_entries:
                del self._expiry_by_key[next(iter(self._expiry_by_key))]
        self._expiry_by_key[key] = max(expires_at, self._expiry_by_key.get(key, 0.0))

    def clear(self) -> None:
        self._expiry_by_key.clear()

    def __len__(self) -> int:
        return len(self._expiry_by_key)
