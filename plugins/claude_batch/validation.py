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
from operator import attrgetter
from typing import Any, NamedTuple

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ValidationError

from claude_batch.results import iter_result_batches, parquet_writer
from claude_batch.storage import RunLayout
from claude_batch.tuning import bulk_processing, gc_paused, release_arrow_memory, return_freed_memory
from claude_batch.workloads import OutputColumn, Rule, Workload, unwrap_optional

STATUSES = ("valid", "invalid", "errored", "expired", "canceled")
_REASON_LIMIT = 1_000
# Rows whose answers are held as Python objects at once (validate_part's memory bound).
_SLICE_ROWS = 4_096
_STOP_REASONS_CUT = {
    "max_tokens": ("max_tokens", "the answer was cut at max_tokens"),
    "refusal": ("refusal", "the model refused to answer"),
    "model_context_window_exceeded": ("context_window", "the answer was cut at the model's context window"),
    "pause_turn": ("paused", "the answer was paused mid-turn"),
}
# Rule values of these exact types go into their column as they are; others through _coerce.
_PLAIN_RULE_TYPES: dict[str, set[type]] = {
    "bool": {bool, type(None)},
    "int": {int, type(None)},
    "float": {float, int, type(None)},
    "str": {str, type(None)},
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
# Columns with a value per row (see results.parquet_writer).
_UNIQUE_COLUMNS = frozenset({"custom_id", "record_key", "raw_text", "output_json"})
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
    return layout.validated(part)


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


def _cut_verdict(workload: Workload, stop_reason: str | None, output_tokens: int) -> Verdict | None:
    """The verdict of an answer cut short or refused, else None."""
    cut = _STOP_REASONS_CUT.get(stop_reason or "")
    if cut is None:
        return None
    code, what = cut
    detail = (
        f" ({output_tokens} output tokens, max_tokens {workload.max_tokens})" if code == "max_tokens" else ""
    )
    return Verdict("invalid", code, what + detail)


def _no_output_verdict(workload: Workload) -> Verdict:
    where = "no tool_use block" if workload.output_mode == "tool" else "no text"
    return Verdict("invalid", "no_output", f"the answer holds {where}")


def _rule_failure(rule: Rule, exc: Exception) -> Verdict:
    return Verdict(
        "invalid", "rule_error", _short(f"business rule {rule.name!r} failed: {type(exc).__name__}: {exc}")
    )


def judge(
    workload: Workload, payload: str | None, stop_reason: str | None, output_tokens: int = 0
) -> Verdict:
    """Judge one succeeded answer (:func:`validate_batch` judges a batch the same way, faster).

    :param workload: the task spec (schema, output mode, rules).
    :param payload: the answer's JSON: the text (``json_schema`` mode) or the tool input (``tool``).
    :param stop_reason: the message's stop reason.
    :param output_tokens: the answer's output tokens (named in the max_tokens reason).
    """
    cut = _cut_verdict(workload, stop_reason, output_tokens)
    if cut is not None:
        return cut
    if payload is None:
        return _no_output_verdict(workload)
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
            return _rule_failure(rule, exc)
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


def _rule_values(rule: Rule, outputs: list[Any]) -> tuple[list[Any], dict[int, Verdict]]:
    """One rule's column over the outputs, and the verdict of each output (by position) it failed on."""
    failures: dict[int, Verdict] = {}
    try:
        values = list(map(rule.fn, outputs))
    except Exception:  # some output breaks the rule: go one by one to find which
        values = []
        for position, output in enumerate(outputs):
            try:
                values.append(rule.fn(output))
            except Exception as exc:  # a rule failing on one answer must not fail the run
                values.append(None)
                failures[position] = _rule_failure(rule, exc)
    if not set(map(type, values)) <= _PLAIN_RULE_TYPES[rule.dtype]:
        for position, value in enumerate(values):
            if position in failures:
                continue
            try:
                values[position] = _coerce(value, rule.dtype)
            except Exception as exc:
                values[position] = None
                failures[position] = _rule_failure(rule, exc)
    return values, failures


class _Judged:
    """The valid outputs of a batch (their rows, fields and rule values) and every other row's verdict."""

    def __init__(self, workload: Workload, batch: pa.RecordBatch | pa.Table) -> None:
        self.failures: dict[int, Verdict] = {}
        self.rows: list[int] = []
        self.outputs: list[Any] = []
        payload = batch.column("tool_input_json" if workload.output_mode == "tool" else "text")
        self.payloads = payload.to_pylist()
        self._judge_unparsed(workload, batch, payload)
        self._parse(workload)
        self.rule_values: list[list[Any]] = []
        for rule in workload.rules:
            values, failures = _rule_values(rule, self.outputs)
            self.rule_values.append(values)
            if failures:
                self._drop({self.rows[position]: verdict for position, verdict in failures.items()})

    def _judge_unparsed(
        self, workload: Workload, batch: pa.RecordBatch | pa.Table, payload: pa.Array
    ) -> None:
        """Verdicts of the rows with nothing to parse: not succeeded, cut, refused, without output."""
        succeeded = pc.equal(batch.column("outcome"), "succeeded")
        # Built here, not at import: pyarrow's first list conversion imports pandas (0.4 s).
        cut_reasons = pa.array(list(_STOP_REASONS_CUT), pa.string())
        parsable = pc.and_(succeeded, pc.invert(pc.is_in(batch.column("stop_reason"), value_set=cut_reasons)))
        parsable = pc.and_(parsable, payload.is_valid()).fill_null(False)
        unparsed = np.flatnonzero(~parsable.to_numpy(zero_copy_only=False)).tolist()
        if not unparsed:
            return
        outcome = pc.take(batch.column("outcome"), unparsed).to_pylist()
        stop_reason = pc.take(batch.column("stop_reason"), unparsed).to_pylist()
        output_tokens = pc.take(batch.column("output_tokens"), unparsed).to_pylist()
        error_type = pc.take(batch.column("error_type"), unparsed).to_pylist()
        error_message = pc.take(batch.column("error_message"), unparsed).to_pylist()
        for position, row in enumerate(unparsed):
            if outcome[position] != "succeeded":
                verdict = _rest_verdict(outcome[position], error_type[position], error_message[position])
            else:
                cut = _cut_verdict(workload, stop_reason[position], output_tokens[position] or 0)
                verdict = cut if cut is not None else _no_output_verdict(workload)
            self.failures[row] = verdict

    def _parse(self, workload: Workload) -> None:
        """Parse and validate every other answer against the schema, one pass over the payloads."""
        # The schema's compiled validator, without model_validate_json's wrapper.
        validate_json = workload.output_schema.__pydantic_validator__.validate_json
        failures = self.failures
        rows = [row for row in range(len(self.payloads)) if row not in failures]
        outputs: list[Any] = []
        failed = 0
        answers = iter([self.payloads[row] for row in rows] if failures else self.payloads)
        while True:
            try:
                # map, not a loop of Python calls; extend keeps the outputs before an answer that
                # fails, and map has taken that answer, so the next pass starts after it.
                outputs.extend(map(validate_json, answers))
                break
            except ValidationError as exc:
                place = len(outputs) + failed  # among ``rows``
                failed += 1
                code, reason = _describe_errors(exc)
                failures[rows[place]] = Verdict("invalid", code, reason)
        if failed:
            rows = [row for row in rows if row not in failures]
        self.rows, self.outputs = rows, outputs

    def _drop(self, failures: dict[int, Verdict]) -> None:
        """Take rows out of the valid ones (a rule failed on them)."""
        self.failures.update(failures)
        keep = [position for position, row in enumerate(self.rows) if row not in failures]
        self.rows = [self.rows[position] for position in keep]
        self.outputs = [self.outputs[position] for position in keep]
        self.rule_values = [[values[position] for position in keep] for values in self.rule_values]


def validate_batch(workload: Workload, batch: pa.RecordBatch | pa.Table) -> pa.RecordBatch:
    """Validate a batch of collected results (``RESULTS_SCHEMA`` columns) into validated rows.

    Only the answers to parse go through Python one by one (the compiled validator); rules, typed
    columns and the rest are built a column at a time.

    :param workload: the task spec the results answer.
    :param batch: rows of a results Parquet part.
    """
    schema = validated_schema(workload)
    size = batch.num_rows
    with gc_paused():  # the batch's validated outputs are all alive until their columns are built
        judged = _Judged(workload, batch)
        # Where each row's output is among the valid ones (null: not valid); None when all are.
        spread = None
        if len(judged.rows) != size:
            where = np.full(size, -1, dtype=np.int64)
            where[judged.rows] = np.arange(len(judged.rows))
            spread = pa.array(where, mask=where < 0)

        def column(values: list[Any], arrow_type: pa.DataType) -> pa.Array:
            array = pa.array(values, arrow_type)
            return array if spread is None else array.take(spread)

        arrays: dict[str, pa.Array] = {name: batch.column(name) for name in _PASSED_THROUGH}
        # Arrow takes the serializer's UTF-8 bytes as they are: no Python string per output.
        to_json = workload.output_schema.__pydantic_serializer__.to_json
        arrays["output_json"] = column(list(map(to_json, judged.outputs)), pa.string())
        for output_column in workload.output_columns:
            values = list(map(attrgetter(output_column.name), judged.outputs))
            convert = _converter(workload, output_column)
            if convert is not None:
                values = list(map(convert, values))
            arrays[output_column.name] = column(values, output_column.arrow_type)
        for (name, arrow_type), values in zip(workload.rule_columns(), judged.rule_values, strict=True):
            arrays[name] = column(values, arrow_type)
        status: list[str] = ["valid"] * size
        reason_code: list[str | None] = [None] * size
        reason: list[str | None] = [None] * size
        raw_text: list[str | None] = [None] * size
        for row, verdict in judged.failures.items():
            status[row], reason_code[row], reason[row] = verdict.status, verdict.reason_code, verdict.reason
            if verdict.status == "invalid":  # an answer that failed keeps its raw text
                raw_text[row] = judged.payloads[row]
        arrays["status"] = pa.array(status, pa.string())
        arrays["reason_code"] = pa.array(reason_code, pa.string())
        arrays["reason"] = pa.array(reason, pa.string())
        arrays["raw_text"] = pa.array(raw_text, pa.string())
        return pa.record_batch([arrays[f.name] for f in schema], schema=schema)


def validate_part(
    workload: Workload, layout: RunLayout, part: int, *, batch_rows: int = 10_000
) -> ValidationSummary:
    """Validate the collected results of shard ``part`` into ``validated/part-NNNNN.parquet``.

    Streams slice by slice (``_SLICE_ROWS`` answers at a time), in row groups of ``batch_rows``;
    re-running overwrites the same object.

    :param workload: the task spec the results answer.
    :param layout: the run's S3 layout.
    :param part: the shard's part number.
    :param batch_rows: rows per row group of the validated part (with the slice size, bounds memory).
    """
    summary = ValidationSummary(part)
    schema = validated_schema(workload)
    with (
        layout.store.open(validated_path(layout, part), "wb") as handle,
        parquet_writer(handle, schema, _UNIQUE_COLUMNS) as writer,
        bulk_processing(),  # no collections between slices either: nothing here makes cycles
    ):
        # Read and validate slice by slice: the Python objects of a slice's answers are
        # dropped before the next, and only the validated Arrow columns (a fraction of the
        # results' size) wait for their row group of ``batch_rows``.
        pending: list[pa.RecordBatch] = []
        pending_rows = 0
        for batch in iter_result_batches(layout, part, max(1, min(batch_rows, _SLICE_ROWS))):
            validated = validate_batch(workload, batch)
            del batch
            while validated.num_rows:
                take = min(validated.num_rows, batch_rows - pending_rows)
                pending.append(validated.slice(0, take))
                pending_rows += take
                validated = validated.slice(take)
                if pending_rows == batch_rows:
                    _write_row_group(writer, schema, pending, summary)
                    pending, pending_rows = [], 0
        if pending_rows:
            _write_row_group(writer, schema, pending, summary)
    return_freed_memory()
    return summary


def _write_row_group(
    writer: pq.ParquetWriter, schema: pa.Schema, batches: list[pa.RecordBatch], summary: ValidationSummary
) -> None:
    """Write validated batches as one row group and count them; the memory they held goes back."""
    validated = pa.Table.from_batches(batches, schema=schema)
    batches.clear()
    writer.write_table(validated, row_group_size=max(validated.num_rows, 1))
    summary.rows += validated.num_rows
    status = validated.column("status")
    for item in pc.value_counts(status).to_pylist():
        summary.by_status[item["values"]] = summary.by_status.get(item["values"], 0) + item["counts"]
    failed = validated.column("reason_code").filter(pc.not_equal(status, "valid"))
    for item in pc.value_counts(failed.drop_null()).to_pylist():
        summary.by_reason[item["values"]] = summary.by_reason.get(item["values"], 0) + item["counts"]
    del validated, status, failed
    release_arrow_memory()


def iter_validated(layout: RunLayout, part: int, batch_rows: int = 50_000) -> Iterator[pa.RecordBatch]:
    """The validated rows of shard ``part``, streamed in record batches."""
    with layout.store.open(validated_path(layout, part), "rb") as handle:
        yield from pq.ParquetFile(handle).iter_batches(batch_size=batch_rows)
