"""Object storage for staged shards, results, state and reports.

A thin layer over fsspec (s3fs for ``s3://`` roots, the local filesystem otherwise) so the
plain-Python core streams to and from S3 without Airflow, while Airflow tasks build the same
store from an ``aws`` connection. Every key is resolved under the configured root: a relative
part may not climb out of it. A root must be ``s3://bucket/prefix`` or an absolute local path
(:func:`claude_batch.preflight.check_storage_root`); anything else is refused when the store is built.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

import fsspec
import orjson

from claude_batch.preflight import StorageRootError, check_storage_root

__all__ = ["ObjectStore", "RunLayout", "StorageRootError", "UnsafePathError", "safe_segment"]

# Characters kept as they are in a key segment; anything else (``:``, ``+``, spaces from a
# run_id or a user's value) is percent-encoded so one segment stays one directory.
_SAFE_SEGMENT = re.compile(r"[^A-Za-z0-9._=-]")


class UnsafePathError(ValueError):
    """A relative path that would leave the store's root."""


def safe_segment(value: str) -> str:
    """Encode ``value`` as a single, safe path segment (no ``/``, no ``..``)."""
    encoded = _SAFE_SEGMENT.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), value)
    if encoded in {"", ".", ".."}:
        raise UnsafePathError(f"{value!r} is not a usable path segment")
    return encoded


class ObjectStore:
    """A root URI (``s3://bucket/prefix`` or a local directory) and the filesystem behind it.

    :param root: ``s3://bucket/prefix``, ``file:///abs/dir`` or an absolute local path; also
        fsspec's in-process ``memory://name/prefix`` for a store one process builds and uses
        itself (tests). Anything else (``s3:/bucket``, a relative path, ``gs://``...) raises
        :class:`~claude_batch.preflight.StorageRootError` naming the root.
    :param storage_options: fsspec options, e.g. ``key``, ``secret``, ``endpoint_url``.
    """

    def __init__(self, root: str, **storage_options: Any) -> None:
        root = check_storage_root(root, in_process=True)
        protocol, path = fsspec.core.split_protocol(root)
        protocol = protocol or "file"
        if protocol == "file":
            storage_options.setdefault("auto_mkdir", True)
        self.protocol = protocol
        self.fs = fsspec.filesystem(protocol, **storage_options)
        self.root_path = path.rstrip("/")
        self.root = f"{protocol}://{self.root_path}"

    @classmethod
    def from_airflow(cls, root: str, aws_conn_id: str | None = "aws_default") -> ObjectStore:
        """Build the store from an Airflow ``aws`` connection (credentials and endpoint).

        The root is checked first (:func:`~claude_batch.preflight.check_storage_root`, no
        ``memory://``: a run's tasks are separate processes), before any connection is read.
        """
        root = check_storage_root(root)
        if not root.startswith("s3://") or aws_conn_id is None:
            return cls(root)
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        hook = S3Hook(aws_conn_id=aws_conn_id)
        credentials = hook.get_credentials()
        options: dict[str, Any] = {"key": credentials.access_key, "secret": credentials.secret_key}
        if credentials.token:
            options["token"] = credentials.token
        endpoint = hook.conn_config.endpoint_url
        if endpoint:
            options["endpoint_url"] = endpoint
        # conn_config, not conn_region_name: the latter builds a boto3 client (about 1 s) per call.
        region = hook.conn_config.region_name
        if region:
            options["client_kwargs"] = {"region_name": region}
        return cls(root, **options)

    def _path(self, relpath: str) -> str:
        normalised = posixpath.normpath("/" + relpath).lstrip("/")
        if relpath.startswith("/") or normalised.startswith("..") or normalised in {"", "."}:
            raise UnsafePathError(f"{relpath!r} is outside the store root")
        if normalised != relpath.strip("/"):
            raise UnsafePathError(f"{relpath!r} is not a normalised relative path")
        return f"{self.root_path}/{normalised}"

    def uri(self, relpath: str) -> str:
        """The full URI of ``relpath`` under the root."""
        return f"{self.protocol}://{self._path(relpath)}"

    @contextmanager
    def open(self, relpath: str, mode: str = "rb", **kwargs: Any) -> Iterator[IO[bytes]]:
        """Open an object for streaming; a write becomes visible only when the file closes."""
        with self.fs.open(self._path(relpath), mode, **kwargs) as handle:
            yield handle

    def exists(self, relpath: str) -> bool:
        return self.fs.exists(self._path(relpath))

    def size(self, relpath: str) -> int:
        return int(self.fs.size(self._path(relpath)))

    def read_bytes(self, relpath: str) -> bytes:
        return self.fs.cat_file(self._path(relpath))

    def write_bytes(self, relpath: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(relpath), data)

    def read_json(self, relpath: str) -> Any:
        return orjson.loads(self.read_bytes(relpath))

    def read_json_or_none(self, relpath: str) -> Any | None:
        try:
            return self.read_json(relpath)
        except FileNotFoundError:
            return None

    def write_json(self, relpath: str, value: Any) -> None:
        self.write_bytes(relpath, orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))

    def delete(self, relpath: str) -> None:
        try:
            self.fs.rm_file(self._path(relpath))
        except FileNotFoundError:
            pass

    def list(self, relpath: str) -> list[str]:
        """Relative paths of the objects directly under ``relpath`` (sorted)."""
        prefix = self._path(relpath)
        try:
            names = self.fs.ls(prefix, detail=False)
        except FileNotFoundError:
            return []
        root = self.root_path + "/"
        return sorted(name[len(root) :] if name.startswith(root) else name for name in names)


