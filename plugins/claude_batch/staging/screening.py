"""Which rows of a chunk can be sent: every check staging makes, and the reason for each reject.

A row is sent only with a usable record key (its custom_id follows the rule of
docs/architecture.md), the first of its key in the extract, with every required text field
present, non-blank, valid UTF-8 and free of control characters (or stripped of them, by the
workload's policy), routed to a priced model whose context window holds it. Every other row is
rejected with a reason code and written to the rejects file; none is dropped silently.

Each check runs over whole columns of the chunk; the rare bad rows leave through slow paths
that look at one row at a time to name the reason.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from claude_batch.contracts import custom_id_for
from claude_batch.costs import CHARS_PER_TOKEN, REQUEST_OVERHEAD_TOKENS, PriceTable
from claude_batch.staging.chunks import BINARY_TYPES, Chunk, column_of
from claude_batch.staging.dedup import SeenKeys
from claude_batch.staging.kernels import (
    BAD_CHARS,
    CONTROL_CHARS,
    describe_bad_char,
    inspect_text_column,
    rows_with_control_chars,
)
from claude_batch.staging.manifest import StagingError
from claude_batch.staging.wire import LineLayout, keys_not_usable_as_is
from claude_batch.staging.writers import Rejections, jsonable_row
from claude_batch.workloads import Workload


def max_content_chars(workload: Workload, prices: PriceTable) -> dict[str, int]:
    """The longest user content (in characters, ~4 a token) that fits each model's window.

    :raises StagingError: when a model of the workload has no price.
    """
    for model in set(workload.models):
        if prices.find(model) is None:
            raise StagingError(f"workload {workload.name!r} uses model {model!r}, which has no price")
    return {
        model: (
            prices.for_model(model).context_window
            - workload.max_tokens
            - workload.prefix_tokens
            - REQUEST_OVERHEAD_TOKENS
        )
        * CHARS_PER_TOKEN
        for model in set(workload.models)
    }


class RowScreen:
    """Checks a chunk step by step, rejecting (with its reason) and dropping each bad row.

    :param workload: the task spec (required fields, control-character policy, routing).
    :param key_field: the row field holding the record key.
    :param key_name: the key column as error messages name it.
    :param lines: the line layout (the template's fields and literals).
    :param content_limits: :func:`max_content_chars` of the workload.
    :param rejections: where rejected rows go.
    """

    def __init__(
        self,
        workload: Workload,
        key_field: str,
        key_name: str,
        lines: LineLayout,
        content_limits: dict[str, int],
        rejections: Rejections,
    ) -> None:
        self.workload = workload
        self.key_field = key_field
        self.key_name = key_name
        self.lines = lines
        self.max_content_chars = content_limits
        self.rejections = rejections
        self.text_fields = set(workload.required_text_fields)
        self.strip_controls = workload.control_characters == "strip"
        self.allowed_models = set(workload.models)
        self.seen = SeenKeys()

    def check_keys(self, chunk: Chunk) -> None:
        """A usable record key and its custom_id for each row."""
        keys = column_of(chunk.rows, self.key_field)
        custom_ids = keys
        drop: set[int] = set()
        unusual = keys_not_usable_as_is(keys)
        if unusual:
            custom_ids = list(keys)
            for index in unusual:
                key, custom_id = self._slow_key(chunk.numbers[index], chunk.rows[index], keys[index])
                if key is None:
                    drop.add(index)
                else:
                    keys[index], custom_ids[index] = key, custom_id
        chunk.keys, chunk.custom_ids = keys, custom_ids
        chunk.drop(drop)

    def check_duplicates(self, chunk: Chunk) -> None:
        """The first row with a key is the item; later rows with the same key are rejected."""
        drop = set(self.seen.repeated(chunk.keys))
        for index in sorted(drop):
            self._reject_duplicate(chunk.numbers[index], chunk.keys[index], chunk.rows[index])
        chunk.drop(drop)

    def check_fields(self, chunk: Chunk) -> None:
        """Template fields as text: required ones present and not blank, NULL optional ones empty."""
        drop: set[int] = set()
        for _literal, name in self.lines.template_parts:
            if name is None or name in chunk.fields:
                continue
            column = column_of(chunk.rows, name)
            kinds = set(map(type, column))
            if name in self.text_fields:
                if kinds != {str} or "" in column or any(map(str.isspace, column)):
                    for index, value in enumerate(column):
                        if index in drop or (type(value) is str and value and not value.isspace()):
                            continue
                        ok, text = self._slow_text(
                            chunk.numbers[index], chunk.keys[index], chunk.rows[index], name, value
                        )
                        if ok:
                            column[index] = text
                        else:
                            drop.add(index)
            elif None in column:
                column = ["" if value is None else value for value in column]
            if kinds != {str}:
                # What str.format_map does with a plain {field}: format(value, "").
                column = [value if type(value) is str else format(value, "") for value in column]
            if self.strip_controls:  # on the text as it will be sent (decoded bytes, formatted values)
                self._strip_control_characters(column)
                if name in self.text_fields and ("" in column or any(map(str.isspace, column))):
                    for index, value in enumerate(column):
                        if index not in drop and (not value or value.isspace()):
                            drop.add(index)
                            self.reject(
                                chunk.numbers[index], chunk.keys[index], chunk.keys[index], "empty_text",
                                f"field {name!r} is empty once control characters are stripped",
                                chunk.rows[index],
                            )  # fmt: skip
            chunk.fields[name] = column
        chunk.drop(drop)

    @staticmethod
    def _strip_control_characters(column: list[str]) -> None:
        """Policy ``strip``: remove control characters from the column's text, in place."""
        for index in rows_with_control_chars(column):
            column[index] = CONTROL_CHARS.sub("", column[index])

    def check_text(self, chunk: Chunk) -> None:
        """Reject rows whose fields hold control characters or invalid UTF-8; escape the rest."""
        while True:
            text = {name: inspect_text_column(column) for name, column in chunk.fields.items()}
            bad: dict[int, tuple[str, str, str]] = {}
            for name, column in text.items():
                for index, (code, what) in column.bad_rows.items():
                    bad.setdefault(index, (name, code, what))
            if not bad:
                chunk.text = text
                return
            for index, (name, code, what) in sorted(bad.items()):
                key = chunk.keys[index]
                self.reject(
                    chunk.numbers[index], key, key, code, f"field {name!r} holds {what}", chunk.rows[index]
                )
            chunk.drop(set(bad))

    def content_chars(self, chunk: Chunk) -> np.ndarray:
        """Characters of each row's user content (the template's literals and its fields)."""
        lengths = np.full(len(chunk), self.lines.literal_chars, dtype=np.int64)
        for name in self.lines.field_occurrences:
            lengths += chunk.text[name].char_lengths
        return lengths

    def check_models_and_sizes(self, chunk: Chunk) -> None:
        """The model of each request, and whether the content fits its context window."""
        drop: set[int] = set()
        if self.workload.route is None:
            chunk.models = [self.workload.model] * len(chunk)
        else:
            models = [
                self._route(number, key, row)
                for number, key, row in zip(chunk.numbers, chunk.keys, chunk.rows, strict=True)
            ]
            drop.update(index for index, model in enumerate(models) if model is None)
            chunk.models = [model or "" for model in models]
        lengths = self.content_chars(chunk).tolist()
        if lengths and max(lengths) > min(self.max_content_chars.values()):
            for index, length in enumerate(lengths):
                model = chunk.models[index]
                if index not in drop and length > self.max_content_chars[model]:
                    drop.add(index)
                    self.reject(
                        chunk.numbers[index], chunk.keys[index], chunk.keys[index], "too_long",
                        f"text too long for {model}: about {length // CHARS_PER_TOKEN} tokens of content, "
                        f"with the prompt and max_tokens {self.workload.max_tokens}, exceeds the context "
                        "window",
                        chunk.rows[index],
                    )  # fmt: skip
        chunk.drop(drop)

    def reject(
        self,
        row_number: int,
        record_key: str | None,
        ledger_key: str | None,
        code: str,
        reason: str,
        row: Mapping[str, Any],
    ) -> None:
        """Write the row to the rejects file with its reason (it is then dropped by the caller)."""
        self.rejections.add(row_number, record_key, ledger_key, code, reason, jsonable_row(row))

    # -- the slow paths (bad input, rare) -------------------------------------------------

    def _slow_key(self, row_number: int, row: Mapping[str, Any], raw: Any) -> tuple[str | None, str]:
        """(the key as text, its custom_id), or (None, "") after rejecting the row."""
        key_name = self.key_name
        if raw is None:
            reason = "is NULL" if self.key_field in row else "is missing"
            self.reject(row_number, None, None, "null_key", f"record key {key_name!r} {reason}", row)
            return None, ""
        if isinstance(raw, BINARY_TYPES):
            raw = self._decoded(raw, row_number, None, "invalid_key", "record key", row)
            if raw is None:
                return None, ""
        key = raw if isinstance(raw, str) else str(raw)
        if not key or key.isspace():
            self.reject(row_number, None, None, "empty_key", f"record key {key_name!r} is empty", row)
            return None, ""
        if BAD_CHARS.search(key):
            _code, what = describe_bad_char(key)
            self.reject(row_number, None, None, "invalid_key", f"record key holds {what}", row)
            return None, ""
        return key, custom_id_for(key)

    def _slow_text(
        self, row_number: int, key: str, row: Mapping[str, Any], name: str, value: Any
    ) -> tuple[bool, Any]:
        """(True, the value as usable text), or (False, None) after rejecting the row."""
        if value is None:
            code, what = ("null_text", "is NULL") if name in row else ("missing_field", "is missing")
            self.reject(row_number, key, key, code, f"field {name!r} {what}", row)
            return False, None
        if isinstance(value, BINARY_TYPES):
            value = self._decoded(value, row_number, key, "invalid_utf8", f"field {name!r}", row)
            if value is None:
                return False, None
        elif not isinstance(value, str):
            return True, value  # numbers and dates are rendered by the template as they are
        if not value or value.isspace():
            self.reject(row_number, key, key, "empty_text", f"field {name!r} is empty", row)
            return False, None
        return True, value

    def _decoded(
        self,
        raw: bytes | bytearray | memoryview,
        row_number: int,
        key: str | None,
        code: str,
        subject: str,
        row: Mapping[str, Any],
    ) -> str | None:
        """Bytes as UTF-8 text, or None after rejecting the row (``subject`` names the value)."""
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            reason = f"{subject} is not valid UTF-8 ({exc.reason} at byte {exc.start})"
            self.reject(row_number, key, key, code, reason, row)
            return None

    def _route(self, row_number: int, key: str, row: Mapping[str, Any]) -> str | None:
        """The model the workload's rule chooses, or None after rejecting the row."""
        assert self.workload.route is not None
        try:
            model = self.workload.route(row)
        except Exception as exc:  # a user's rule failing on one row must not abort the run
            self.reject(
                row_number,
                key,
                key,
                "routing_error",
                f"routing rule failed: {type(exc).__name__}: {exc}",
                row,
            )
            return None
        if model not in self.allowed_models:
            self.reject(
                row_number,
                key,
                key,
                "routing_error",
                f"routing rule chose {model!r}, not in route_models",
                row,
            )
            return None
        return model

    def _reject_duplicate(self, row_number: int, key: str, row: Mapping[str, Any]) -> None:
        """Reject a later row with an earlier row's key, as a ledger item of its own."""
        row_json = jsonable_row(row)
        # The first row with the key is the item; each later one is its own ledger item.
        ledger_key = self.rejections.unique(f"{key}#dup-{hashlib.sha256(row_json).hexdigest()[:12]}")
        self.rejections.add(
            row_number, key, ledger_key, "duplicate_key",
            f"duplicate record key {key!r}: an earlier row of this extract has the same key and is "
            "the one sent",
            row_json,
        )  # fmt: skip
