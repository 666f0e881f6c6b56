"""Result lines into rows: parse the API's JSONL into Arrow columns, then a results table.

The results' columns (:data:`RESULTS_SCHEMA`) are defined here, once: collect writes them,
validation and the load read them. Parsing is the hot loop of collect: a chunk's lines are
decoded at once by a typed msgspec decoder that reads only the fields a row takes, and every line
it refuses is parsed whole with orjson (the reference, whose rows and errors the decoder's must
match). A call's lines live as Python tuples only until the call returns, then as Arrow arrays.
Cost is computed per row group from the price table (null where the model has no price).
Airflow-free, and no I/O but the Parquet writer's handle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Annotated, Any, Protocol

import msgspec
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from msgspec import UNSET, UnsetType

from claude_batch.costs import PriceTable, cost_array

RESULTS_SCHEMA = pa.schema(
    [
        ("custom_id", pa.string()),
        ("record_key", pa.string()),
        ("outcome", pa.string()),
        ("text", pa.string()),
        ("tool_input_json", pa.string()),
        ("stop_reason", pa.string()),
        ("model", pa.string()),
        ("input_tokens", pa.int64()),
        ("output_tokens", pa.int64()),
        ("cache_creation_input_tokens", pa.int64()),
        ("cache_read_input_tokens", pa.int64()),
        ("cache_creation_5m_input_tokens", pa.int64()),
        ("cache_creation_1h_input_tokens", pa.int64()),
        ("cost_usd", pa.float64()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("prompt_version", pa.string()),
        ("batch_id", pa.string()),
    ]
)
# Columns with a value per row (see parquet_writer).
RESULTS_UNIQUE_COLUMNS = frozenset({"custom_id", "record_key", "text", "tool_input_json", "error_message"})
_TOKEN_COLUMNS = (
    "input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
    "cache_creation_5m_input_tokens", "cache_creation_1h_input_tokens",
)  # fmt: skip


class ShardPositions(Protocol):
    """Where each custom_id is among a shard's keys (``results._ShardKeys``)."""

    def positions(self, ids: Sequence[str], id_array: pa.Array) -> pa.Array: ...


# The fields of a parsed row tuple: RESULTS_SCHEMA without the columns set per row group (the
# record key, looked up by custom_id; cost, prompt version and batch id).
_ROW_FIELDS = (
    "custom_id", "outcome", "text", "tool_input_json", "stop_reason", "model", *_TOKEN_COLUMNS,
    "error_type", "error_message",
)  # fmt: skip
_ROW_TYPES = tuple(pa.int64() if name in _TOKEN_COLUMNS else pa.string() for name in _ROW_FIELDS)
# The token columns in the order of cost_array's parameters.
_COST_TOKENS = (
    "input_tokens", "output_tokens", "cache_creation_5m_input_tokens", "cache_creation_1h_input_tokens",
    "cache_read_input_tokens",
)  # fmt: skip
_NO_USAGE: dict[str, Any] = {}


def _content_payloads(content: Iterable[dict[str, Any]]) -> tuple[str | None, str | None]:
    """(text, tool input as JSON) of a message's content blocks: the texts joined, the first tool input."""
    texts = []
    tool_input = None
    for block in content:
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "tool_use" and tool_input is None:
            tool_input = orjson.dumps(block.get("input")).decode()
    return ("".join(texts) if texts else None), tool_input


def _unsucceeded_row(custom_id: str, outcome: str, result: dict[str, Any]) -> tuple[Any, ...]:
    """The row of a request that did not succeed (errored, canceled, expired or unknown)."""
    error_type = error_message = None
    if outcome == "errored":
        # The error object is nested twice: {"error": {"type": "error", "error": {...}}}.
        error = result.get("error") or {}
        nested = error.get("error")
        inner: dict[str, Any] = nested if isinstance(nested, dict) else error
        error_type, error_message = inner.get("type"), inner.get("message")
    return (custom_id, outcome, None, None, None, None, 0, 0, 0, 0, 0, 0, error_type, error_message)


