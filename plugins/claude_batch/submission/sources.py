"""Where a batch's requests come from, and the create body streamed from them.

A source is a re-readable stream of JSON lines (:class:`RequestSource`). A stored shard is
read from the store once: :func:`_read_once` copies it into a temporary file in one streaming
download, and every pass reads that copy. :class:`BatchBody` streams ``{"requests": [`` +
lines + ``]}`` from it in ~1 MiB chunks, so memory does not grow with the shard; lines are
sent as staged, never re-serialised. A copy the scan found in staging's form (see
:attr:`_LocalCopy.in_staged_form`) is sent as its bytes with each newline turned into a comma.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from claude_batch.storage import ObjectStore

_BODY_PREFIX = b'{"requests":['
_BODY_SUFFIX = b"]}"
_CHUNK_BYTES = 1 << 20
_READ_BYTES = 1 << 20
# Bytes per ranged GET when a shard is read from S3 without a local copy: each request is a
# round trip (and moto copies the object for each), so 1 MB requests took 12 s a pass over a
# 200 MB shard on moto; 4 MB took 11.2 s a submit of 100,000 requests.
_FETCH_BYTES = 4 << 20


class RequestSource(Protocol):
    """Where the requests of one batch come from: a re-readable stream of JSON lines."""

    description: str

    def lines(self) -> Iterator[bytes]:
        """Yield each request as one JSON object (bytes, no trailing newline)."""
        ...


@dataclass(frozen=True)
class StoredShard:
    """A staged JSONL shard in the object store.

    :param store: the object store.
    :param relpath: the shard's path under the store root.
    :param sha256: the shard's digest as staging recorded it (``ShardManifest.sha256``), if known:
        the scan then trusts the lines to be JSON (see :func:`scan_requests`).
    """

    store: ObjectStore
    relpath: str
    sha256: str | None = None

    @property
    def description(self) -> str:
        return self.store.uri(self.relpath)

    def chunks(self) -> Iterator[bytes]:
        # 1 MB reads, split by us (bigger reads fragment the heap as shards grow): fsspec's
        # readline re-reads its block for every line.
        with self.store.open(self.relpath, "rb", block_size=_FETCH_BYTES) as handle:
            yield from iter(lambda: handle.read(_READ_BYTES), b"")

    def blocks(self) -> Iterator[bytes]:
        """The shard's bytes in pieces of whole lines (see :func:`_line_blocks`)."""
        return _line_blocks(self.chunks())

    def lines(self) -> Iterator[bytes]:
        return _split_lines(self.blocks())

    def copy_to(self, path: str) -> None:
        """Download the shard into the local file ``path`` in one streaming read.

        :param path: the local file to write.
        """
        options: dict[str, Any] = {}
        if self.store.protocol == "s3":
            # One GET streamed to the file, in 64 KiB reads: a pass of 4 MB ranged GETs waits a
            # round trip each, and s3fs's concurrent download holds ten 50 MB parts in memory.
            options["max_concurrency"] = 1
        self.store.fs.get_file(self.store.uri(self.relpath), path, **options)


class _LocalCopy:
    """A stored shard read from the store once, into a temporary file every pass then reads.

    Every pass (the scan, the request body, a resend, a second scan) reads the local file,
    which costs a fraction of the CPU of a pass through S3.
    """

    def __init__(self, shard: StoredShard, directory: str) -> None:
        self.shard = shard
        self.description = shard.description
        self.sha256 = shard.sha256
        # Set by the scan once it has seen every line of this copy in staging's form: each line
        # a request object opening with its custom_id and ending in "}", then one b"\n". The
        # body is then the file's bytes with each newline turned into a comma.
        self.in_staged_form = False
        self._directory = directory
        self._path: str | None = None

    def _local_path(self) -> str:
        if self._path is None:
            path = f"{self._directory}/shard.jsonl"
            self.shard.copy_to(path)
            self._path = path  # only a whole download is kept
        return self._path

    def chunks(self) -> Iterator[bytes]:
        with open(self._local_path(), "rb") as handle:
            yield from iter(lambda: handle.read(_READ_BYTES), b"")

    def blocks(self) -> Iterator[memoryview]:
        """The copy's bytes in pieces of whole lines, as views of one reused buffer.

        Each view is valid only until the next is asked for; nothing is copied (the scan over
        views of a buffer that stays in cache took 0.31 s per 203 MB, over new bytes 0.41-0.56).
        """
        with open(self._local_path(), "rb") as handle:
            yield from _line_views(handle)

    def lines(self) -> Iterator[bytes]:
        return _split_lines(_line_blocks(self.chunks()))


