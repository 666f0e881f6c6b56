"""Validate: parse every succeeded answer against the workload's schema and apply its rules.

Reads ``results/part-NNNNN.parquet`` and writes ``validated/part-NNNNN.parquet``: one row per
result with a ``status`` (``valid``, ``invalid``, ``errored``, ``expired``, ``canceled``), a
``reason_code`` and ``reason`` for everything that is not valid, the raw text of failures, the
validated output as JSON and as typed columns (one per top-level schema field) and one column
per business rule. Answers cut by ``max_tokens`` and refusals are flagged as invalid.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, NamedTuple

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ValidationError

from claude_batch.results import iter_result_batches, paused_gc
from claude_batch.storage import RunLayout
from claude_batch.workloads import OutputColumn, Workload, unwrap_optional

STATUSES = ("valid", "invalid", "errored", "expired", "canceled")
_REASON_LIMIT = 1_000
_STOP_REASONS_CUT = {
    "max_tokens": ("max_tokens", "the answer was cut at max_tokens"),
    "refusal": ("refusal", "the model refused to answer"),
    "model_context_window_exceeded": ("context_window", "the answer was cut at the model's context window"),
    "pause_turn": ("paused", "the answer was paused mid-turn"),
}
_BASE_FIELDS: list[tuple[str, pa.DataType]] = [
    ("custom_id", pa.string()),
    ("record_key", pa.string()),
    ("prompt_version", pa.string()),
    ("batch_id", pa.string()),
    ("model", pa.string()),
    ("outcome", pa.string()),
    ("status", pa.string()),
    ("reason_code", pa.string()),
    ("reason", pa.string()),
    ("error_type", pa.string()),
    ("stop_reason", pa.string()),
    ("raw_text", pa.string()),
    ("output_json", pa.string()),
    ("input_tokens", pa.int64()),
    ("output_tokens", pa.int64()),
    ("cache_creation_input_tokens", pa.int64()),
    ("cache_read_input_tokens", pa.int64()),
    ("cost_usd", pa.float64()),
]
_PASSED_THROUGH = (
    "custom_id", "record_key", "prompt_version", "batch_id", "model", "outcome", "error_type", "stop_reason",
    "input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "cost_usd",
)  # fmt: skip


def validated_schema(workload: Workload) -> pa.Schema:
    """The columns of a validated part for ``workload``."""
    fields = list(_BASE_FIELDS)
    fields += [(column.name, column.arrow_type) for column in workload.output_columns]
    fields += list(workload.rule_columns())
    return pa.schema(fields)


def validated_path(layout: RunLayout, part: int) -> str:
    """``validated/part-NNNNN.parquet`` under the run's prefix."""
    return f"{layout.prefix}/validated/part-{part:05d}.parquet"


@dataclass
class ValidationSummary:
    """Counts of one validated part."""

    part: int
    rows: int = 0
    by_status: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    by_reason: dict[str, int] = field(default_factory=dict)


class Verdict(NamedTuple):
    """The judgement of one answer: valid (with output and derived values) or not (with why)."""

    status: str
    reason_code: str | None = None
    reason: str | None = None
    output: Any = None
    derived: dict[str, Any] | None = None


def _short(text: str) -> str:
    return text if len(text) <= _REASON_LIMIT else text[: _REASON_LIMIT - 3] + "..."


def _describe_errors(exc: ValidationError) -> tuple[str, str]:
    errors = exc.errors(include_url=False, include_input=False)
    if errors and errors[0].get("type") == "json_invalid":
        return "invalid_json", _short(f"the answer is not valid JSON: {errors[0].get('msg')}")
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ())) or '(root)'}: {e.get('msg')}" for e in errors[:5]]
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "schema_mismatch", _short("the answer does not match the schema: " + "; ".join(parts) + more)


def _coerce(value: Any, dtype: str) -> Any:
    if value is None:
        return None
    if dtype == "bool":
        return bool(value)
    if dtype == "int":
        return int(value)
    if dtype == "float":
        return float(value)
    return str(value)


def judge(
    workload: Workload, payload: str | None, stop_reason: str | None, output_tokens: int = 0
) -> Verdict:
    """Judge one succeeded answer.

    :param workload: the task spec (schema, output mode, rules).
    :param payload: the answer's JSON: the text (``json_schema`` mode) or the tool input (``tool``).
    :param stop_reason: the message's stop reason.
    :param output_tokens: the answer's output tokens (named in the max_tokens reason).
    """
    cut = _STOP_REASONS_CUT.get(stop_reason or "")
    if cut is not None:
        code, what = cut
        detail = (
            f" ({output_tokens} output tokens, max_tokens {workload.max_tokens})"
            if code == "max_tokens"
            else ""
        )
        return Verdict("invalid", code, what + detail)
    if payload is None:
        where = "no tool_use block" if workload.output_mode == "tool" else "no text"
        return Verdict("invalid", "no_output", f"the answer holds {where}")
    try:
        # The schema's compiled validator, without model_validate_json's wrapper.
        output = workload.output_schema.__pydantic_validator__.validate_json(payload)
    except ValidationError as exc:
        code, reason = _describe_errors(exc)
        return Verdict("invalid", code, reason)
    derived: dict[str, Any] = {}
    for rule in workload.rules:
        try:
            derived[rule.name] = _coerce(rule.fn(output), rule.dtype)
        except Exception as exc:  # a rule failing on one answer must not fail the run
            return Verdict(
                "invalid",
                "rule_error",
                _short(f"business rule {rule.name!r} failed: {type(exc).__name__}: {exc}"),
            )
    return Verdict("valid", output=output, derived=derived)


