"""Fixtures for the batch core: an Airflow ``anthropic`` connection pointing at the emulator."""

from __future__ import annotations


def make_requests(count: int, prefix: str = "r", text: str = "My invoice was charged twice") -> list[dict]:
    return [
        {
            "custom_id": f"{prefix}{i}",
            "params": {
                "model": "claude-haiku-4-5",
                "max_tokens": 32,
                "messages": [{"role": "user", "content": f"{text} #{i}"}],
            },
        }
        for i in range(count)
    ]