@contextmanager
def _read_once(source: RequestSource) -> Iterator[RequestSource]:
    if not isinstance(source, StoredShard):
        yield source
        return
    with tempfile.TemporaryDirectory(prefix="claude-batch-shard-") as directory:
        yield _LocalCopy(source, directory)


@dataclass(frozen=True)
class InlineRequests:
    """Requests given as a list (small jobs); serialised line by line as they are sent."""

    requests: list[dict[str, Any]]
    description: str = "inline requests"

    def lines(self) -> Iterator[bytes]:
        for request in self.requests:
            yield orjson.dumps(request)


class BatchBody:
    """The create body, streamed from a shard in ~1 MiB chunks; re-iterable for a resend."""

    def __init__(self, source: RequestSource) -> None:
        self._source = source

    def __iter__(self) -> Iterator[bytes]:
        if isinstance(self._source, _LocalCopy) and self._source.in_staged_form:
            return self._from_staged_copy(self._source)
        return self._from_lines()

    @staticmethod
    def _from_staged_copy(copy: _LocalCopy) -> Iterator[bytes]:
        # Lines joined by commas is the file with its newlines as commas, less the last one.
        yield _BODY_PREFIX
        previous = b""
        for chunk in copy.chunks():
            if previous:
                yield previous.replace(b"\n", b",")
            previous = chunk
        yield previous[:-1].replace(b"\n", b",") + _BODY_SUFFIX

    def _from_lines(self) -> Iterator[bytes]:
        buffer = bytearray(_BODY_PREFIX)
        first = True
        for line in self._source.lines():
            if not first:
                buffer += b","
            buffer += line
            first = False
            if len(buffer) >= _CHUNK_BYTES:
                yield bytes(buffer)
                buffer.clear()
        buffer += _BODY_SUFFIX
        yield bytes(buffer)


def _line_blocks(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Re-cut ``chunks`` at line ends: each block but the last ends with b"\\n".

    A line longer than a chunk is gathered from its pieces once, not re-copied per chunk.
    """
    pending: list[bytes] = []
    for chunk in chunks:
        end = chunk.rfind(b"\n") + 1
        if not end:
            pending.append(chunk)
            continue
        pending.append(chunk[:end] if end < len(chunk) else chunk)
        yield b"".join(pending) if len(pending) > 1 else pending[0]
        pending = [chunk[end:]] if end < len(chunk) else []
    if pending:
        yield b"".join(pending)


def _line_views(handle: Any) -> Iterator[memoryview]:
    """Views of whole lines read from ``handle`` into one buffer; the last may lack its newline.

    Each view is valid until the next is asked for. A line longer than the buffer doubles it.
    """
    buffer = bytearray(_READ_BYTES)
    kept = 0  # a partial line carried to the buffer's start
    while True:
        if kept == len(buffer):
            # A new buffer, not a resize: the caller may still hold a view of this one.
            buffer = buffer + bytes(len(buffer))
        view = memoryview(buffer)
        read = handle.readinto(view[kept:])
        filled = kept + read
        if not read:
            if kept:
                yield view[:kept]
            return
        end = buffer.rfind(b"\n", kept, filled) + 1
        if not end:
            kept = filled
            continue
        yield view[:end]
        # Copied out first (the two ranges may overlap: bytearray assignment uses memcpy); the
        # same length, so no resize under a held view. It is at most one partial line.
        buffer[: filled - end] = bytes(view[end:filled])
        kept = filled - end


def _split_lines(blocks: Iterable[bytes]) -> Iterator[bytes]:
    """The non-blank lines of ``blocks`` (pieces of whole lines), stripped."""
    for block in blocks:
        for piece in block.split(b"\n"):
            line = piece.strip()
            if line:
                yield line