def _line_row(line: bytes) -> tuple[Any, ...]:
    """The row of one result line, parsed as a whole: the reference for :func:`_typed_rows`.

    Used for the lines the typed decoder refuses; raises ``orjson.JSONDecodeError``,
    ``KeyError``, ``TypeError`` or ``AttributeError`` at a line that is not a whole result.
    """
    record = orjson.loads(line)
    result = record["result"]
    outcome = result["type"]
    if outcome != "succeeded":
        return _unsucceeded_row(record["custom_id"], outcome, result)
    message = result["message"]
    content: Sequence[dict[str, Any]] = message.get("content") or ()
    if len(content) == 1 and content[0].get("type") == "text":
        text, tool_input = content[0].get("text"), None
    else:
        text, tool_input = _content_payloads(content)
    usage = message.get("usage") or _NO_USAGE
    written = usage.get("cache_creation_input_tokens") or 0
    creation = usage.get("cache_creation")
    if creation:
        written_5m = creation.get("ephemeral_5m_input_tokens") or 0
        written_1h = creation.get("ephemeral_1h_input_tokens") or 0
    else:  # no split reported: price the writes as 5-minute writes, the API's default TTL
        written_5m, written_1h = written, 0
    return (
        record["custom_id"], "succeeded", text, tool_input, message.get("stop_reason"), message.get("model"),
        usage.get("input_tokens") or 0, usage.get("output_tokens") or 0, written,
        usage.get("cache_read_input_tokens") or 0, written_5m, written_1h, None, None,
    )  # fmt: skip


# The typed decoder's view of a result line: only the fields a row takes. Each field is typed as
# strictly as the rows need (ints in int64, strings as strings); a line it refuses, or one that
# makes the row fail, goes through _line_row, so every row and every error is that function's.
_Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class _Block(msgspec.Struct):
    type: str | None = None
    text: str | UnsetType = UNSET
    input: msgspec.Raw | UnsetType = UNSET


class _Usage(msgspec.Struct):
    input_tokens: _Int64 | None = None
    output_tokens: _Int64 | None = None
    cache_creation_input_tokens: _Int64 | None = None
    cache_read_input_tokens: _Int64 | None = None
    cache_creation: dict[str, _Int64 | None] | None = None


class _Message(msgspec.Struct):
    content: list[_Block] | None = None
    stop_reason: str | None = None
    model: str | None = None
    usage: _Usage | None = None


class _Result(msgspec.Struct):
    type: str
    message: _Message | None = None
    error: dict[str, Any] | None = None


class _Record(msgspec.Struct):
    custom_id: str
    result: _Result


_RECORD_DECODER = msgspec.json.Decoder(_Record)
_NO_BLOCKS: list[_Block] = []
_NO_TYPED_USAGE = _Usage()
_OPEN, _CLOSE, _NEWLINE = b"{}\n"


def _is_utf8(data: bytes) -> bool:
    """Whether ``data`` is UTF-8: orjson refuses any line that is not, msgspec only the fields it reads."""
    if data.isascii():
        return True
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def _split_lines(block: bytes) -> list[bytes]:
    """The non-empty lines of a block (as collect has always read a stream's lines)."""
    return [line for line in block.split(b"\n") if line]


def _decoded_or_none(line: bytes) -> _Record | None:
    """The line's typed record, or None where the typed decoder refuses it."""
    try:
        return _RECORD_DECODER.decode(line)
    except Exception:  # refused: the reference parse decides
        return None


def _block_records(block: bytes) -> list[_Record] | None:
    """A block's typed records, one a line, or None unless each line is one whole record.

    ``decode_lines`` reads values one after another, whatever the lines: the block is taken only
    when each line starts with ``{`` and ends with ``}`` (no value can then run past a line's end,
    since ``{`` cannot follow ``}`` inside one) and there are as many values as lines. The bytes
    are checked with numpy: Python's own byte counts cost as much as splitting the lines.
    """
    data = np.frombuffer(block, dtype=np.uint8)
    ends = np.flatnonzero(data == _NEWLINE)
    if not (
        len(ends)
        and ends[-1] == len(data) - 1
        and data[0] == _OPEN
        and bool((data[ends - 1] == _CLOSE).all())
        and bool((data[ends[:-1] + 1] == _OPEN).all())
    ):
        return None
    try:
        records = _RECORD_DECODER.decode_lines(block)
    except Exception:  # some line refused: line by line
        return None
    return records if len(records) == len(ends) else None


