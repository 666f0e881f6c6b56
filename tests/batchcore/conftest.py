"""Fixtures for the batch core: an Airflow ``anthropic`` connection pointing at the emulator."""

from __future__ import annotations

import json

import pytest

from tests.conftest import EMULATOR_API_KEY


@pytest.fixture
def anthropic_conn(emulator, monkeypatch):
    """``anthropic_default`` as an environment connection to the emulator; yields the emulator."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_ANTHROPIC_DEFAULT",
        json.dumps(
            {
                "conn_type": "anthropic",
                "host": emulator.base_url,
                "password": EMULATOR_API_KEY,
                "extra": {"anthropic_client_kwargs": {"timeout": 30}},
            }
        ),
    )
    return emulator


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
