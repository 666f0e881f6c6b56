"""Checks on batch request items and Messages params, with API-style error messages.

Item shape (custom_id, params an object) is checked synchronously when a batch is created and
fails the whole create with 400. The content of ``params`` is checked the way the API does it
for batches: asynchronously, so a bad params object ends as an ``errored`` result with
``invalid_request_error`` (the same checks answer 400 on ``POST /v1/messages``).
Messages name the field by its path, e.g. ``requests.17.custom_id: ...`` or ``max_tokens: ...``.
"""

from __future__ import annotations

import re
from typing import Any

CUSTOM_ID_PATTERN = "^[a-zA-Z0-9_-]{1,64}$"
CUSTOM_ID_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_ROLES = ("user", "assistant")


class ItemError(ValueError):
    """A malformed request item; the message already names the item's path."""


def check_item(index: int, item: Any) -> tuple[str, dict]:
    """The (custom_id, params) of one item of ``requests``, or ItemError."""
    where = f"requests.{index}"
    if not isinstance(item, dict):
        raise ItemError(f"{where}: Input should be a valid dictionary")
    if "custom_id" not in item:
        raise ItemError(f"{where}.custom_id: Field required")
    custom_id = item["custom_id"]
    if not isinstance(custom_id, str):
        raise ItemError(f"{where}.custom_id: Input should be a valid string")
    if not CUSTOM_ID_RE.fullmatch(custom_id):
        raise ItemError(f"{where}.custom_id: String should match pattern '{CUSTOM_ID_PATTERN}'")
    if "params" not in item:
        raise ItemError(f"{where}.params: Field required")
    params = item["params"]
    if not isinstance(params, dict):
        raise ItemError(f"{where}.params: Input should be a valid dictionary")
    extra = set(item) - {"custom_id", "params"}
    if extra:
        raise ItemError(f"{where}.{sorted(extra)[0]}: Extra inputs are not permitted")
    return custom_id, params


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_blocks(path: str, blocks: list) -> str | None:
    for position, block in enumerate(blocks):
        if not isinstance(block, dict):
            return f"{path}.{position}: Input should be a valid dictionary"
        if not isinstance(block.get("type"), str):
            return f"{path}.{position}.type: Field required"
        if block["type"] == "text" and not isinstance(block.get("text"), str):
            return f"{path}.{position}.text: Field required"
    return None


def params_error(params: dict, *, in_batch: bool, count_tokens: bool = False) -> str | None:
    """Why ``params`` is not a valid Messages request, or None when it is.

    The checks run in a fixed order and the first failure is reported: ``head_error`` (model,
    max_tokens), then ``messages_error``, then ``tail_error`` (everything else). The head and
    tail look only at the params other than ``messages``, so a batch checks them once for all
    requests that share those params.
    """
    return (
        head_error(params, count_tokens=count_tokens)
        or messages_error(params)
        or tail_error(params, in_batch=in_batch)
    )


def head_error(params: dict, *, count_tokens: bool = False) -> str | None:
    """The model and max_tokens checks."""
    model = params.get("model")
    if "model" not in params:
        return "model: Field required"
    if not isinstance(model, str) or not model:
        return "model: Input should be a valid string"

    if not count_tokens:
        if "max_tokens" not in params:
            return "max_tokens: Field required"
        max_tokens = params["max_tokens"]
        if not _is_int(max_tokens):
            return "max_tokens: Input should be a valid integer"
        if max_tokens < 1:
            return "max_tokens: Input should be greater than or equal to 1"
    return None


def messages_error(params: dict) -> str | None:
    """The checks of ``messages``."""
    if "messages" not in params:
        return "messages: Field required"
    messages = params["messages"]
    if not isinstance(messages, list):
        return "messages: Input should be a valid list"
    if not messages:
        return "messages: at least one message is required"
    for index, message in enumerate(messages):
        # The usual message first, checked without building its path.
        if type(message) is dict and message.get("role") in _ROLES and type(message.get("content")) is str:
            continue
        path = f"messages.{index}"
        if not isinstance(message, dict):
            return f"{path}: Input should be a valid dictionary"
        if message.get("role") not in _ROLES:
            return f"{path}.role: Input should be 'user' or 'assistant'"
        if "content" not in message:
            return f"{path}.content: Field required"
        content = message["content"]
        if isinstance(content, list):
            problem = _check_blocks(f"{path}.content", content)
            if problem:
                return problem
        elif not isinstance(content, str):
            return f"{path}.content: Input should be a valid string or list of content blocks"
    return None


def tail_error(params: dict, *, in_batch: bool) -> str | None:
    """The checks after ``messages``: system, stream, sampling, stop sequences, tools, output_config."""
    system = params.get("system")
    if system is not None:
        if isinstance(system, list):
            problem = _check_blocks("system", system)
            if problem:
                return problem
        elif not isinstance(system, str):
            return "system: Input should be a valid string or list of text blocks"

    if params.get("stream") is True:
        if in_batch:
            return "stream: Streaming is not supported in batch requests"
        return "stream: streaming responses are not supported by the claude-batch emulator"

    for name, upper in (("temperature", 1.0), ("top_p", 1.0)):
        if name in params and params[name] is not None:
            value = params[name]
            if not _is_number(value) or not 0.0 <= value <= upper:
                return f"{name}: Input should be a number between 0 and {upper:g}"
    if "top_k" in params and params["top_k"] is not None:
        if not _is_int(params["top_k"]) or params["top_k"] < 0:
            return "top_k: Input should be a non-negative integer"
    stop_sequences = params.get("stop_sequences")
    if stop_sequences is not None and (
        not isinstance(stop_sequences, list) or not all(isinstance(s, str) for s in stop_sequences)
    ):
        return "stop_sequences: Input should be a valid list of strings"

    return _tools_error(params) or _output_config_error(params)


def _tools_error(params: dict) -> str | None:
    tools = params.get("tools")
    names: set[str] = set()
    if tools is not None:
        if not isinstance(tools, list):
            return "tools: Input should be a valid list"
        for index, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                return f"tools.{index}.name: Field required"
            if "type" not in tool and not isinstance(tool.get("input_schema"), dict):
                return f"tools.{index}.input_schema: Field required"
            names.add(tool["name"])
    tool_choice = params.get("tool_choice")
    if tool_choice is not None:
        if not isinstance(tool_choice, dict) or tool_choice.get("type") not in (
            "auto",
            "any",
            "tool",
            "none",
        ):
            return "tool_choice: Input should be an object with type 'auto', 'any', 'tool' or 'none'"
        if tool_choice["type"] == "tool" and tool_choice.get("name") not in names:
            return f"tool_choice.name: tool {tool_choice.get('name')!r} is not in tools"
        if tool_choice["type"] == "any" and not names:
            return "tool_choice: type 'any' requires tools"
    return None


def _output_config_error(params: dict) -> str | None:
    config = params.get("output_config")
    if config is None:
        return None
    if not isinstance(config, dict):
        return "output_config: Input should be a valid dictionary"
    fmt = config.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return "output_config.format.type: Input should be 'json_schema'"
    if not isinstance(fmt.get("schema"), dict):
        return "output_config.format.schema: Input should be a valid dictionary"
    return None
