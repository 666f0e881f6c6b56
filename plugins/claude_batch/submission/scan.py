"""Check a shard as the API would, in one streaming pass, before any paid call.

Request count, body size, custom_id syntax and uniqueness, and that every line is a request
object; errors name the line. A shard staging wrote (its manifest records the shard's sha256)
is not parsed as JSON line by line: the scan works on blocks of whole lines, reading the
custom_ids off the lines' fixed openings with one regex a block, and, if the digest at the end
is not the recorded one, scans again in full. The custom_ids are kept as sorted 64-bit hashes
(8 bytes an id), which recovery compares with a batch's results.
"""

from __future__ import annotations

import hashlib
import re
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson

from claude_batch.contracts import CUSTOM_ID_PATTERN, MAX_BATCH_BYTES, MAX_REQUESTS_PER_BATCH
from claude_batch.submission.sources import _BODY_PREFIX, _BODY_SUFFIX, RequestSource, _LocalCopy


class ShardRejected(ValueError):
    """The shard would be refused by the API; nothing was sent."""


@dataclass(frozen=True)
class Limits:
    """What the API accepts in one batch."""

    max_requests: int = MAX_REQUESTS_PER_BATCH
    max_body_bytes: int = MAX_BATCH_BYTES


@dataclass(frozen=True)
class ShardScan:
    """What one pass over a shard learned: enough to send it and to recognise it again.

    ``custom_ids_digest`` is the same for the same custom_ids in any order (see
    :func:`custom_ids_digest`); ``id_hashes`` holds their sorted 64-bit hashes (8 bytes each).
    """

    request_count: int
    body_bytes: int
    fingerprint: str
    custom_ids_digest: str = ""
    id_hashes: Any = field(default=None, repr=False, compare=False)


# How staging (``staging.wire``: ``RequestEncoder``, ``LineLayout``) opens every line: the
# custom_id, then the params object.
# (The custom_id rule is contracts.py's, without its anchors.)
_STAGED_LINE = re.compile(
    rb'\{"custom_id":"(' + CUSTOM_ID_PATTERN.pattern.strip("^$").encode() + rb')","params":\{'
)
# Where one staged line ends and the next opens: a block's custom_ids after its first line, in
# one findall (anchoring on line starts with ``^`` instead tries every byte, 16x slower).
_STAGED_BOUNDARY = re.compile(rb"\}\n" + _STAGED_LINE.pattern)
_BLAKE2B_8 = partial(hashlib.blake2b, digest_size=8)


def scan_requests(source: RequestSource, limits: Limits = Limits()) -> ShardScan:
    """Check a shard as the API would, in one streaming pass, and fingerprint it.

    A source with a recorded ``sha256`` (a shard staging wrote) is trusted to hold JSON lines:
    each line's custom_id is read off its opening instead of parsing the whole line (two
    thirds of the scan's CPU). If the digest of what was read differs from the recorded one,
    the shard is scanned again in full, so an edited or damaged shard is still named by line.

    :param source: the shard.
    :param limits: the API's per-batch limits.
    :raises ShardRejected: naming the first offending line (1-based) and the cause.
    """
    expected = getattr(source, "sha256", None)
    if not expected:
        return _scan(source, limits, trusted=False)
    staged = _scan_staged_blocks(source, limits) if hasattr(source, "blocks") else None
    if staged is None:  # not wholly in staging's form, or over a limit: line by line
        scan = _scan(source, limits, trusted=True)
        return scan if scan.fingerprint == expected else _scan(source, limits, trusted=False)
    count, body_bytes, fingerprint, id_digests = staged
    if fingerprint != expected:
        # In staging's form a line-by-line digest is this one: go straight to the full scan.
        return _scan(source, limits, trusted=False)
    scan = _finish(source, count, body_bytes, fingerprint, _sorted_digests(id_digests))
    if isinstance(source, _LocalCopy):
        source.in_staged_form = True
    return scan


def _scan_staged_blocks(source: Any, limits: Limits) -> tuple[int, int, str, bytearray] | None:
    """Count, body size, sha256 and custom_id hashes of a shard wholly in staging's form.

    Every line must open as staging writes it and end with "}" and a newline (so no line is
    blank or padded, and the file's digest is the line-by-line one). Each block (whole lines,
    ~1 MiB) is checked and hashed at once instead of line by line.

    :param source: a source with ``blocks()``: its bytes cut at line ends, each block bytes or a
        view valid until the next (:class:`~claude_batch.submission.sources.StoredShard`).
    :param limits: the API's per-batch limits.
    :returns: ``(count, body_bytes, sha256 hex, 8-byte id hashes)``, or ``None`` when a block is
        not in that form or a limit is passed (the line-by-line scan then names the line).
    """
    import numpy as np

    digest = hashlib.sha256()
    id_digests = bytearray()
    count = 0
    # The body is the lines joined by commas: the file's bytes less its last newline.
    body_bytes = len(_BODY_PREFIX) + len(_BODY_SUFFIX) - 1
    for block in source.blocks():
        opening = _STAGED_LINE.match(block)
        later_ids = _STAGED_BOUNDARY.findall(block)
        lines = int(np.count_nonzero(np.frombuffer(block, dtype=np.uint8) == 0x0A))
        if opening is None or block[-2:] != b"}\n" or len(later_ids) != lines - 1:
            return None
        count += lines
        body_bytes += len(block)
        if count > limits.max_requests or body_bytes > limits.max_body_bytes:
            return None
        digest.update(block)
        id_digests += _BLAKE2B_8(opening.group(1)).digest()
        id_digests += b"".join([_BLAKE2B_8(custom_id).digest() for custom_id in later_ids])
    if count == 0:
        return None
    return count, body_bytes, digest.hexdigest(), id_digests


