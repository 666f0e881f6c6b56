"""Fixtures for the emulator's own tests: one server for the session, reset before each test.

Tests drive it over HTTP with the official SDK (sync and async) and with raw httpx requests,
and move emulated time with ``emu.advance`` instead of sleeping.
"""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import httpx
import pytest
from claude_batch.emulator import EmulatorServer

from .helpers import API_KEY, HEADERS, PROCESSING_SECONDS, TIME_SCALE


@pytest.fixture(scope="session")
def emu_server() -> Iterator[EmulatorServer]:
    with EmulatorServer(
        api_key=API_KEY,
        time_scale=TIME_SCALE,
        processing_seconds=PROCESSING_SECONDS,
        host="127.0.0.1",
        port=0,
        seed=0,
    ) as server:
        yield server


@pytest.fixture
def emu(emu_server: EmulatorServer) -> Iterator[EmulatorServer]:
    """The session's emulator with no batches, no faults and zeroed counters.

    Emulated time runs at wall-clock speed here and tests move it with ``advance``, so a slow or
    busy machine cannot push a batch past a boundary between two steps of a test.
    """
    emu_server.reset()
    emu_server.configure(time_scale=1.0)
    yield emu_server
    emu_server.reset()


@pytest.fixture
def client(emu: EmulatorServer) -> Iterator[anthropic.Anthropic]:
    """The official sync client, without retries so every HTTP answer is seen as it is."""
    with anthropic.Anthropic(api_key=API_KEY, base_url=emu.base_url, max_retries=0) as sdk:
        yield sdk


@pytest.fixture
def http(emu: EmulatorServer) -> Iterator[httpx.Client]:
    """A plain HTTP client with the API key and version headers set."""
    with httpx.Client(base_url=emu.base_url, headers=HEADERS, timeout=30) as raw:
        yield raw
