"""Identifiers and timestamps in the formats the real API uses."""

from __future__ import annotations

import hashlib
import random
from datetime import UTC, datetime

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ID_BODY_LENGTH = 22


def random_id(prefix: str, rng: random.Random) -> str:
    """An id such as ``msgbatch_01Hx...``: prefix, "01", then 22 base-62 characters."""
    return prefix + "01" + "".join(rng.choices(_ALPHABET, k=_ID_BODY_LENGTH))


def derived_id(prefix: str, *parts: object) -> str:
    """A stable id derived from its parts, so re-downloaded results carry the same ids."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=16).digest()
    number = int.from_bytes(digest, "big")
    chars = []
    for _ in range(_ID_BODY_LENGTH):
        number, remainder = divmod(number, 62)
        chars.append(_ALPHABET[remainder])
    return prefix + "01" + "".join(chars)


def rfc3339(epoch_seconds: float) -> str:
    """RFC 3339 in UTC with microseconds and a ``Z`` suffix, like ``2024-08-20T18:37:24.100435Z``."""
    return datetime.fromtimestamp(epoch_seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