@dataclass(frozen=True)
class RunLayout:
    """The S3 layout of one DAG run (docs/layout.md): ``<root>/<dag_id>/<run_id>/...``.

    A run goes round: a follow-up round (2, 3, ...) resends the items its earlier rounds left
    to retry, with its own manifest, shards and results under ``<run>/round-N/``. Round 0 is the
    run's pilot (the first ``pilot_size`` requests, sent alone before round 1), under ``<run>/pilot/``.

    :param store: the object store holding the root.
    :param dag_id: the DAG id.
    :param run_id: the DAG run id (encoded into one safe segment).
    :param round: the round (1: the run's first submission, directly under the run's prefix;
        0: its pilot).
    """

    store: ObjectStore
    dag_id: str
    run_id: str
    round: int = 1

    @property
    def prefix(self) -> str:
        base = f"{safe_segment(self.dag_id)}/{safe_segment(self.run_id)}"
        if self.round == 1:
            return base
        return f"{base}/pilot" if self.round == 0 else f"{base}/round-{self.round}"

    def in_round(self, number: int) -> RunLayout:
        """The same run's layout for round ``number``."""
        return RunLayout(self.store, self.dag_id, self.run_id, number)

    def _rel(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    @property
    def manifest(self) -> str:
        return self._rel("manifest.json")

    @property
    def report(self) -> str:
        return self._rel("report.json")

    def _shard_stem(self, part: int, revision: int | None) -> str:
        # A rewritten shard (claim, probe split) gets a new name, never the one a manifest names.
        return self._rel(f"requests/part-{part:05d}" + (f".r{revision}" if revision is not None else ""))

    def requests(self, part: int, revision: int | None = None) -> str:
        """``requests/part-NNNNN.jsonl`` (``part-NNNNN.rK.jsonl`` for revision K)."""
        return self._shard_stem(part, revision) + ".jsonl"

    def shard_keys(self, part: int, revision: int | None = None) -> str:
        """``requests/part-NNNNN.keys.parquet``: the shard's custom_id -> record key map."""
        return self._shard_stem(part, revision) + ".keys.parquet"

    @property
    def rejects(self) -> str:
        """``requests/rejects.jsonl``: every row staging could not send, with the reason."""
        return self._rel("requests/rejects.jsonl")

    @staticmethod
    def manifest_of(requests_path: str) -> tuple[str, str] | None:
        """For a shard's path (as :meth:`requests` gives it): its manifest's path and the shard's
        path relative to the manifest's prefix (``ShardManifest.requests``); None for another path."""
        prefix, found, name = requests_path.rpartition("/requests/")
        return (f"{prefix}/manifest.json", f"requests/{name}") if found and prefix else None

    def submission_state(self, task_id: str, map_index: int) -> str:
        """``<run>/state/<task_id>.part-NNNNN.json``: one submit task's two-phase state.

        Under the run's own prefix whatever the round: each round's submit task has its own id.
        """
        return f"{self.submission_states}/{safe_segment(task_id)}.part-{max(map_index, 0):05d}.json"

    @property
    def submission_states(self) -> str:
        """The folder holding every submit task's state (:meth:`submission_state`)."""
        return self.in_round(1)._rel("state")

    def results_jsonl(self, part: int) -> str:
        return self._rel(f"results/part-{part:05d}.jsonl")

    def results_parquet(self, part: int) -> str:
        return self._rel(f"results/part-{part:05d}.parquet")

    def validated(self, part: int) -> str:
        """``validated/part-NNNNN.parquet``: the shard's answers with their verdicts."""
        return self._rel(f"validated/part-{part:05d}.parquet")


def recorded_shard_sha256(store: ObjectStore, requests_path: str) -> str | None:
    """The sha256 staging recorded for the shard at ``requests_path``, from the manifest beside it.

    None when the path is not a staged shard's or its manifest does not list it.
    """
    found = RunLayout.manifest_of(requests_path)
    if found is None:
        return None
    manifest_path, relative_path = found
    data = store.read_json_or_none(manifest_path)
    for shard in (data or {}).get("shards", ()):
        if shard.get("requests") == relative_path:
            return shard.get("sha256")
    return None
