"""Validation: schema checks, cut and refused answers, business rules, typed columns."""

from __future__ import annotations

import orjson
import pytest
from claude_batch.validation import judge, validate_batch, validate_part, validated_schema

from tests.datapath.conftest import make_workload
from tests.datapath.helpers import ended, errored, results_batch, succeeded

GOOD = '{"category": "billing", "total_amount": 250000.5, "summary": "charged twice"}'


@pytest.mark.parametrize(
    ("payload", "stop_reason", "code", "text"),
    [
        (GOOD, "max_tokens", "max_tokens", "cut at max_tokens (7 output tokens, max_tokens 300)"),
        (GOOD, "refusal", "refusal", "refused"),
        (None, "end_turn", "no_output", "holds no text"),
        ("I think it is billing", "end_turn", "invalid_json", "not valid JSON"),
        (
            '{"category": "billing", "total_amount": 1}',
            "end_turn",
            "schema_mismatch",
            "summary: Field required",
        ),
        (
            '{"category": "refunds", "total_amount": -1, "summary": "x"}',
            "end_turn",
            "schema_mismatch",
            "category",
        ),
        ('{"category": "bug", "total_amount": 1, "summary": "x", "extra": 1}', "end_turn", None, None),
    ],
)
def test_judge_flags_every_kind_of_bad_answer(payload, stop_reason, code, text):
    verdict = judge(make_workload(), payload, stop_reason, output_tokens=7)
    if code is None:
        assert verdict.status == "valid"
        return
    assert verdict.status == "invalid" and verdict.reason_code == code
    assert text in verdict.reason


def test_rules_derive_columns_and_a_failing_rule_makes_the_answer_invalid():
    workload = make_workload()
    assert judge(workload, GOOD, "end_turn").derived == {"approval_required": True}
    from claude_batch.workloads import Rule

    broken = make_workload(rules=(Rule("ratio", lambda out: 1 / 0, "float"),))
    verdict = judge(broken, GOOD, "end_turn")
    assert verdict.reason_code == "rule_error" and "ZeroDivisionError" in verdict.reason


def test_validate_batch_keeps_failures_with_their_raw_text_and_reason():
    workload = make_workload()
    batch = results_batch(
        [
            succeeded("a", GOOD),
            succeeded("b", "not json at all"),
            succeeded("c", GOOD, stop_reason="max_tokens"),
            errored("d", "invalid_request_error", "max_tokens: Field required"),
            errored("e", "overloaded_error"),
            ended("f", "expired"),
            ended("g", "canceled"),
        ]
    )
    validated = validate_batch(workload, batch)
    assert validated.schema == validated_schema(workload)
    rows = {row["custom_id"]: row for row in validated.to_pylist()}
    assert rows["a"]["status"] == "valid" and rows["a"]["raw_text"] is None
    assert rows["a"]["category"] == "billing" and rows["a"]["total_amount"] == 250000.5
    assert rows["a"]["approval_required"] is True
    assert orjson.loads(rows["a"]["output_json"])["summary"] == "charged twice"
    assert rows["b"]["status"] == "invalid" and rows["b"]["raw_text"] == "not json at all"
    assert rows["b"]["reason_code"] == "invalid_json" and rows["b"]["category"] is None
    assert rows["c"]["reason_code"] == "max_tokens"
    assert rows["d"]["status"] == "errored" and rows["d"]["reason_code"] == "invalid_request_error"
    assert "max_tokens: Field required" in rows["d"]["reason"]
    assert rows["e"]["status"] == "errored" and rows["e"]["error_type"] == "overloaded_error"
    assert (rows["f"]["status"], rows["g"]["status"]) == ("expired", "canceled")
    assert rows["a"]["cost_usd"] > 0 and rows["f"]["cost_usd"] == 0


def test_tool_use_answers_are_read_from_the_tool_input():
    workload = make_workload(output_mode="tool")
    tool_input = {"category": "bug", "total_amount": 3, "summary": "crash"}
    validated = validate_batch(
        workload,
        results_batch([succeeded("a", "Let me record that.", tool_input=tool_input, stop_reason="tool_use")]),
    )
    row = validated.to_pylist()[0]
    assert row["status"] == "valid" and row["category"] == "bug"


def test_validate_part_streams_results_parquet_to_validated_parquet(layout):
    import pyarrow.parquet as pq
    from claude_batch.results import RESULTS_SCHEMA

    workload = make_workload()
    lines = [succeeded(f"k{i}", GOOD if i % 3 else "oops") for i in range(30)]
    with layout.store.open(layout.results_parquet(0), "wb") as handle:
        pq.write_table(pa_table(results_batch(lines)), handle, row_group_size=7)
    summary = validate_part(workload, layout, 0, batch_rows=8)
    assert summary.rows == 30
    assert summary.by_status["valid"] == 20 and summary.by_status["invalid"] == 10
    assert summary.by_reason == {"invalid_json": 10}
    assert RESULTS_SCHEMA.names[0] == "custom_id"


