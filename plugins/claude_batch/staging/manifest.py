"""The staged run on S3: its shard format, its manifest, and reading them back.

Each shard ``requests/part-NNNNN.jsonl`` holds lines ``{"custom_id", "params"}`` (exactly what
the Batches API create takes per request), at most ``max_requests_per_shard`` of them and at
most ``max_shard_bytes``. Beside it, ``requests/part-NNNNN.keys.parquet`` maps each custom_id
back to its record key (custom_ids may be hashes of the key, see docs/architecture.md). Rows
that cannot be sent are never dropped: each is a line of ``requests/rejects.jsonl`` with the
row, its ledger key and a reason, and the ledger records it as ``dead``. ``manifest.json``
lists shards, counts, bytes, checksums, the prompt version, the models and a token and cost
estimate; ``extracted_rows`` always equals ``staged_requests + rejected_rows``.

Collect, validate, load and the warehouse need only this module, which imports neither the
text kernels nor the threaded writers of the staging engine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from claude_batch.contracts import MAX_BATCH_BYTES, MAX_REQUESTS_PER_BATCH

if TYPE_CHECKING:
    from claude_batch.costs import CacheSetting
    from claude_batch.storage import RunLayout

MANIFEST_FORMAT = 1
DEFAULT_MAX_SHARD_BYTES = 128 * 1000 * 1000
# The create body wraps the lines in {"requests": [...]}: keep a margin under the API's 256 MB.
MAX_SHARD_BYTES_LIMIT = int(MAX_BATCH_BYTES * 0.9)
S3_BLOCK_SIZE = 8 * 1024 * 1024

SHARD_KEYS_SCHEMA = pa.schema(
    [
        ("custom_id", pa.string()),
        ("record_key", pa.string()),
        ("row_number", pa.int64()),
        ("model", pa.string()),
    ]
)


class StagingError(RuntimeError):
    """Staging cannot go on (bad limits, a workload routing to models without a price)."""


@dataclass(frozen=True)
class StagingLimits:
    """Shard limits: the API allows 100,000 requests and 256 MB per batch.

    :param max_requests_per_shard: requests per shard (1..100,000).
    :param max_shard_bytes: bytes per shard, at most 90% of 256 MB.
    """

    max_requests_per_shard: int = MAX_REQUESTS_PER_BATCH
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES

    def __post_init__(self) -> None:
        if not 1 <= self.max_requests_per_shard <= MAX_REQUESTS_PER_BATCH:
            raise StagingError(f"max_requests_per_shard must be 1..{MAX_REQUESTS_PER_BATCH}")
        if not 1024 <= self.max_shard_bytes <= MAX_SHARD_BYTES_LIMIT:
            raise StagingError(f"max_shard_bytes must be 1024..{MAX_SHARD_BYTES_LIMIT}")


@dataclass(frozen=True)
class ShardManifest:
    """One staged shard. Paths are relative to the run's prefix."""

    part: int
    requests: str
    keys: str
    count: int
    bytes: int
    sha256: str
    models: dict[str, int]


@dataclass(frozen=True)
class Manifest:
    """What staging produced for one run (``manifest.json``)."""

    workload: str
    prompt_version: str
    dag_id: str
    run_id: str
    cache_setting: CacheSetting
    key_field: str
    models: list[str]
    extracted_rows: int
    staged_requests: int
    rejected_rows: int
    rejected_by_reason: dict[str, int]
    rejects: str
    shards: list[ShardManifest]
    limits: dict[str, int]
    estimate: dict[str, Any]
    created_at: str
    format: int = MANIFEST_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        values = dict(data)
        values["shards"] = [ShardManifest(**shard) for shard in data["shards"]]
        return cls(**values)

    def shard(self, part: int) -> ShardManifest:
        for shard in self.shards:
            if shard.part == part:
                return shard
        raise KeyError(f"no shard part {part} in the manifest of run {self.run_id!r}")


def shard_keys_path(layout: RunLayout, part: int) -> str:
    """``requests/part-NNNNN.keys.parquet``: the custom_id -> record key map of a shard."""
    return layout.shard_keys(part)


def rejects_path(layout: RunLayout) -> str:
    """``requests/rejects.jsonl``: every row staging could not send, with the reason."""
    return layout.rejects


def relative_path(layout: RunLayout, path: str) -> str:
    """``path`` relative to the run's prefix, as the manifest records it."""
    return path[len(layout.prefix) + 1 :]


def full_path(layout: RunLayout, relative: str) -> str:
    """The store path of a path the manifest records."""
    return f"{layout.prefix}/{relative}"


def read_manifest(layout: RunLayout) -> Manifest | None:
    """The run's manifest, or None when staging has not finished."""
    data = layout.store.read_json_or_none(layout.manifest)
    return None if data is None else Manifest.from_dict(data)


def iter_shard_lines(layout: RunLayout, shard: ShardManifest, *, verify: bool = True) -> Iterator[bytes]:
    """The shard's JSONL lines (without newlines), streamed; checks the sha256 at the end.

    Reads in large blocks and splits them here: fsspec's ``readline`` re-slices its read-ahead
    buffer on every line, which is quadratic on a large object.

    :param verify: raise ``StagingError`` when the bytes read do not match the manifest.
    """
    digest = hashlib.sha256()
    size = 0
    pending = b""
    with layout.store.open(full_path(layout, shard.requests), "rb", block_size=S3_BLOCK_SIZE) as handle:
        while block := handle.read(S3_BLOCK_SIZE):
            digest.update(block)
            size += len(block)
            lines = (pending + block).split(b"\n")
            pending = lines.pop()
            yield from lines
    if pending:
        yield pending
    if verify and (digest.hexdigest() != shard.sha256 or size != shard.bytes):
        raise StagingError(
            f"shard {shard.requests} does not match its manifest checksum; it was changed or cut short"
        )


def iter_shard_requests(layout: RunLayout, shard: ShardManifest) -> Iterator[dict[str, Any]]:
    """The shard's requests as dicts ``{"custom_id", "params"}``."""
    for line in iter_shard_lines(layout, shard):
        yield orjson.loads(line)


def read_shard_keys(layout: RunLayout, shard: ShardManifest) -> pa.Table:
    """The shard's custom_id -> record key map (columns of :data:`SHARD_KEYS_SCHEMA`)."""
    with layout.store.open(full_path(layout, shard.keys), "rb") as handle:
        return pq.read_table(handle)


def iter_rejections(layout: RunLayout, manifest: Manifest | None = None) -> Iterator[dict[str, Any]]:
    """The rejected rows of the run (``row_number``, ``record_key``, ``ledger_key``, reason, row)."""
    path = full_path(layout, manifest.rejects) if manifest else rejects_path(layout)
    if not layout.store.exists(path):
        return
    with layout.store.open(path, "rb") as handle:
        for line in handle:
            yield orjson.loads(line)
