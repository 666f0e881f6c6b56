"""The request-line wire format: one JSONL line ``{"custom_id", "params"}`` per request.

Two encoders of the same bytes live here side by side. :class:`RequestEncoder` is the
reference: it serialises the shared parts of a request once per model and each row's custom_id
and content with orjson. :class:`LineLayout` is the fast chunk-wide builder staging uses: it
cuts a line into constant text and per-row columns once, then builds megabytes of lines with
one ``str.join``. Tests hold the two byte for byte equal; a change to the format changes both.

custom_ids are plain ASCII (``[a-zA-Z0-9_-]``) and so go between fixed quotes unescaped; which
record keys are their own custom_id is the rule of :mod:`claude_batch.contracts`
(docs/architecture.md), from which the patterns here are built.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from claude_batch.contracts import AS_IS_CUSTOM_ID, CUSTOM_ID_SHAPE

if TYPE_CHECKING:
    from claude_batch.costs import CacheSetting
    from claude_batch.staging.kernels import TextColumn
    from claude_batch.workloads import Workload

# A whole chunk's keys joined by newlines, each of the custom_id shape. Use with ``fullmatch``.
_AS_IS_CUSTOM_IDS_JOINED = re.compile(rf"(?:{CUSTOM_ID_SHAPE}\n)*{CUSTOM_ID_SHAPE}")
LINE_HEAD = b'{"custom_id":"'


def keys_not_usable_as_is(keys: list[Any]) -> list[int]:
    """Indexes of keys that are not text usable as a custom_id as they are (NULL, ints, hashes...).

    The common case, every key fine, is one regex over the chunk's keys joined by newlines
    (no valid key holds a newline, so the count of separators proves the split); otherwise
    each key is checked on its own.
    """
    if keys and set(map(type, keys)) == {str}:
        joined = "\n".join(keys)
        if (
            "k_" not in joined  # no key can have the reserved hashed shape
            and joined.count("\n") == len(keys) - 1
            and _AS_IS_CUSTOM_IDS_JOINED.fullmatch(joined)
        ):
            return []
    return [i for i, key in enumerate(keys) if type(key) is not str or not AS_IS_CUSTOM_ID.fullmatch(key)]


class RequestEncoder:
    """Encodes one batch request line (``{"custom_id", "params"}`` plus newline) per row, fast.

    The parts every request shares are serialised once per model; a row adds only its
    custom_id and user content, each serialised by orjson, so the line is always valid JSON.
    """

    def __init__(self, workload: Workload, cache_setting: CacheSetting) -> None:
        self.workload = workload
        self.cache_setting = cache_setting
        system, tail = workload.static_params(cache_setting)
        self._system = orjson.dumps(system)
        tail_json = orjson.dumps(tail)
        # ``tail`` is never empty (structured output is always set), so splice its members.
        self.suffix = b"}]," + tail_json[1:] + b"}\n"
        self._prefix_by_model: dict[str, bytes] = {}

    def prefix(self, model: str) -> bytes:
        """The bytes between the custom_id and the user content, for ``model``."""
        prefix = self._prefix_by_model.get(model)
        if prefix is None:
            prefix = (
                b',"params":{"model":'
                + orjson.dumps(model)
                + b',"max_tokens":'
                + str(self.workload.max_tokens).encode()
                + b',"system":'
                + self._system
                + b',"messages":[{"role":"user","content":'
            )
            self._prefix_by_model[model] = prefix
        return prefix

    def encode(self, custom_id: str, content: str, model: str) -> bytes:
        """One JSONL line; raises ``orjson.JSONEncodeError`` on text that is not valid UTF-8.

        :param custom_id: a valid custom_id.
        :param content: the rendered user message.
        :param model: the model for this request.
        """
        return (
            b'{"custom_id":'
            + orjson.dumps(custom_id)
            + self.prefix(model)
            + orjson.dumps(content)
            + self.suffix
        )


# A chunk's lines as columns: constant text repeated on every line, or one value per line.
LineColumns = list[str | list[str]]


class LineLayout:
    """A request line cut into constant text and per-row columns, serialised once per workload.

    A line is ``head, custom_id, opening, field, literal, field, ..., tail``: the opening holds
    the model's params up to the content's opening quote and the template's first literal;
    literals are JSON-escaped here once, fields arrive escaped (:func:`inspect_text_column`).

    :param user_template: the workload's ``str.format`` template.
    :param encoder: the reference encoder, whose prefix and suffix the line reuses.
    """

    def __init__(self, user_template: str, encoder: RequestEncoder) -> None:
        self.encoder = encoder
        # (literal, field name or None) in template order; a field may occur more than once.
        self.template_parts = [
            (literal, name) for literal, name, _spec, _conv in string.Formatter().parse(user_template)
        ]
        segments: list[str | tuple[str]] = []  # constant text, or (field name,)
        pending = ""
        for literal, name in self.template_parts:
            pending += orjson.dumps(literal)[1:-1].decode() if literal else ""
            if name is not None:
                segments.append(pending)
                segments.append((name,))
                pending = ""
        first = segments.pop(0) if segments else pending
        assert isinstance(first, str)  # segments open with the literal before the first field
        self.first_literal = first
        if not segments:  # a template without fields: the first literal was the whole text
            pending = ""
        self.segments = segments
        self.tail = pending + '"' + encoder.suffix.decode()
        self.field_occurrences = [segment[0] for segment in segments if isinstance(segment, tuple)]
        self.literal_chars = sum(len(literal) for literal, _name in self.template_parts if literal)
        self.fixed_bytes = (
            len(LINE_HEAD)
            + len(self.tail.encode())
            + sum(len(segment.encode()) for segment in segments if isinstance(segment, str))
        )
        self._openings: dict[str, str] = {}

    def opening(self, model: str) -> str:
        """The text from the custom_id's closing quote to the first field of the content."""
        opening = self._openings.get(model)
        if opening is None:
            opening = '"' + self.encoder.prefix(model).decode() + '"' + self.first_literal
            self._openings[model] = opening
        return opening

    def line_sizes(
        self, custom_ids: list[str], text: Mapping[str, TextColumn], openings: list[str] | str
    ) -> np.ndarray:
        """UTF-8 bytes of each row's request line.

        :param openings: each row's opening (rows routed to models), or the one every row shares.
        """
        sizes = np.fromiter(map(len, custom_ids), dtype=np.int64, count=len(custom_ids))  # ASCII
        sizes += self.fixed_bytes
        for name in self.field_occurrences:
            sizes += text[name].byte_lengths
        if isinstance(openings, str):
            sizes += len(openings.encode())
        else:
            sizes += np.fromiter((len(o.encode()) for o in openings), dtype=np.int64, count=len(openings))
        return sizes

    def columns(
        self, custom_ids: list[str], text: Mapping[str, TextColumn], openings: list[str] | str
    ) -> LineColumns:
        """The chunk's lines as columns, for :func:`join_lines`."""
        columns: LineColumns = [LINE_HEAD.decode(), custom_ids, openings]
        for segment in self.segments:
            columns.append(text[segment[0]].escaped if isinstance(segment, tuple) else segment)
        columns.append(self.tail)
        return [column for column in columns if column != ""]


def join_lines(columns: LineColumns, start: int, end: int) -> bytes:
    """Lines ``start`` to ``end`` of the columns as UTF-8: one ``str.join``, no object per line."""
    width = len(columns)
    count = end - start
    parts: list[str] = [""] * (width * count)
    for offset, column in enumerate(columns):
        if isinstance(column, str):
            parts[offset::width] = [column] * count
        else:
            parts[offset::width] = column[start:end]
    return "".join(parts).encode("utf-8")