def _scan(source: RequestSource, limits: Limits, *, trusted: bool) -> ShardScan:
    digest = hashlib.sha256()
    # 8 bytes per custom_id instead of a set of strings: memory stays flat as shards grow.
    id_hashes = array("q")
    count = 0
    body_bytes = len(_BODY_PREFIX) + len(_BODY_SUFFIX)
    where = source.description
    for count, line in enumerate(source.lines(), start=1):
        if count > limits.max_requests:
            raise ShardRejected(
                f"{where}: line {count}: more than {limits.max_requests:,} requests; the API takes at "
                "most that many per batch. Stage smaller shards."
            )
        body_bytes += len(line) + (1 if count > 1 else 0)
        if body_bytes > limits.max_body_bytes:
            raise ShardRejected(
                f"{where}: line {count}: the request body passes {limits.max_body_bytes:,} bytes, over the "
                "API's limit (HTTP 413). Stage smaller shards."
            )
        opening = _STAGED_LINE.match(line) if trusted else None
        if opening is not None and line.endswith(b"}"):
            id_hashes.append(_id_hash(opening.group(1)))
            digest.update(line)
            digest.update(b"\n")
            continue
        try:
            request = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ShardRejected(f"{where}: line {count}: not valid JSON ({exc})") from None
        if not isinstance(request, dict):
            raise ShardRejected(f"{where}: line {count}: a request must be a JSON object")
        custom_id = request.get("custom_id")
        if not isinstance(custom_id, str) or not CUSTOM_ID_PATTERN.fullmatch(custom_id):
            raise ShardRejected(
                f"{where}: line {count}: custom_id {custom_id!r} does not match ^[a-zA-Z0-9_-]{{1,64}}$"
            )
        id_hashes.append(_id_hash(custom_id))
        if not isinstance(request.get("params"), dict):
            raise ShardRejected(
                f"{where}: line {count}: 'params' must be an object (custom_id {custom_id!r})"
            )
        digest.update(line)
        digest.update(b"\n")
    if count == 0:
        raise ShardRejected(f"{where}: no requests; the API needs at least one per batch")
    return _finish(source, count, body_bytes, digest.hexdigest(), _sorted(id_hashes))


def _finish(source: RequestSource, count: int, body_bytes: int, fingerprint: str, ordered: Any) -> ShardScan:
    """The scan, once no custom_id repeats (a repeat is named by line)."""
    if _has_repeats(ordered):
        _raise_first_duplicate(source)
    return ShardScan(
        request_count=count,
        body_bytes=body_bytes,
        fingerprint=fingerprint,
        custom_ids_digest=_digest_of_sorted(ordered),
        id_hashes=ordered,
    )


def _id_hash(custom_id: str | bytes) -> int:
    data = custom_id if isinstance(custom_id, bytes) else custom_id.encode()
    return int.from_bytes(_BLAKE2B_8(data).digest(), "little", signed=True)


def _sorted(values: array) -> Any:
    import numpy as np

    return np.sort(np.frombuffer(values, dtype=np.int64))


def _sorted_digests(id_digests: bytearray) -> Any:
    """Sorted hashes from their 8-byte digests, as :func:`_id_hash` reads them (little-endian)."""
    import numpy as np

    return np.sort(np.frombuffer(id_digests, dtype="<i8"))


def _has_repeats(ordered: Any) -> bool:
    return bool((ordered[1:] == ordered[:-1]).any())


def _digest_of_sorted(ordered: Any) -> str:
    return hashlib.sha256(ordered.astype("<i8", copy=False).tobytes()).hexdigest()


def custom_ids_digest(custom_ids: Iterable[str]) -> str:
    """The order-independent digest of a set of custom_ids, as recorded in the intent.

    SHA-256 over the sorted 64-bit BLAKE2b hashes (little-endian) of the ids: 8 bytes an id
    in memory, so 100,000 ids take 800 kB, not a set of strings.

    :param custom_ids: the ids, in any order.
    """
    return _digest_of_sorted(_sorted(array("q", (_id_hash(custom_id) for custom_id in custom_ids))))


def _contains(ordered: Any, value: int) -> bool:
    at = int(ordered.searchsorted(value))
    return at < len(ordered) and int(ordered[at]) == value


def _raise_first_duplicate(source: RequestSource) -> None:
    """A second pass, only when the hashes repeat: name the line (or it was a hash collision)."""
    first_line: dict[str, int] = {}
    for number, line in enumerate(source.lines(), start=1):
        custom_id = orjson.loads(line)["custom_id"]
        if custom_id in first_line:
            raise ShardRejected(
                f"{source.description}: line {number}: duplicate custom_id {custom_id!r} "
                f"(first on line {first_line[custom_id]})"
            )
        first_line[custom_id] = number
