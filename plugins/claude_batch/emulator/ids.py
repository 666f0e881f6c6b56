"""Identifiers and timestamps in the formats the real API uses."""

from __future__ import annotations

import hashlib
import random
from datetime import UTC, datetime, timedelta

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ID_BODY_LENGTH = 22
# Maps each byte value to a base-62 character (slightly uneven, which does not matter for ids).
_BYTE_TO_CHAR = bytes(ord(_ALPHABET[value % 62]) for value in range(256))


def random_id(prefix: str, rng: random.Random) -> str:
    """An id such as ``msgbatch_01Hx...``: prefix, "01", then 22 base-62 characters."""
    return prefix + "01" + "".join(rng.choices(_ALPHABET, k=_ID_BODY_LENGTH))


def derived_id(prefix: str, *parts: object) -> str:
    """A stable id derived from its parts, so re-downloaded results carry the same ids."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=_ID_BODY_LENGTH).digest()
    return prefix + "01" + digest.translate(_BYTE_TO_CHAR).decode()


def rfc3339(epoch_seconds: float) -> str:
    """RFC 3339 in UTC with microseconds and a ``Z`` suffix, like ``2024-08-20T18:37:24.100435Z``."""
    return datetime.fromtimestamp(epoch_seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def rfc3339_us(epoch_microseconds: int) -> str:
    """``rfc3339`` from whole microseconds, so that exact differences stay exact in the text."""
    return (_EPOCH + timedelta(microseconds=epoch_microseconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
