"""What staging writes, and the thread that writes it.

Shard lines are hashed and written, and keys sidecars encoded, on one I/O thread in the order
they were queued; the main thread only tracks counts and bytes, so it can keep rendering.
Rejected rows are streamed to ``requests/rejects.jsonl`` as they are found (the format is in
:mod:`claude_batch.staging.manifest`).
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from claude_batch.staging.chunks import BINARY_TYPES
from claude_batch.staging.manifest import (
    S3_BLOCK_SIZE,
    SHARD_KEYS_SCHEMA,
    ShardManifest,
    relative_path,
    shard_keys_path,
)

if TYPE_CHECKING:
    from claude_batch.storage import RunLayout


class BackgroundIO:
    """Runs shard hashing and writing on one worker thread, in order.

    hashlib and file/S3 writes release the GIL, so the main thread keeps rendering meanwhile;
    at most ``depth`` jobs wait, which bounds the memory they hold.
    """

    def __init__(self, depth: int = 4) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="claude-batch-staging")
        self._pending: deque[Future[Any]] = deque()
        self._depth = depth

    def submit(self, fn: Callable[..., object], *args: Any) -> None:
        self._pending.append(self._pool.submit(fn, *args))
        while len(self._pending) > self._depth:
            self._pending.popleft().result()

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self._pool.shutdown(wait=True)


class ShardWriter:
    """One shard being written: the JSONL lines and the keys sidecar, streamed to the store.

    ``count`` and ``bytes`` are tracked on the main thread; the writes happen on the I/O thread.
    """

    def __init__(self, layout: RunLayout, part: int) -> None:
        self.part = part
        self.path = layout.requests(part)
        self.keys_path = shard_keys_path(layout, part)
        self.count = 0
        self.bytes = 0
        self.models: dict[str, int] = {}
        self._sha = hashlib.sha256()
        self._stack = ExitStack()
        self._handle: Any = None
        self._keys_writer: pq.ParquetWriter | None = None

    def open(self, layout: RunLayout) -> None:
        self._handle = self._stack.enter_context(layout.store.open(self.path, "wb", block_size=S3_BLOCK_SIZE))
        keys_handle = self._stack.enter_context(
            layout.store.open(self.keys_path, "wb", block_size=S3_BLOCK_SIZE)
        )
        self._keys_writer = self._stack.enter_context(pq.ParquetWriter(keys_handle, SHARD_KEYS_SCHEMA))

    def write_lines(self, data: bytes) -> None:
        self._sha.update(data)
        self._handle.write(data)

    def write_keys(self, keys: pa.RecordBatch) -> None:
        assert self._keys_writer is not None
        self._keys_writer.write_batch(keys)

    def close(self) -> None:
        self._stack.close()

    def manifest(self, layout: RunLayout) -> ShardManifest:
        return ShardManifest(
            part=self.part,
            requests=relative_path(layout, self.path),
            keys=relative_path(layout, self.keys_path),
            count=self.count,
            bytes=self.bytes,
            sha256=self._sha.hexdigest(),
            models=dict(sorted(self.models.items())),
        )


def _json_default(value: Any) -> Any:
    if isinstance(value, BINARY_TYPES):
        return {"$bytes_hex": bytes(value).hex()}
    return str(value)


def jsonable_row(row: Mapping[str, Any]) -> bytes:
    """The row as JSON, whatever it holds (bytes as hex, lone surrogates escaped)."""
    try:
        return orjson.dumps(
            dict(row), default=_json_default, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS
        )
    except (orjson.JSONEncodeError, TypeError):
        cleaned = {
            str(k): (v.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(v, str) else v)
            for k, v in row.items()
        }
        return orjson.dumps(cleaned, default=_json_default, option=orjson.OPT_SORT_KEYS)


@dataclass
class Rejections:
    """Rejected rows, streamed to ``requests/rejects.jsonl``."""

    handle: Any
    count: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    synthetic_keys: dict[str, int] = field(default_factory=dict)

    def add(
        self,
        row_number: int,
        record_key: str | None,
        ledger_key: str | None,
        code: str,
        reason: str,
        row_json: bytes,
    ) -> None:
        if ledger_key is None:
            # No usable key: name the item by its content, so a re-run finds the same ledger row.
            ledger_key = self.unique(f"{code}#{hashlib.sha256(row_json).hexdigest()[:16]}")
        line = orjson.dumps(
            {
                "row_number": row_number,
                "record_key": record_key,
                "ledger_key": ledger_key,
                "status": "dead",
                "reason_code": code,
                "reason": f"row {row_number}: {reason}",
            }
        )
        self.handle.write(line[:-1] + b',"row":' + row_json + b"}\n")
        self.count += 1
        self.by_reason[code] = self.by_reason.get(code, 0) + 1

    def unique(self, key: str) -> str:
        """Identical rows without a usable key get ``-2``, ``-3``... so each stays one item."""
        seen = self.synthetic_keys.get(key, 0) + 1
        self.synthetic_keys[key] = seen
        return key if seen == 1 else f"{key}-{seen}"
