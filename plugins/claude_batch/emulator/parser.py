"""Incremental parsing of a create-batch body, one request item at a time.

A 100,000-request body can be a few hundred megabytes; parsing it whole would hold the raw
bytes, the decoded text and the full object tree at once. ``RequestsBodyParser`` is fed the
body in chunks and hands out each element of the top-level ``requests`` array as soon as it is
complete, keeping only the unparsed tail of the text in memory.

Most of the array is decoded in bulk with orjson: from the current item to the last place in the
buffer that looks like the start of a new item (``},{"custom_id"``...), all items at once. That
guess is only a guess (the text could sit inside a string or a nested object), but then the
slice is not valid JSON as an array, orjson says so, and those items are decoded one by one
with the standard library's scanner (``JSONDecoder.raw_decode``), as is everything else (the
keys around the array, its tail, values orjson refuses such as NaN or integers over 64 bits),
with the same results and error messages.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from typing import Any

import orjson

_WHITESPACE = " \t\n\r"
# How one item of ``requests`` usually ends and the next begins (an item has only these two keys).
_ITEM_BOUNDARIES = ('},{"custom_id"', '},{"params"', '}, {"custom_id"', '}, {"params"')
_BULK_MIN_CHARS = 32 * 1024  # below this much pending text, items are decoded one by one


class BodyError(ValueError):
    """The body is not valid JSON of the shape ``{"requests": [...]}``."""


class RequestsBodyParser:
    """Feed bytes with ``feed``; iterate the finished request items it yields; call ``finish`` last."""

    # Where the parser is in ``{"key": value, "requests": [item, item], ...}``.
    _OBJECT_START, _KEY, _COLON, _VALUE, _AFTER_VALUE, _ITEM, _AFTER_ITEM, _DONE = range(8)

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._decoder = json.JSONDecoder()
        self._buffer = ""
        self._pos = 0
        self._state = self._OBJECT_START
        self._first_in_container = True
        self._key: str | None = None
        self._retry_when_length = 0  # after an incomplete value, wait for this much text before retrying
        self.saw_requests = False
        self.items_seen = 0

    def feed(self, chunk: bytes) -> Iterator[Any]:
        for items in self.feed_lists(chunk):
            yield from items

    def finish(self) -> Iterator[Any]:
        for items in self.finish_lists():
            yield from items

    def feed_lists(self, chunk: bytes) -> Iterator[list]:
        """``feed``, the items handed out in lists (as many as were decoded at once)."""
        # Keep only the unparsed tail: the buffer never holds more than one pending item plus a chunk.
        self._retry_when_length = max(0, self._retry_when_length - self._pos)
        self._buffer = self._buffer[self._pos :]
        self._pos = 0
        try:
            self._buffer += self._utf8.decode(chunk)
        except UnicodeDecodeError as error:
            raise BodyError(f"Request body is not valid UTF-8: {error}") from None
        yield from self._run(final=False)

    def finish_lists(self) -> Iterator[list]:
        """``finish``, the items handed out in lists."""
        try:
            self._buffer += self._utf8.decode(b"", final=True)
        except UnicodeDecodeError as error:
            raise BodyError(f"Request body is not valid UTF-8: {error}") from None
        yield from self._run(final=True)
        if self._state != self._DONE:
            raise BodyError("Request body is not valid JSON: unexpected end of input")
        if not self.saw_requests:
            raise BodyError("requests: Field required")

    # ---- internals ----------------------------------------------------------------------------
    def _skip_whitespace(self) -> bool:
        """Move past whitespace; False when the buffer ran out."""
        buffer, pos = self._buffer, self._pos
        while pos < len(buffer) and buffer[pos] in _WHITESPACE:
            pos += 1
        self._pos = pos
        return pos < len(buffer)

    def _decode_value(self, final: bool) -> tuple[bool, Any]:
        """(True, value) when a whole JSON value starts at the cursor, (False, None) to wait for more."""
        if not final and len(self._buffer) < self._retry_when_length:
            return False, None
        try:
            if final or len(self._buffer) - self._pos > _BULK_MIN_CHARS:
                value, end = self._decoder.raw_decode(self._buffer, self._pos)
            else:
                # A short pending text on its own: the value cut by the chunk boundary fails here once
                # per chunk, and the error's line count would otherwise run over the whole buffer.
                value, end = self._decoder.raw_decode(self._buffer[self._pos :])
                end += self._pos
        except json.JSONDecodeError as error:
            if final:
                raise BodyError(f"Request body is not valid JSON: {error}") from None
            # Probably cut by the chunk boundary; retry once the pending text has doubled, so a
            # huge element costs linear, not quadratic, re-parsing.
            self._retry_when_length = self._pos + 2 * (len(self._buffer) - self._pos)
            return False, None
        if end == len(self._buffer) and not final:
            # A number may go on in the next chunk; wait unless the value closed with a bracket/quote.
            if self._buffer[end - 1] not in '}]"el':
                return False, None
        self._retry_when_length = 0
        self._pos = end
        return True, value

    def _bulk_items(self) -> list | None:
        """The items from the cursor to the last likely item boundary, decoded at once; None if not."""
        buffer, pos = self._buffer, self._pos
        if len(buffer) - pos < _BULK_MIN_CHARS:
            return None
        # The last boundary is usually in the last item: look there first (a boundary that never
        # occurs would otherwise be searched for through the whole buffer).
        tail = max(pos, len(buffer) - _BULK_MIN_CHARS)
        cut = max(buffer.rfind(boundary, tail) for boundary in _ITEM_BOUNDARIES)
        if cut < 0 and tail > pos:
            cut = max(buffer.rfind(boundary, pos, tail + 16) for boundary in _ITEM_BOUNDARIES)
        if cut <= pos:
            return None
        try:
            items = orjson.loads("[" + buffer[pos : cut + 1] + "]")
        except orjson.JSONDecodeError:
            return None  # the guess was wrong, or something orjson refuses: one by one
        self._pos = cut + 1
        self._retry_when_length = 0
        return items

    def _expect(self, char: str, what: str) -> None:
        found = self._buffer[self._pos]
        if found != char:
            raise BodyError(
                f"Request body is not valid JSON: expected {what} at character {self._pos}, found {found!r}"
            )
        self._pos += 1

    def _run(self, final: bool) -> Iterator[list]:
        while True:
            if self._state == self._DONE:
                if self._skip_whitespace():
                    raise BodyError("Request body is not valid JSON: extra data after the top-level object")
                return
            if not self._skip_whitespace():
                return
            char = self._buffer[self._pos]
            state = self._state
            if state == self._OBJECT_START:
                if char != "{":
                    raise BodyError("Request body must be a JSON object with a 'requests' list")
                self._pos += 1
                self._state, self._first_in_container = self._KEY, True
            elif state == self._KEY:
                if char == "}" and self._first_in_container:
                    self._pos += 1
                    self._state = self._DONE
                    continue
                if char != '"':
                    raise BodyError(
                        f"Request body is not valid JSON: expected a key at character {self._pos}"
                    )
                complete, key = self._decode_value(final)
                if not complete:
                    return
                self._key, self._state = key, self._COLON
            elif state == self._COLON:
                self._expect(":", "':'")
                self._state = self._VALUE
            elif state == self._VALUE:
                if self._key == "requests":
                    if char != "[":
                        raise BodyError("requests: Input should be a valid list")
                    self.saw_requests = True
                    self._pos += 1
                    self._state, self._first_in_container = self._ITEM, True
                    continue
                complete, _ignored = self._decode_value(final)
                if not complete:
                    return
                self._state = self._AFTER_VALUE
            elif state == self._AFTER_VALUE:
                if char == "}":
                    self._pos += 1
                    self._state = self._DONE
                else:
                    self._expect(",", "',' or '}'")
                    self._state, self._first_in_container = self._KEY, False
            elif state == self._ITEM:
                if char == "]" and self._first_in_container:
                    self._pos += 1
                    self._state = self._AFTER_VALUE
                    continue
                bulk = self._bulk_items() if char == "{" else None
                if bulk is not None:
                    self._state = self._AFTER_ITEM
                    self.items_seen += len(bulk)
                    yield bulk
                    continue
                complete, item = self._decode_value(final)
                if not complete:
                    return
                self._state = self._AFTER_ITEM
                self.items_seen += 1
                yield [item]
            elif state == self._AFTER_ITEM:
                if char == "]":
                    self._pos += 1
                    self._state = self._AFTER_VALUE
                else:
                    self._expect(",", "',' or ']'")
                    self._state, self._first_in_container = self._ITEM, False
