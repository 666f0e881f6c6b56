"""Where a batch's requests come from, and the create body streamed from them.

A source is a re-readable stream of JSON lines (:class:`RequestSource`). A stored shard is
read from the store once: :func:`_read_once` keeps a local copy (a temporary file) that every
later pass reads, and :class:`BatchBody` streams ``{"requests": [`` + lines + ``]}`` from it
in ~1 MiB chunks, so memory does not grow with the shard; lines are sent as staged, never
re-serialised.
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
# Bytes per ranged GET: each request to S3 is a round trip (and moto copies the object for
# each), so 1 MB requests took 12 s a pass over a 200 MB shard on moto. 4 MB cut a submit of
# 100,000 requests from 26.5 s to 11.2 s for 5 MB more memory; 8 MB was faster still (6.9 s)
# but its peak grew 1.19x from 10,000 to 100,000 requests, against 1.14x.
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

    def lines(self) -> Iterator[bytes]:
        return _split_lines(self.chunks())


class _LocalCopy:
    """A stored shard read from the store once: the first pass keeps it in a temporary file.

    Every later pass (the request body, a resend, a second scan) reads the local file, which
    costs a fraction of the CPU of another pass through S3.
    """

    def __init__(self, shard: StoredShard, directory: str) -> None:
        self.shard = shard
        self.description = shard.description
        self.sha256 = shard.sha256
        self._directory = directory
        self._path: str | None = None

    def lines(self) -> Iterator[bytes]:
        if self._path is not None:
            with open(self._path, "rb") as handle:
                yield from _split_lines(iter(lambda: handle.read(_READ_BYTES), b""))
            return
        path = f"{self._directory}/shard.jsonl"
        with open(path, "wb") as copy:

            def teed() -> Iterator[bytes]:
                for chunk in self.shard.chunks():
                    copy.write(chunk)
                    yield chunk

            yield from _split_lines(teed())
        self._path = path  # only a whole pass is kept


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


def _split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    rest = b""
    for chunk in chunks:
        pieces = (rest + chunk).split(b"\n")
        rest = pieces.pop()
        for piece in pieces:
            line = piece.strip()
            if line:
                yield line
    if rest.strip():
        yield rest.strip()
