"""Text kernels of staging: whole-chunk checks and JSON escaping, as pure functions.

Each function takes a chunk's column of text and answers for every row at once with a few
C-level passes (``str.join``, ``str.replace``, numpy over the UTF-8 bytes) instead of work per
row: this is the hot path of staging. A row is bad when its text holds a control character
other than tab, newline and carriage return, DEL, or a lone surrogate (what invalid UTF-8
becomes under ``surrogateescape``). Escaped text is byte for byte what ``orjson.dumps`` writes
between a JSON string's quotes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# C0 controls other than tab, newline and carriage return, DEL, and lone surrogates: one scan
# finds any of them.
BAD_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SURROGATES = re.compile(r"[\ud800-\udfff]")
# What JSON needs escaped once other control characters are rejected; backslash goes first.
# Up to this mean length, a column's lengths are read off its separators (see below).
_SHORT_VALUE_BYTES = 48
_JSON_ESCAPES = (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\t", "\\t"), ("\r", "\\r"))


def describe_bad_char(text: str) -> tuple[str, str]:
    """(reason_code, description) for the first control character or lone surrogate."""
    surrogate = _SURROGATES.search(text)
    control = CONTROL_CHARS.search(text)
    if surrogate is not None and (control is None or surrogate.start() < control.start()):
        return (
            "invalid_utf8",
            f"invalid UTF-8 (lone surrogate U+{ord(surrogate.group()):04X} at character {surrogate.start()})",
        )
    if control is None:
        return "invalid_utf8", "text that is not valid UTF-8"
    return (
        "control_character",
        f"control character U+{ord(control.group()):04X} at character {control.start()}",
    )


def rows_with_control_chars(contents: list[str]) -> list[int]:
    """Indexes of the contents holding a control character other than tab, newline or CR, or DEL.

    One numpy pass over the chunk's text instead of a regex per row (Python's ``re`` scans a
    character class at a few nanoseconds a character; this is a small fraction of that).
    """
    joined = "\n".join(contents)
    ascii_only = joined.isascii()
    data = np.frombuffer(joined.encode("utf-8", "surrogatepass"), dtype=np.uint8)
    low = data < 32
    # Counting is much cheaper than locating: the usual chunk holds only tabs, newlines and CRs.
    if "\x7f" not in joined and np.count_nonzero(low) == sum(
        np.count_nonzero(data == allowed) for allowed in (9, 10, 13)
    ):
        return []
    if "\x7f" in joined:
        low |= data == 127
    suspects = np.flatnonzero(low)
    if suspects.size == 0:
        return []
    values = data[suspects]
    bad = suspects[(values != 9) & (values != 10) & (values != 13)]
    if bad.size == 0:
        return []
    # Byte offset -> row: each content is followed by one separator byte.
    if ascii_only:
        lengths = np.fromiter((len(c) + 1 for c in contents), dtype=np.int64, count=len(contents))
    else:
        lengths = np.fromiter(
            (len(c.encode("utf-8", "surrogatepass")) + 1 for c in contents),
            dtype=np.int64,
            count=len(contents),
        )
    ends = np.cumsum(lengths)
    return sorted(set(np.searchsorted(ends, bad, side="right").tolist()))


@dataclass
class TextColumn:
    """One template field over a chunk: checked, and escaped for a JSON string.

    :param escaped: each value as it goes between the JSON string's quotes.
    :param char_lengths: characters of each value (the context-window and cost estimates).
    :param byte_lengths: UTF-8 bytes of each escaped value (the line sizes).
    :param bad_rows: index -> (reason_code, description) of values that cannot be sent.
    """

    escaped: list[str]
    char_lengths: np.ndarray
    byte_lengths: np.ndarray
    bad_rows: dict[int, tuple[str, str]]

    def take(self, keep: list[int]) -> TextColumn:
        return TextColumn(
            [self.escaped[i] for i in keep], self.char_lengths[keep], self.byte_lengths[keep], {}
        )


def inspect_text_column(values: list[str]) -> TextColumn:
    """Check and JSON-escape a column of text in a few passes over the whole chunk.

    Control characters other than tab, newline and CR, DEL, and lone surrogates (invalid UTF-8)
    make a row bad. The rest needs only backslash, quote, tab, newline and CR escaped, which
    ``str.replace`` does at memory speed on the values joined by NUL (a separator no good value
    holds); a column needing none of it (the usual case) is used as it is, with no copy per row.
    The result is byte for byte what ``orjson.dumps`` writes between the quotes.
    """
    count = len(values)
    if not count:
        empty = np.empty(0, dtype=np.int64)
        return TextColumn([], empty, empty, {})
    joined = "\x00".join(values)
    ascii_only = joined.isascii()
    data = np.frombuffer(joined.encode("utf-8", "surrogatepass"), dtype=np.uint8)
    # A value holding a NUL itself (bad, found below) spoils the separators' count.
    separators = np.flatnonzero(data == 0) if ascii_only and len(data) <= _SHORT_VALUE_BYTES * count else None
    if separators is not None and len(separators) == count - 1:
        char_lengths = _lengths_between(separators, len(data))
    else:
        char_lengths = np.fromiter(map(len, values), dtype=np.int64, count=count)
    controls = int(np.count_nonzero(data < 32)) - (count - 1)  # less the separators
    escapable = controls and sum(int(np.count_nonzero(data == allowed)) for allowed in (9, 10, 13))
    bad_rows: dict[int, tuple[str, str]] = {}
    if controls != escapable or "\x7f" in joined:
        bad_rows.update((i, describe_bad_char(values[i])) for i in rows_with_control_chars(values))
    if not ascii_only and _SURROGATES.search(joined):
        bad_rows.update(
            (i, describe_bad_char(value)) for i, value in enumerate(values) if _SURROGATES.search(value)
        )
    if bad_rows:
        return TextColumn(values, char_lengths, char_lengths, bad_rows)
    escaped_joined = joined
    if escapable or "\\" in joined or '"' in joined:
        for raw, replacement in _JSON_ESCAPES:
            if raw in escaped_joined:
                escaped_joined = escaped_joined.replace(raw, replacement)
    if escaped_joined is joined:
        escaped, escaped_chars = values, char_lengths
    else:
        escaped = escaped_joined.split("\x00")
        escaped_chars = np.fromiter(map(len, escaped), dtype=np.int64, count=count)
    byte_lengths = escaped_chars
    if not ascii_only:  # bytes between the separators of the encoded column (no value holds a NUL)
        encoded = np.frombuffer(escaped_joined.encode("utf-8"), dtype=np.uint8)
        byte_lengths = _lengths_between(np.flatnonzero(encoded == 0), len(encoded))
    return TextColumn(escaped, char_lengths, byte_lengths, {})


def _lengths_between(separators: np.ndarray, total: int) -> np.ndarray:
    """Bytes of each value of a column joined by NUL, from the separators' positions.

    On ASCII text these are the values' characters too. For short values (ids, names) numpy
    finds the separators in less time than a ``len`` a value takes; locating the few
    separators in long text costs more than that.
    """
    bounds = np.empty(len(separators) + 2, dtype=np.int64)
    bounds[0], bounds[1:-1], bounds[-1] = -1, separators, total
    return np.diff(bounds) - 1