def pa_table(batch):
    import pyarrow as pa

    return pa.Table.from_batches([batch])


def test_enum_decimal_date_and_nested_fields_become_typed_or_json_columns():
    import datetime as dt
    import enum
    from decimal import Decimal

    from pydantic import BaseModel

    class Kind(enum.Enum):
        INVOICE = "invoice"
        RECEIPT = "receipt"

    class Line(BaseModel):
        sku: str
        quantity: int

    class Document(BaseModel):
        kind: Kind
        total: Decimal
        issued: dt.date
        lines: list[Line]
        note: str | None = None

    workload = make_workload(output_schema=Document, rules=())
    payload = (
        '{"kind": "invoice", "total": "12.50", "issued": "2026-01-31", '
        '"lines": [{"sku": "A", "quantity": 2}]}'
    )
    row = validate_batch(workload, results_batch([succeeded("a", payload)])).to_pylist()[0]
    assert row["status"] == "valid"
    assert (row["kind"], row["total"], row["issued"], row["note"]) == (
        "invoice",
        12.5,
        dt.date(2026, 1, 31),
        None,
    )
    assert orjson.loads(row["lines"]) == [{"sku": "A", "quantity": 2}]


def test_a_rule_failing_on_some_answers_fails_only_those_and_keeps_the_rows_aligned():
    from claude_batch.workloads import Rule

    def ratio(out):
        return 100 / out.total_amount  # fails where the total is 0

    workload = make_workload(
        rules=(Rule("ratio", ratio, "float"), Rule("big", lambda out: out.total_amount > 10))
    )
    answers = [
        ("a", '{"category": "bug", "total_amount": 50, "summary": "x"}'),
        ("b", '{"category": "bug", "total_amount": 0, "summary": "zero"}'),
        ("c", "not json"),
        ("d", '{"category": "other", "total_amount": 4, "summary": "y"}'),
    ]
    lines = [succeeded(custom_id, payload) for custom_id, payload in answers] + [ended("e", "expired")]
    rows = {row["custom_id"]: row for row in validate_batch(workload, results_batch(lines)).to_pylist()}
    assert [rows[c]["status"] for c in "abcde"] == ["valid", "invalid", "invalid", "valid", "expired"]
    assert (rows["a"]["ratio"], rows["a"]["big"], rows["a"]["category"]) == (2.0, True, "bug")
    assert (rows["d"]["ratio"], rows["d"]["big"], rows["d"]["category"]) == (25.0, False, "other")
    assert (
        rows["b"]["reason_code"] == "rule_error"
        and "'ratio' failed: ZeroDivisionError" in rows["b"]["reason"]
    )
    assert rows["b"]["raw_text"] == answers[1][1]
    assert (rows["b"]["ratio"], rows["b"]["big"], rows["b"]["category"], rows["b"]["output_json"]) == (
        None,
    ) * 4
    assert rows["c"]["reason_code"] == "invalid_json" and rows["e"]["raw_text"] is None


def test_rule_values_of_other_types_are_coerced_and_a_value_that_cannot_be_is_a_rule_error():
    import numpy as np
    from claude_batch.workloads import Rule

    workload = make_workload(
        rules=(
            Rule("flag", lambda out: np.bool_(out.total_amount > 1)),  # not a Python bool
            Rule(
                "units", lambda out: "many" if out.total_amount > 100 else str(int(out.total_amount)), "int"
            ),
        )
    )
    lines = [
        succeeded("a", '{"category": "bug", "total_amount": 7, "summary": "x"}'),
        succeeded("b", '{"category": "bug", "total_amount": 500, "summary": "x"}'),
    ]
    rows = validate_batch(workload, results_batch(lines)).to_pylist()
    assert (rows[0]["status"], rows[0]["flag"], rows[0]["units"]) == ("valid", True, 7)
    assert rows[1]["reason_code"] == "rule_error" and "'units' failed: ValueError" in rows[1]["reason"]
    assert validate_batch(workload, results_batch(lines[:1])).to_pylist()[0]["flag"] is True


def test_validate_part_validates_in_slices_and_keeps_the_order_and_row_groups(layout, monkeypatch):
    import pyarrow.parquet as pq
    from claude_batch import validation

    monkeypatch.setattr(validation, "_SLICE_ROWS", 3)
    workload = make_workload()
    lines = [succeeded(f"k{i:02d}", GOOD if i % 4 else "oops") for i in range(20)]
    with layout.store.open(layout.results_parquet(0), "wb") as handle:
        pq.write_table(pa_table(results_batch(lines)), handle, row_group_size=10)
    summary = validate_part(workload, layout, 0, batch_rows=10)
    assert (summary.rows, summary.by_status["valid"], summary.by_reason) == (20, 15, {"invalid_json": 5})
    with layout.store.open(validation.validated_path(layout, 0), "rb") as handle:
        validated = pq.ParquetFile(handle)
        assert [validated.metadata.row_group(i).num_rows for i in range(validated.num_row_groups)] == [10, 10]
        rows = validated.read(columns=["custom_id", "status"]).to_pylist()
    assert [row["custom_id"] for row in rows] == [f"k{i:02d}" for i in range(20)]
    assert [row["status"] for row in rows] == ["invalid" if i % 4 == 0 else "valid" for i in range(20)]