def _jsonable(value: Any) -> Any:
    """A field value as plain JSON data (nested models dumped in JSON mode)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _converter(workload: Workload, column: OutputColumn) -> Any:
    """How a field's value becomes its column value (None: as it is, the common case)."""
    if column.as_json:
        return lambda value: None if value is None else orjson.dumps(_jsonable(value), default=str).decode()
    annotation = unwrap_optional(workload.output_schema.model_fields[column.name].annotation)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return lambda value: None if value is None else value.value
    if isinstance(annotation, type) and issubclass(annotation, Decimal):
        return lambda value: None if value is None else float(value)
    return None


def _rest_verdict(kind: str, error_type: str | None, error_message: str | None) -> Verdict:
    """The verdict of a request that did not succeed."""
    if kind == "errored":
        message = f"{error_type}: {error_message}" if error_message else str(error_type)
        return Verdict("errored", error_type or "errored", _short(f"the request errored: {message}"))
    if kind in ("expired", "canceled"):
        return Verdict(kind, kind, f"the request was {kind} before it ran")
    return Verdict("invalid", "unknown_outcome", f"unknown result type {kind!r}")


def validate_batch(workload: Workload, batch: pa.RecordBatch | pa.Table) -> pa.RecordBatch:
    """Validate a batch of collected results (``RESULTS_SCHEMA`` columns) into validated rows.

    :param workload: the task spec the results answer.
    :param batch: rows of a results Parquet part.
    """
    schema = validated_schema(workload)
    outcome = batch.column("outcome").to_pylist()
    stop_reason = batch.column("stop_reason").to_pylist()
    output_tokens = batch.column("output_tokens").to_pylist()
    text = batch.column("text").to_pylist()
    payloads = batch.column("tool_input_json").to_pylist() if workload.output_mode == "tool" else text
    error_type = batch.column("error_type").to_pylist()
    error_message = batch.column("error_message").to_pylist()
    field_names = [column.name for column in workload.output_columns]
    converters = [_converter(workload, column) for column in workload.output_columns]
    names = field_names + [rule.name for rule in workload.rules]
    empty = (None,) * len(names)
    to_json = workload.output_schema.__pydantic_serializer__.to_json
    verdicts: list[Verdict] = []
    raw_texts: list[str | None] = []
    output_json: list[str | None] = []
    values: list[tuple[Any, ...]] = []
    with paused_gc():
        for index, kind in enumerate(outcome):
            if kind == "succeeded":
                verdict = judge(workload, payloads[index], stop_reason[index], output_tokens[index] or 0)
            else:
                verdict = _rest_verdict(kind, error_type[index], error_message[index])
            verdicts.append(verdict)
            if verdict.status == "valid":
                output = verdict.output
                raw_texts.append(None)
                output_json.append(to_json(output).decode())
                fields = [
                    getattr(output, name) if convert is None else convert(getattr(output, name))
                    for name, convert in zip(field_names, converters, strict=True)
                ]
                values.append((*fields, *verdict.derived.values()))  # type: ignore[union-attr]
            else:
                raw_texts.append(payloads[index] if kind == "succeeded" else None)
                output_json.append(None)
                values.append(empty)
    statuses = [verdict.status for verdict in verdicts]
    codes = [verdict.reason_code for verdict in verdicts]
    reasons = [verdict.reason for verdict in verdicts]
    arrays: dict[str, pa.Array] = {name: batch.column(name) for name in _PASSED_THROUGH}
    arrays["status"] = pa.array(statuses, pa.string())
    arrays["reason_code"] = pa.array(codes, pa.string())
    arrays["reason"] = pa.array(reasons, pa.string())
    arrays["raw_text"] = pa.array(raw_texts, pa.string())
    arrays["output_json"] = pa.array(output_json, pa.string())
    columns = list(zip(*values, strict=True)) if values else [()] * len(names)
    for name, column in zip(names, columns, strict=True):
        arrays[name] = pa.array(column, schema.field(name).type)
    return pa.record_batch([arrays[f.name] for f in schema], schema=schema)


def validate_part(
    workload: Workload, layout: RunLayout, part: int, *, batch_rows: int = 20_000
) -> ValidationSummary:
    """Validate the collected results of shard ``part`` into ``validated/part-NNNNN.parquet``.

    Streams row group by row group; re-running overwrites the same object.

    :param workload: the task spec the results answer.
    :param layout: the run's S3 layout.
    :param part: the shard's part number.
    :param batch_rows: rows validated together (bounds memory).
    """
    summary = ValidationSummary(part)
    schema = validated_schema(workload)
    with (
        layout.store.open(validated_path(layout, part), "wb") as handle,
        pq.ParquetWriter(handle, schema, compression="zstd") as writer,
    ):
        for batch in iter_result_batches(layout, part, batch_rows):
            validated = validate_batch(workload, batch)
            writer.write_batch(validated)
            summary.rows += validated.num_rows
            status = validated.column("status")
            for item in pc.value_counts(status).to_pylist():
                summary.by_status[item["values"]] = summary.by_status.get(item["values"], 0) + item["counts"]
            failed = validated.column("reason_code").filter(pc.not_equal(status, "valid"))
            for item in pc.value_counts(failed.drop_null()).to_pylist():
                summary.by_reason[item["values"]] = summary.by_reason.get(item["values"], 0) + item["counts"]
    return summary


def iter_validated(layout: RunLayout, part: int, batch_rows: int = 50_000) -> Iterator[pa.RecordBatch]:
    """The validated rows of shard ``part``, streamed in record batches."""
    with layout.store.open(validated_path(layout, part), "rb") as handle:
        yield from pq.ParquetFile(handle).iter_batches(batch_size=batch_rows)
