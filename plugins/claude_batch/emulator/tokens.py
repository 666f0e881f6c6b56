"""Token estimates and prompt-cache prefixes, computed from request params.

Tokens are estimated at about 4 characters each; images and documents count as a fixed amount.
The prompt is read in the order the API caches it: tools, then system, then messages. A block
carrying ``cache_control`` is a breakpoint; the cacheable prefix runs up to the last
breakpoint, and its key covers everything in it plus the model and the output schema (changing
the schema invalidates the cache).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 3  # role markers and separators around each message
TOKENS_PER_IMAGE = 1_600
TOKENS_PER_DOCUMENT = 3_000


def text_tokens(text: str) -> int:
    return -(-len(text) // CHARS_PER_TOKEN)


def json_tokens(value: Any) -> int:
    try:
        return -(-len(orjson.dumps(value)) // CHARS_PER_TOKEN)
    except TypeError:
        return text_tokens(str(value))


def block_tokens(block: Any) -> int:
    """Estimated tokens of one content block (or a bare string)."""
    if isinstance(block, str):
        return text_tokens(block)
    if not isinstance(block, dict):
        return json_tokens(block)
    kind = block.get("type")
    if kind == "text":
        text = block.get("text")
        return text_tokens(text) if isinstance(text, str) else 0
    if kind == "image":
        return TOKENS_PER_IMAGE
    if kind == "document":
        source = block.get("source")
        if isinstance(source, dict) and isinstance(source.get("data"), str) and source.get("type") == "text":
            return text_tokens(source["data"])
        return TOKENS_PER_DOCUMENT
    if kind == "tool_use":
        return text_tokens(str(block.get("name", ""))) + json_tokens(block.get("input", {}))
    if kind == "tool_result":
        content = block.get("content")
        if isinstance(content, list):
            return sum(block_tokens(part) for part in content)
        return block_tokens(content) if content is not None else 0
    if kind in ("thinking", "redacted_thinking"):
        return text_tokens(str(block.get("thinking") or block.get("data") or ""))
    return json_tokens(block)


@dataclass(slots=True)
class PromptShape:
    """How a request's input splits for billing: total tokens and its cacheable prefix."""

    total_tokens: int
    cache_prefix_tokens: int = 0  # tokens up to and including the last cache_control breakpoint
    cache_1h_tokens: int = 0  # the part of the prefix whose breakpoint asks for the 1-hour cache
    cache_key: bytes | None = None


def output_schema(params: dict) -> Any:
    """The JSON schema the answer must follow, from output_config.format or the beta output_format."""
    config = params.get("output_config")
    formats = (config.get("format") if isinstance(config, dict) else None, params.get("output_format"))
    for fmt in formats:
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            return fmt.get("schema")
    return None


Segment = tuple[int, Any, Any]  # (tokens, cache_control, identity) of one cacheable unit


def _template_segments(params: dict) -> list[Segment]:
    """Segments of the part of a request before its messages: tools, then system."""
    segments: list[Segment] = []
    tools = params.get("tools")
    if isinstance(tools, list):
        for tool in tools:
            cache_control = tool.get("cache_control") if isinstance(tool, dict) else None
            segments.append((json_tokens(tool), cache_control, tool))
    system = params.get("system")
    if isinstance(system, str):
        segments.append((text_tokens(system), None, system))
    elif isinstance(system, list):
        for block in system:
            cache_control = block.get("cache_control") if isinstance(block, dict) else None
            segments.append((block_tokens(block), cache_control, block))
    return segments


def _message_segments(messages: Any) -> list[Segment]:
    segments: list[Segment] = []
    if not isinstance(messages, list):
        return segments
    for message in messages:
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        content = message.get("content")
        if isinstance(content, str):
            segments.append((text_tokens(content) + TOKENS_PER_MESSAGE, None, (role, content)))
            continue
        if not isinstance(content, list):
            continue
        for position, block in enumerate(content):
            cache_control = block.get("cache_control") if isinstance(block, dict) else None
            overhead = TOKENS_PER_MESSAGE if position == 0 else 0
            segments.append((block_tokens(block) + overhead, cache_control, (role, block)))
    return segments


def _prefix(segments: list[Segment], fixed_tokens: int, model: Any, schema: Any) -> PromptShape:
    """Total tokens and the prefix up to the last breakpoint among ``segments``."""
    total = fixed_tokens + sum(tokens for tokens, _, _ in segments)
    last_breakpoint = -1
    for index, (_, cache_control, _) in enumerate(segments):
        if isinstance(cache_control, dict):
            last_breakpoint = index
    if last_breakpoint < 0:
        return PromptShape(total_tokens=total)
    prefix_tokens = one_hour_tokens = since_last_breakpoint = 0
    for tokens, cache_control, _ in segments[: last_breakpoint + 1]:
        prefix_tokens += tokens
        since_last_breakpoint += tokens
        if isinstance(cache_control, dict):
            if cache_control.get("ttl") == "1h":
                one_hour_tokens += since_last_breakpoint
            since_last_breakpoint = 0
    identity = [model, schema, [segment[2] for segment in segments[: last_breakpoint + 1]]]
    try:
        serialized = orjson.dumps(identity, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        serialized = repr(identity).encode()
    return PromptShape(
        total_tokens=total,
        cache_prefix_tokens=prefix_tokens,
        cache_1h_tokens=one_hour_tokens,
        cache_key=hashlib.blake2b(serialized, digest_size=16).digest(),
    )


@dataclass(slots=True)
class TemplateShape:
    """What the non-message part of a request contributes; the same for all requests sharing it."""

    segments: list[Segment]
    fixed_tokens: int  # 1 + the output schema
    model: Any
    schema: Any
    prefix: PromptShape  # the prefix when no message block carries cache_control


def template_shape(params: dict) -> TemplateShape:
    schema = output_schema(params)
    fixed = 1 + (json_tokens(schema) if schema is not None else 0)
    segments = _template_segments(params)
    model = params.get("model")
    return TemplateShape(segments, fixed, model, schema, _prefix(segments, fixed, model, schema))


def analyse_prompt(params: dict, template: TemplateShape | None = None) -> PromptShape:
    """Total input tokens and the cache prefix of a (valid) request.

    ``template`` is ``template_shape(params)``, passed in when many requests share it.
    """
    template = template or template_shape(params)
    messages = params.get("messages")
    message_tokens = uncached_message_tokens(messages)
    if message_tokens is not None:  # no breakpoint in the messages: the template's prefix is the prefix
        prefix = template.prefix
        return PromptShape(
            total_tokens=prefix.total_tokens + message_tokens,
            cache_prefix_tokens=prefix.cache_prefix_tokens,
            cache_1h_tokens=prefix.cache_1h_tokens,
            cache_key=prefix.cache_key,
        )
    message_segments = _message_segments(messages)
    return _prefix(
        template.segments + message_segments, template.fixed_tokens, template.model, template.schema
    )


def uncached_message_tokens(messages: Any) -> int | None:
    """The messages' tokens (as ``_message_segments`` counts them), or None if a block has cache_control."""
    if not isinstance(messages, list):
        return 0
    total = 0
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            total += -(-len(content) // CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE
        elif isinstance(content, list):
            for position, block in enumerate(content):
                if isinstance(block, dict) and isinstance(block.get("cache_control"), dict):
                    return None
                total += block_tokens(block) + (TOKENS_PER_MESSAGE if position == 0 else 0)
    return total
