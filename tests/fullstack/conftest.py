"""The full stack, started once for the full-stack and browser tests and stopped after the last.

Needs PostgreSQL and Redis on loopback (skips without them unless ``REQUIRE_SERVICES=1``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest

from tests.conftest import EMULATOR_API_KEY, POSTGRES_HOST, POSTGRES_PORT, require_service
from tests.fullstack.stack import REDIS_HOST, REDIS_PORT, AirflowStack, start_stack

# The REST and backfill tests run the tests' small workload DAG; the browser opens a real one.
WORKLOAD_DAG = "cb_tiny_triage"
# claude_batch_dag lays the tasks out at the DAG's top level: their ids carry no group prefix.
TASK_PREFIX = ""
BROWSER_DAG = "support_ticket_triage"
BROWSER_DAY = datetime(2026, 11, 14)
SUPPORT_TICKETS = 12
# The warehouse's tickets, one block of days per test so their rows never overlap:
# the REST trigger + triggerer restart, then the three backfill intervals.
TICKET_DAYS = {
    datetime(2026, 11, 10): 50,  # two shards of at most 40
    datetime(2026, 11, 11): 12,
    datetime(2026, 11, 12): 12,
    datetime(2026, 11, 13): 12,
}
TICKET_TEXTS = (
    "I was charged twice for my invoice, refund please",
    "The app crashes with an error on start",
    "Please add dark mode, a feature idea",
)

_running: dict[str, object] = {}


def ticket_key(day: datetime, index: int) -> str:
    return f"T{day:%m%d}-{index:03d}"


def support_ticket_key(index: int) -> str:
    return f"S{BROWSER_DAY:%m%d}-{index:03d}"


def seed_tickets(stack: AirflowStack) -> None:
    import psycopg2

    rows = [
        (ticket_key(day, i), TICKET_TEXTS[i % len(TICKET_TEXTS)], day + timedelta(minutes=11 * i))
        for day, count in TICKET_DAYS.items()
        for i in range(count)
    ]
    # support_ticket_triage's source table (dags/support_ticket_triage.py): one day of tickets.
    support = [
        (
            support_ticket_key(i),
            ("email", "chat")[i % 2],
            f"Ticket {i}" if i % 2 == 0 else None,  # chat tickets have no subject
            TICKET_TEXTS[i % len(TICKET_TEXTS)],
            BROWSER_DAY + timedelta(minutes=13 * i),
        )
        for i in range(SUPPORT_TICKETS)
    ]
    conn = psycopg2.connect(stack.warehouse_dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                "CREATE TABLE tickets (ticket_id VARCHAR PRIMARY KEY, body VARCHAR, created_at TIMESTAMP)"
            )
            cur.executemany("INSERT INTO tickets VALUES (%s, %s, %s)", rows)
            cur.execute(
                "CREATE TABLE support_tickets (ticket_id VARCHAR PRIMARY KEY, channel VARCHAR, "
                "subject VARCHAR, body VARCHAR, created_at TIMESTAMP)"
            )
            cur.executemany("INSERT INTO support_tickets VALUES (%s, %s, %s, %s, %s)", support)
    finally:
        conn.close()


@pytest.fixture(scope="session")
def fullstack(moto_endpoint) -> Iterator[AirflowStack]:
    """Airflow's components as processes on PostgreSQL + Redis, with the emulator and moto S3."""
    require_service("PostgreSQL", POSTGRES_HOST, POSTGRES_PORT)
    require_service("Redis", REDIS_HOST, REDIS_PORT)
    from claude_batch.emulator import EmulatorServer

    # moto logs every S3 request the tasks make; the components' own logs are the useful ones.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    # The stack's own emulator (not the session one other tests reset): emulated time runs 60x,
    # so a batch's default 60 emulated seconds take one second of wall-clock time.
    with EmulatorServer(
        api_key=EMULATOR_API_KEY, time_scale=60.0, processing_seconds=60.0, seed=0
    ) as emulator:
        stack, teardown = start_stack(
            emulator=emulator,
            moto_endpoint=moto_endpoint,
            api_key=EMULATOR_API_KEY,
            dag_ids=[WORKLOAD_DAG, BROWSER_DAG],
        )
        _running["teardown"] = teardown
        try:
            seed_tickets(stack)
            yield stack
        finally:
            teardown()
            _running.clear()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """Stop the stack right after the last full-stack test, not at the end of the whole session.

    Its five processes would otherwise keep the 2 cores busy while the remaining tests run.
    """
    teardown = _running.get("teardown")
    if teardown is None:
        return
    if nextitem is None or "fullstack" not in nextitem.nodeid.split("::")[0]:
        teardown()
        _running.clear()