def _parse_lines(lines: list[bytes], append: Callable[[tuple[Any, ...]], None]) -> None:
    """Append each line's row, as :func:`_line_row` makes it (and raise where it raises)."""
    if not _is_utf8(b"".join(lines)):  # the typed decoder does not check the UTF-8 of what it skips
        for line in lines:
            append(_line_row(line))
        return
    _typed_rows(list(map(_decoded_or_none, lines)), lines.__getitem__, append)


def _parse_block(block: bytes, append: Callable[[tuple[Any, ...]], None]) -> None:
    """Append the row of each non-empty line of ``block``, as :func:`_parse_lines` would."""
    records = _block_records(block) if _is_utf8(block) else None
    if records is None:
        _parse_lines(_split_lines(block), append)
        return
    lines: list[bytes] = []

    def line_at(place: int) -> bytes:  # split only where a line needs the reference parse
        if not lines:
            lines.extend(_split_lines(block))
        return lines[place]

    _typed_rows(records, line_at, append)


def _typed_payloads(content: list[_Block]) -> tuple[str | None, str | None]:
    """:func:`_content_payloads` of typed blocks."""
    texts = []
    tool_input = None
    for block in content:
        kind = block.type
        if kind == "text":
            texts.append("" if block.text is UNSET else block.text)
        elif kind == "tool_use" and tool_input is None:
            # Parsed as _line_row parses it (orjson, floats for ints past 64 bits), then dumped.
            value = None if block.input is UNSET else orjson.loads(memoryview(block.input))
            tool_input = orjson.dumps(value).decode()
    return ("".join(texts) if texts else None), tool_input


def _typed_rows(
    records: Sequence[_Record | None],
    line_at: Callable[[int], bytes],
    append: Callable[[tuple[Any, ...]], None],
) -> None:
    """Append each record's row (:func:`_line_row`'s of its line, which decides where it is None).

    :param records: the typed record of each line (None: refused).
    :param line_at: the line at a place (for the reference parse).
    :param append: takes each row.
    """
    for place, record in enumerate(records):
        try:
            if record is None:
                raise ValueError("refused by the typed decoder")
            result = record.result
            outcome = result.type
            if outcome != "succeeded":
                append(_unsucceeded_row(record.custom_id, outcome, {"error": result.error}))
                continue
            message = result.message
            if message is None:  # missing or null: the reference parse raises as it should
                raise ValueError("no message")
            # Inlined, not a function per line: this loop is most of collect's time.
            content = message.content or _NO_BLOCKS
            if len(content) == 1 and content[0].type == "text":
                only_text = content[0].text
                text, tool_input = (only_text if isinstance(only_text, str) else None), None
            else:
                text, tool_input = _typed_payloads(content)
            usage = message.usage or _NO_TYPED_USAGE
            written = usage.cache_creation_input_tokens or 0
            creation = usage.cache_creation
            if creation:
                written_5m = creation.get("ephemeral_5m_input_tokens") or 0
                written_1h = creation.get("ephemeral_1h_input_tokens") or 0
            else:
                written_5m, written_1h = written, 0
            append(
                (
                    record.custom_id, "succeeded", text, tool_input, message.stop_reason, message.model,
                    usage.input_tokens or 0, usage.output_tokens or 0, written,
                    usage.cache_read_input_tokens or 0, written_5m, written_1h, None, None,
                )
            )  # fmt: skip
        except Exception:  # refused, or the row fails: the reference parse decides (and raises)
            append(_line_row(line_at(place)))


