"""Shared constants and helpers for the emulator tests."""

from __future__ import annotations

import re

from claude_batch.emulator import EmulatorServer

API_KEY = "sk-emulator-tests-0123456789"
TIME_SCALE = 60.0
PROCESSING_SECONDS = 30.0
HEADERS = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")


def request_item(custom_id: str, text: str = "Hello there", **params: object) -> dict:
    """One batch request item with sensible default params."""
    body = {"model": "claude-haiku-4-5", "max_tokens": 256, "messages": [{"role": "user", "content": text}]}
    body.update(params)
    return {"custom_id": custom_id, "params": body}


def items(count: int, prefix: str = "req", **params: object) -> list[dict]:
    return [request_item(f"{prefix}-{index}", f"Message number {index}", **params) for index in range(count)]


def finish(emu: EmulatorServer) -> None:
    """Move emulated time past the processing window of batches created so far."""
    emu.advance(PROCESSING_SECONDS * 2)
