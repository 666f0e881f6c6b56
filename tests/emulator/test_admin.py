"""The admin API, the in-process server and the command line."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import anthropic
import httpx
import orjson
import pytest
from claude_batch.emulator import EmulatorServer

from .helpers import API_KEY, RFC3339, finish, items

STATS_KEYS = {
    "batches_created", "batches_deleted", "requests_received", "requests_processing", "results_served",
    "results_downloads", "messages_created", "faults_injected", "http_requests", "batches_by_status",
    "prompt_cache_entries", "emulated_now", "api_now", "time_scale", "results_lines_pending",
    "results_stored_bytes",
}  # fmt: skip


def test_stats_count_what_happened(client, emu, http):
    first = client.messages.batches.create(requests=items(3))
    client.messages.batches.create(requests=items(4))
    client.messages.batches.list()
    client.messages.create(
        model="claude-haiku-4-5", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
    )
    stats = http.get("/_emulator/stats").json()
    assert set(stats) == STATS_KEYS
    assert stats["batches_created"] == 2
    assert stats["requests_received"] == 7
    assert stats["requests_processing"] == 7
    assert stats["messages_created"] == 1
    assert stats["batches_by_status"] == {"in_progress": 2, "canceling": 0, "ended": 0}
    assert stats["http_requests"] == {
        "create": 2, "retrieve": 0, "list": 1, "cancel": 0, "delete": 0, "results": 0, "messages": 1,
        "count_tokens": 0,
    }  # fmt: skip
    finish(emu)
    lines = list(client.messages.batches.results(first.id))
    stats = emu.stats()
    assert stats["results_served"] == len(lines) == 3
    assert stats["batches_by_status"] == {"in_progress": 0, "canceling": 0, "ended": 2}
    assert stats["requests_processing"] == 0
    assert stats["http_requests"]["retrieve"] == 1 and stats["http_requests"]["results"] == 1
    assert RFC3339.match(stats["emulated_now"])


def test_admin_api_requires_the_key(emu):
    for method, path in (("GET", "/_emulator/stats"), ("GET", "/_emulator/config"),
                         ("POST", "/_emulator/reset"), ("POST", "/_emulator/config"),
                         ("POST", "/_emulator/advance")):  # fmt: skip
        response = httpx.request(method, f"{emu.base_url}{path}", headers={"x-api-key": "sk-wrong"})
        assert response.status_code == 401, path
        assert response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{emu.base_url}/_emulator/health").json() == {"status": "ok"}


def test_reset_over_http_forgets_batches_counters_and_faults(client, emu, http):
    emu.configure(faults={"http": [{"endpoint": "retrieve", "status": 500}]}, cache_hit_rate=0.1)
    batch = client.messages.batches.create(requests=items(2))
    assert http.post("/_emulator/reset").json() == {"status": "reset"}
    assert emu.stats()["batches_created"] == 0
    with pytest.raises(anthropic.NotFoundError):  # the batch is gone and the 500 fault with it
        client.messages.batches.retrieve(batch.id)
    config = http.get("/_emulator/config").json()
    assert config["faults"]["http"] == [] and config["cache_hit_rate"] == 0.9
    assert config["time_scale"] == 60.0 and config["seed"] == 0


def test_advance_over_http_moves_emulated_time(client, emu, http):
    batch = client.messages.batches.create(requests=items(1))
    before = datetime.fromisoformat(emu.stats()["emulated_now"])
    response = http.post("/_emulator/advance", content=orjson.dumps({"seconds": 3600}))
    after = datetime.fromisoformat(response.json()["emulated_now"])
    assert timedelta(hours=1) <= after - before < timedelta(hours=1, minutes=5)
    assert client.messages.batches.retrieve(batch.id).processing_status == "ended"
    assert http.post("/_emulator/advance", content=orjson.dumps({"seconds": -5})).status_code == 400


def test_config_rejects_unknown_keys_and_bad_values(http, emu):
    assert http.post("/_emulator/config", content=b'{"no_such_setting": 1}').status_code == 400
    assert http.post("/_emulator/config", content=b'{"time_scale": 0}').status_code == 400
    assert http.post("/_emulator/config", content=b'{"cache_hit_rate": 1.5}').status_code == 400
    response = http.post("/_emulator/config", content=b'{"processing_seconds": 5, "seed": 3}')
    assert response.json()["processing_seconds"] == 5.0 and response.json()["seed"] == 3
    with pytest.raises(ValueError):
        emu.configure(max_requests_per_batch=0)


def test_in_process_server_picks_a_free_port_and_stops(emu):
    server = EmulatorServer(api_key="k", port=0, processing_seconds=0.0)
    with server:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", server.base_url) and server.port != emu.port
        with anthropic.Anthropic(api_key="k", base_url=server.base_url, max_retries=0) as client:
            batch = client.messages.batches.create(requests=items(1))
            assert batch.processing_status == "in_progress"  # a create always answers in_progress
            assert client.messages.batches.retrieve(batch.id).processing_status == "ended"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.base_url}/_emulator/health", timeout=2)


def test_command_line_server(tmp_path):
    executable = Path(sys.executable).parent / "claude-batch-emulator"
    command = [str(executable), "--host", "127.0.0.1", "--port", "0", "--api-key", API_KEY,
               "--time-scale", "3600", "--processing-seconds", "60", "--seed", "5",
               "--fault", "count_tokens:529:1:1", "--cache-hit-rate", "0.5",
               "--no-precompute-results"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        match = re.fullmatch(r"claude-batch-emulator listening on (http://127\.0\.0\.1:\d+)\n", line)
        assert match, line
        base_url = match.group(1)
        with anthropic.Anthropic(api_key=API_KEY, base_url=base_url, max_retries=0) as client:
            with pytest.raises(anthropic.OverloadedError):
                client.messages.count_tokens(model="m", messages=[{"role": "user", "content": "hi"}])
            batch = client.messages.batches.create(requests=items(2))
            config = httpx.get(f"{base_url}/_emulator/config", headers={"x-api-key": API_KEY}).json()
            assert (
                config["cache_hit_rate"] == 0.5
                and config["seed"] == 5
                and config["precompute_results"] is False
            )
            for _ in range(200):  # 60 emulated seconds at 3600x: about 17 ms
                if client.messages.batches.retrieve(batch.id).processing_status == "ended":
                    break
            assert len(list(client.messages.batches.results(batch.id))) == 2
    finally:
        process.terminate()
        process.wait(10)


def test_command_line_rejects_a_bad_fault():
    executable = Path(sys.executable).parent / "claude-batch-emulator"
    result = subprocess.run(
        [str(executable), "--port", "0", "--fault", "create:999"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "unsupported fault status 999" in result.stderr