class ResultRows:
    """Result lines parsed into Arrow columns, one call's lines at a time, until they become a table.

    A call's rows live as Python tuples only until it returns: a row group held as Python objects
    would take several times its Arrow size, and leave the heap fragmented after.

    :param keys: the shard's keys; when given, each row's place among them is kept as the column
        ``position`` (null for an id that is not the shard's).
    """

    def __init__(self, keys: ShardPositions | None = None) -> None:
        self.keys = keys
        self.pieces: list[list[pa.Array]] = []
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add_lines(self, lines: Iterable[bytes]) -> None:
        """Parse result lines (JSON) into rows.

        Raises ``orjson.JSONDecodeError``, ``KeyError``, ``TypeError``, ``AttributeError`` or
        ``pyarrow.ArrowException`` at the first line that is not a whole result; the lines before
        it are kept.
        """
        self._add(_parse_lines, lines if isinstance(lines, list) else list(lines))

    def add_block(self, block: bytes) -> None:
        """Parse the non-empty lines of ``block`` (lines ended by newlines, the last maybe not), as
        :meth:`add_lines` would parse them, without a Python object per line where they are whole.
        """
        self._add(_parse_block, block)

    def _add(self, parse: Callable[[Any, Callable[[tuple[Any, ...]], None]], None], data: Any) -> None:
        """Parse ``data`` into rows; the rows made before an error are kept, then it is raised."""
        rows: list[tuple[Any, ...]] = []
        try:
            parse(data, rows.append)
        finally:
            if rows:
                self._add_piece(rows)

    def _add_piece(self, rows: list[tuple[Any, ...]]) -> None:
        columns = list(zip(*rows, strict=True))
        piece = [pa.array(values, kind) for kind, values in zip(_ROW_TYPES, columns, strict=True)]
        if self.keys is not None:
            piece.append(self.keys.positions(columns[0], piece[0]))
        self.pieces.append(piece)
        self.size += len(rows)

    def columns(self) -> dict[str, pa.ChunkedArray]:
        """The rows as one column per field of :data:`_ROW_FIELDS` (and ``position``), one chunk a call."""
        names: tuple[str, ...] = _ROW_FIELDS
        kinds: tuple[pa.DataType, ...] = _ROW_TYPES
        if self.keys is not None:
            names, kinds = (*names, "position"), (*kinds, pa.int32())
        return {
            name: pa.chunked_array([piece[index] for piece in self.pieces], kind)
            for index, (name, kind) in enumerate(zip(names, kinds, strict=True))
        }

    def clear(self) -> None:
        self.pieces.clear()
        self.size = 0


def results_table(
    fields: dict[str, pa.ChunkedArray],
    record_keys: pa.Array | pa.ChunkedArray,
    prompt_version: str | None,
    batch_id: str,
    prices: PriceTable,
) -> pa.Table:
    """Parsed rows as a :data:`RESULTS_SCHEMA` table, with the columns set per row group.

    :param fields: the rows' fields (:meth:`ResultRows.columns`).
    :param record_keys: the record key of each row, in row order (null where unknown).
    :param prompt_version: the run's prompt version.
    :param batch_id: the batch the rows came from.
    :param prices: the price table for ``cost_usd``.
    """
    size = len(record_keys)
    columns = {
        **fields,
        "record_key": record_keys,
        "cost_usd": _cost_column(fields["model"], fields, prices),
        "prompt_version": pa.array([prompt_version] * size, pa.string()),
        "batch_id": pa.array([batch_id] * size, pa.string()),
    }
    return pa.Table.from_arrays([columns[f.name] for f in RESULTS_SCHEMA], schema=RESULTS_SCHEMA)


def _cost_column(models: pa.ChunkedArray, tokens: dict[str, pa.ChunkedArray], prices: PriceTable) -> pa.Array:
    """``cost_usd`` per row: null where the model has no price, 0 for rows without a message.

    Cost is linear in each token count, so each of the row group's few models (None for rows
    without a message) is priced once per kind of token and the rows are weighed with numpy.
    """
    distinct = pc.unique(models)
    names: list[str | None] = distinct.to_pylist()
    codes = pc.index_in(models, value_set=distinct).to_numpy()  # a null model finds the null entry
    cost = np.zeros(len(models), dtype=np.float64)
    for kind, name in enumerate(_COST_TOKENS):
        # One token of this kind and none of the others: the price of one such token per model.
        ones = [np.full(len(names), float(position == kind)) for position in range(len(_COST_TOKENS))]
        unit_cost = cost_array(names, ones[0], ones[1], ones[2], ones[3], ones[4], prices)
        cost += unit_cost[codes] * tokens[name].to_numpy()
    return pa.array(cost, pa.float64(), mask=np.isnan(cost))


def parquet_writer(handle: Any, schema: pa.Schema, unique_columns: frozenset[str]) -> pq.ParquetWriter:
    """A zstd Parquet writer for the data path's parts.

    :param handle: the open file (a store handle).
    :param schema: the part's columns.
    :param unique_columns: columns with a value per row, written without a dictionary: for them one
        would be built and then given up, which costs a fifth of the write.
    """
    use_dictionary = [name for name in schema.names if name not in unique_columns]
    return pq.ParquetWriter(handle, schema, compression="zstd", use_dictionary=use_dictionary)
