"""The demo's seed data and its printed output."""

from __future__ import annotations

from datetime import datetime, timedelta

import duckdb

END = datetime(2026, 11, 10)


def test_tickets_are_deterministic_varied_and_inside_the_period(sample_data):
    first = sample_data.ticket_rows(500, end=END, days=3, seed=7)
    assert first == sample_data.ticket_rows(500, end=END, days=3, seed=7)
    assert first != sample_data.ticket_rows(500, end=END, days=3, seed=8)
    ordinary = [row for row in first if row["ticket_id"].startswith("TCK-0")]
    assert all(END - timedelta(days=3) <= row["created_at"] < END for row in first)
    assert len({row["body"] for row in ordinary}) > 400
    words = " ".join(row["body"].lower() for row in ordinary)
    for topic in ("refund", "charged", "crashes", "error", "add", "cancel"):
        assert topic in words


def test_tickets_include_the_bad_rows(sample_data):
    rows = sample_data.ticket_rows(10, end=END, days=1)
    by_id: dict[str, list[dict]] = {}
    for row in rows:
        by_id.setdefault(row["ticket_id"], []).append(row)
    assert by_id["TCK-NULL"][0]["body"] is None
    assert by_id["TCK-BLANK"][0]["body"].strip() == ""
    assert "\x00" in by_id["TCK-CTRL"][0]["body"]
    assert "DROP TABLE" in by_id["TCK-SQL"][0]["body"]
    assert "Ignore all previous instructions" in by_id["TCK-INJECT"][0]["body"]
    assert any(len(same) == 2 for same in by_id.values())  # a duplicate id
    assert "TCK 9001/ü" in by_id  # not a valid custom_id


def test_the_five_invoices_of_the_accounts_payable_example(sample_data):
    rows = sample_data.invoice_rows(END - timedelta(days=1))
    expected = [
        ("INV-001", "IT", "124,500.00", "AWS cloud infrastructure"),
        ("INV-002", "HR", "45,000.00", "Job posting on a recruitment platform"),
        ("INV-003", "Admin", "285,000.00", "Hotel conference offsite, rooms"),
        ("INV-004", "Marketing", "78,000.00", "Adobe design software licence"),
        ("INV-005", "Finance", "850,000.00", "risk assessment"),
    ]
    assert [row["invoice_id"] for row in rows] == [e[0] for e in expected]
    for row, (_, department, amount, what) in zip(rows, expected, strict=True):
        assert f"Cost centre: {department}\n" in row["invoice_text"]
        assert f"Amount due: {amount} USD" in row["invoice_text"]
        assert what in row["invoice_text"]
        # Received by 6 pm on the last day: in the 4 pm to 8 pm run.
        assert END - timedelta(hours=8) <= row["received_at"] < END - timedelta(hours=6)


def test_seed_warehouse_creates_the_three_source_tables(sample_data):
    with duckdb.connect() as conn:
        counts = sample_data.seed_warehouse(conn, end=END, tickets=100)
        assert counts == {"support_tickets": 107, "ap_invoices": 5, "products": 8}
        assert conn.execute("SELECT count(*) FROM support_tickets WHERE body IS NULL").fetchone() == (1,)
        assert conn.execute("SELECT max(length(features)) FROM products").fetchone()[0] > 40


def test_the_demo_prints_a_table_and_a_readable_report():
    from claude_batch.demo import describe_report, masked, table

    assert table(("invoice", "amount"), [("INV-001", "124,500.00"), ("INV-002", "45,000.00")], "<>") == (
        "invoice      amount\n-------  ----------\nINV-001  124,500.00\nINV-002   45,000.00"
    )
    report = {
        "run_id": "manual__2026-11-22T00:00:00+00:00",
        "prompt_version": "pv_0123456789abcdef",
        "models": ["claude-haiku-4-5"],
        "extracted": 1019,
        "staged": 1015,
        "rejected": 4,
        "rejected_by_reason": {"null_text": 1},
        "ledger": {"succeeded": 1015, "dead": 4},
        "batches": 1,
        "batch_seconds": {"max": 322.0, "mean": 322.0},
        "tokens": {"input": 582151, "output": 20271, "cache_write": 0, "cache_read": 0},
        "cache_setting": "off",
        "cache_hit_rate": None,
        "cost_usd": 0.3418,
        "estimated_cost_usd": 0.4705,
        "realtime_cost_usd": 0.6835,
        "saving_usd": 0.3417,
    }
    text = describe_report(report)
    assert "outcomes        dead 4, succeeded 1,015" in text
    assert "real-time equivalent $0.6835; saving $0.3417" in text
    assert "hit rate n/a" in text
    assert masked("sk-ant-api03-abcdefghijklmnop") == "sk-ant-...op"