def test_judge_and_validate_batch_agree_on_every_kind_of_answer():
    workload = make_workload()
    cases = [
        (GOOD, "end_turn"),
        (GOOD, "max_tokens"),
        (GOOD, "refusal"),
        (None, "end_turn"),
        ("{", "end_turn"),
        ('{"category": "bug"}', "end_turn"),
        (GOOD, "model_context_window_exceeded"),
        (GOOD, "pause_turn"),
    ]
    lines = [succeeded(f"r{i}", payload, stop_reason=stop) for i, (payload, stop) in enumerate(cases)]
    rows = validate_batch(workload, results_batch(lines)).to_pylist()
    for row, (payload, stop) in zip(rows, cases, strict=True):
        verdict = judge(workload, payload, stop, output_tokens=20)
        assert (row["status"], row["reason_code"], row["reason"]) == (
            verdict.status,
            verdict.reason_code,
            verdict.reason,
        )


@pytest.mark.parametrize("with_unparsed", [False, True])
def test_answers_failing_anywhere_in_a_batch_get_their_own_verdicts_and_the_rest_their_outputs(
    with_unparsed,
):
    workload = make_workload()
    bad = ("{", '{"category": "bug"}')
    # Failures first, last, side by side and alone; valid answers between them.
    payloads = [bad[0], bad[1], GOOD, bad[0], GOOD, GOOD, bad[1], bad[0], GOOD, bad[1]]
    lines = [succeeded(f"r{i}", payload) for i, payload in enumerate(payloads)]
    if with_unparsed:  # rows judged before parsing, between the answers to parse
        lines[2:2] = [errored("e1"), succeeded("cut", GOOD, stop_reason="max_tokens")]
        payloads[2:2] = [None, None]
    rows = validate_batch(workload, results_batch(lines)).to_pylist()
    to_json = workload.output_schema.__pydantic_serializer__.to_json
    for row, line, payload in zip(rows, lines, payloads, strict=True):
        assert row["custom_id"] == line["custom_id"]
        if payload is None:
            assert row["status"] in ("errored", "invalid") and row["output_json"] is None
            continue
        verdict = judge(workload, payload, "end_turn")
        assert (row["status"], row["reason_code"], row["reason"]) == (
            verdict.status,
            verdict.reason_code,
            verdict.reason,
        )
        expected = to_json(verdict.output).decode() if verdict.status == "valid" else None
        assert row["output_json"] == expected
        assert row["raw_text"] == (None if verdict.status == "valid" else payload)


def test_validated_parts_are_the_same_whatever_the_slice_and_row_group_sizes(tmp_path, monkeypatch):
    import pyarrow.parquet as pq
    from claude_batch import validation
    from claude_batch.storage import ObjectStore, RunLayout

    workload = make_workload()
    answers = [GOOD, "oops", '{"category": "bug", "total_amount": 300000, "summary": "x"}', None]
    lines = [succeeded(f"k{i:03d}", answers[i % 4]) for i in range(97)] + [
        errored("e1"),
        ended("x1", "expired"),
    ]
    parts = {}
    for slice_rows, batch_rows in ((1, 1), (3, 10), (7, 8), (4_096, 10_000)):
        monkeypatch.setattr(validation, "_SLICE_ROWS", slice_rows)
        layout = RunLayout(ObjectStore(str(tmp_path / f"{slice_rows}-{batch_rows}")), "dag", "run")
        with layout.store.open(layout.results_parquet(0), "wb") as handle:
            pq.write_table(pa_table(results_batch(lines)), handle, row_group_size=9)
        summary = validate_part(workload, layout, 0, batch_rows=batch_rows)
        with layout.store.open(validation.validated_path(layout, 0), "rb") as handle:
            validated = pq.ParquetFile(handle)
            sizes = [validated.metadata.row_group(i).num_rows for i in range(validated.num_row_groups)]
            parts[(slice_rows, batch_rows)] = (validated.read(), summary)
        assert sizes == [batch_rows] * (99 // batch_rows) + ([99 % batch_rows] if 99 % batch_rows else [])
    (first, first_summary), *others = parts.values()
    assert first_summary.by_status == {"valid": 49, "invalid": 48, "errored": 1, "expired": 1, "canceled": 0}
    for table, summary in others:
        assert table.equals(first) and summary == first_summary
