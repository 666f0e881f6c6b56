"""Contracts shared by every stage: API limits and the custom_id rule.

The custom_id rule (docs/layout.md): a record key that is already a valid custom_id is used as is;
any other key is replaced by a stable hash. Every id of the hashed shape is produced by
hashing (a literal key of that shape is hashed too), so a literal key can never collide with
the hash of another key, and results always join back to their record.
"""

from __future__ import annotations

import hashlib
import re

MAX_REQUESTS_PER_BATCH = 100_000
# The API refuses request bodies over 256 MB with HTTP 413.
MAX_BATCH_BYTES = 256 * 1000 * 1000
# The rule's two shapes as regex text, so every scan of custom_ids (one key, or a whole chunk's
# keys joined) is built from them rather than restating them.
CUSTOM_ID_SHAPE = r"[a-zA-Z0-9_-]{1,64}"
HASHED_ID_SHAPE = r"k_[0-9a-f]{40}"
CUSTOM_ID_PATTERN = re.compile(rf"^{CUSTOM_ID_SHAPE}$")
_HASHED_ID_PATTERN = re.compile(rf"^{HASHED_ID_SHAPE}$")
# A key used as its own custom_id: valid, and not of the hashed shape. Use with ``fullmatch``.
AS_IS_CUSTOM_ID = re.compile(rf"(?!{HASHED_ID_SHAPE}\Z){CUSTOM_ID_SHAPE}")


class InvalidRecordKey(ValueError):
    """A record key that cannot be turned into a custom_id (NULL or empty)."""


def custom_id_for(record_key: object) -> str:
    """Return the custom_id for a record key (the key itself, or ``k_`` + 40 hex of its SHA-256).

    :param record_key: the record's key as read from the warehouse; ints are used by their text.
    """
    if record_key is None:
        raise InvalidRecordKey("record key is NULL")
    key = str(record_key)
    if key == "":
        raise InvalidRecordKey("record key is empty")
    # fullmatch: a pattern ending in $ also matches before a trailing newline with re.match.
    if CUSTOM_ID_PATTERN.fullmatch(key) and not _HASHED_ID_PATTERN.fullmatch(key):
        return key
    return "k_" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def is_valid_custom_id(custom_id: object) -> bool:
    """Whether the API would accept ``custom_id``."""
    return isinstance(custom_id, str) and CUSTOM_ID_PATTERN.fullmatch(custom_id) is not None
