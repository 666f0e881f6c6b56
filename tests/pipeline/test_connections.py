"""DuckDB under a multi-process executor: tasks in separate processes take the file in turn."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import duckdb
import pytest
from claude_batch.connections import duckdb_connection
from claude_batch.warehouse import WarehouseError

HOLD = textwrap.dedent(
    """
    import sys, time
    from claude_batch.connections import duckdb_connection
    path, name, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
    with duckdb_connection(path, timeout=60) as conn:
        print("open", flush=True)
        conn.execute("CREATE TABLE IF NOT EXISTS writes (task VARCHAR, written_at DOUBLE)")
        conn.execute("INSERT INTO writes VALUES (?, ?)", [name, time.time()])
        time.sleep(hold)
    """
)


def start(path, name: str, hold: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path), name, str(hold)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_two_processes_writing_one_duckdb_file_take_turns(tmp_path):
    path = tmp_path / "warehouse.duckdb"
    first = start(path, "first", 1.5)
    assert first.stdout.readline().strip() == b"open"  # the first task holds the file
    second = start(path, "second", 0.0)
    for process in (first, second):
        _, err = process.communicate(timeout=60)
        assert process.returncode == 0, err.decode()
    with duckdb.connect(str(path)) as conn:
        rows = conn.execute("SELECT task FROM writes ORDER BY written_at").fetchall()
    assert rows == [("first",), ("second",)]


def test_without_the_turn_a_second_process_fails_on_the_file_lock(tmp_path):
    """What tasks met before: DuckDB refuses a second writing process outright."""
    path = tmp_path / "warehouse.duckdb"
    first = start(path, "first", 3.0)
    assert first.stdout.readline().strip() == b"open"
    try:
        with pytest.raises(duckdb.IOException, match="lock"):
            duckdb.connect(str(path))
    finally:
        first.communicate(timeout=60)


def test_a_task_that_waits_past_the_timeout_names_the_file(tmp_path):
    path = tmp_path / "warehouse.duckdb"
    holder = start(path, "holder", 3.0)
    assert holder.stdout.readline().strip() == b"open"
    try:
        with (
            pytest.raises(WarehouseError, match="warehouse.duckdb stayed in use"),
            duckdb_connection(str(path), timeout=0.5),
        ):
            pass
    finally:
        holder.communicate(timeout=60)
