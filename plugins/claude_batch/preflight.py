"""Preflight checks: configuration mistakes fail before anything is extracted or paid for.

Each check is a plain function of plain values (no Airflow, no connection), so the pipeline's
stage step, the DAG builder and plain-Python callers run the same checks, and each failure names
its cause and what would be right:

* :func:`check_storage_root`: the storage root is ``s3://bucket/prefix`` or an absolute local
  path (a one-slash ``s3:/bucket`` once became a directory named ``s3:`` under the worker's
  working directory);
* :func:`check_source_columns` (or :func:`check_workload_source`): the key column, the interval
  column, every template field and every selected column exist in the source, spelled exactly
  (a field the rows do not carry made every row ``dead`` in a green run);
* :func:`check_model`: the model is one of the allowed models.

The source's column names come from the warehouse (a ``SELECT * ... LIMIT 0`` and the cursor's
description, see :func:`source_columns_query`); the checks themselves take only the names.
"""

from __future__ import annotations

import difflib
import posixpath
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from claude_batch.warehouse import Dialect, SourceSpec
    from claude_batch.workloads import Workload

__all__ = [
    "GOOD_STORAGE_ROOTS",
    "PreflightError",
    "StorageRootError",
    "check_model",
    "check_source_columns",
    "check_storage_root",
    "check_workload_source",
    "source_columns_query",
    "template_fields",
]

GOOD_STORAGE_ROOTS = (
    "a storage root is s3://bucket/optional/prefix or an absolute local path "
    "(/data/claude-batch or file:///data/claude-batch)"
)
# S3 bucket naming rules (general purpose buckets): 3-63 characters, lowercase letters, digits,
# dots and hyphens, starting and ending with a letter or digit, no "..", not an IP address.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IP_ADDRESS = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(.*)$", re.DOTALL)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# "user:secret@" (or "token@") after the scheme: never repeated in a message.
_USERINFO = re.compile(r"(?<=[:/])[^/]*@")
_SHOWN_COLUMNS = 40


class PreflightError(ValueError):
    """A configuration mistake found before anything was extracted, staged or submitted.

    :param message: the whole explanation (every problem found, and what would be right).
    :param problems: each problem on its own, for callers that list them.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems) or (message,)


class StorageRootError(PreflightError):
    """A storage root that is not ``s3://bucket/prefix`` or an absolute local path."""


# -- storage root ---------------------------------------------------------------------------


def _shown_root(root: str) -> str:
    return _USERINFO.sub("***@", root, count=1)


def check_storage_root(root: str, *, in_process: bool = False) -> str:
    """The storage root in its canonical form, or :class:`StorageRootError` naming what is wrong.

    Accepted, exactly:

    * ``s3://bucket`` or ``s3://bucket/prefix``: the bucket name follows the S3 rules (3-63
      characters; lowercase letters, digits, dots and hyphens; a letter or digit at each end;
      no ``..``; not an IP address); the prefix has no empty, ``.`` or ``..`` segment. Returned
      as ``s3://bucket/prefix`` without a trailing slash.
    * an absolute local path, ``/data/claude-batch`` or ``file:///data/claude-batch``. Returned
      as ``file:///data/claude-batch`` (normalised: no trailing slash, ``//``, ``.`` or ``..``).

    Refused: ``s3:/bucket`` and ``s3:bucket`` (which fsspec would take for a relative local
    directory named ``s3:``), ``s3://`` without a bucket, ``s3a://``, bucket names breaking the
    rules, credentials in the URL, ``memory://``, ``gs://`` and any other scheme, ``file:`` with
    fewer than three slashes, ``~``, the filesystem root and **relative local paths**: each task
    (scheduler, worker, triggerer, ``airflow dags test``) would resolve one against its own
    working directory, so one run's tasks could write and read different directories.

    :param root: the configured root (``storage_root`` or ``CLAUDE_BATCH_STORAGE_ROOT``).
    :param in_process: also accept fsspec's in-process ``memory://name/prefix`` (a name is
        required). Only for stores one process builds and uses itself (tests, plain-Python
        code); an Airflow run's tasks are separate processes, which could not see each other's
        objects, so the Airflow entry points never pass it.
    :returns: the canonical root.
    """
    if not isinstance(root, str):
        raise StorageRootError(f"storage root {root!r} is not a string; {GOOD_STORAGE_ROOTS}")
    if not root:
        raise StorageRootError(f"the storage root is empty; {GOOD_STORAGE_ROOTS}")
    shown = _shown_root(root)

    def refuse(why: str) -> StorageRootError:
        return StorageRootError(f"storage root {shown!r} {why}; {GOOD_STORAGE_ROOTS}")

    if root != root.strip():
        raise refuse("has leading or trailing whitespace")
    if _CONTROL.search(root):
        raise refuse("holds control characters")
    match = _SCHEME.match(root)
    if match is None:
        if root.startswith("~"):
            raise refuse("starts with '~', which is not expanded: give the absolute path")
        if not root.startswith("/"):
            raise refuse("is a relative path: every task would resolve it against its own working directory")
        return _local_root(root, refuse)
    scheme, rest = match.groups()
    lowered = scheme.lower()
    if lowered in ("s3", "s3a", "s3n"):
        if scheme != "s3":
            raise refuse(f"uses the scheme {scheme}:, write s3://{rest.lstrip('/')}")
        return _s3_root(rest, refuse)
    if lowered == "file":
        if scheme != "file":
            raise refuse(f"uses the scheme {scheme}:, write file:///{rest.lstrip('/')}")
        if not rest.startswith("///"):
            if rest.startswith("//"):
                raise refuse(
                    "has a host or a relative path after file:// (file:// is followed by an "
                    f"absolute path: file:///{rest[2:].lstrip('/')})"
                )
            raise refuse(f"needs three slashes after file: (file:///{rest.lstrip('/')})")
        return _local_root(rest[2:], refuse)
    if lowered == "memory":
        if not in_process:
            raise refuse(
                "is fsspec's in-process memory filesystem: each Airflow task runs in its own "
                "process and would not see the objects another task wrote"
            )
        if not rest.startswith("//"):
            raise refuse("needs two slashes after memory: (memory://name/prefix)")
        name, _, prefix = rest[2:].partition("/")
        if not name:
            raise refuse("names no memory store (memory://name/prefix)")
        return f"memory://{name}{_prefix(prefix, refuse)}"
    raise refuse(f"uses the unsupported scheme {scheme}: (object storage is S3 only, s3://)")


def _s3_root(rest: str, refuse: Any) -> str:
    if not rest.startswith("//"):
        raise refuse(
            f"needs two slashes after s3: (s3://{rest.lstrip('/')}); as written it would be a "
            "local directory named 's3:' under the working directory"
        )
    bucket, _, prefix = rest[2:].partition("/")
    if not bucket:
        raise refuse("names no bucket (s3://bucket/prefix)")
    if "@" in bucket or ":" in bucket:
        raise refuse(
            "holds credentials or a port: give them through the aws connection (and its "
            "endpoint_url), not in the root"
        )
    if not 3 <= len(bucket) <= 63:
        raise refuse(f"has a bucket name of {len(bucket)} characters; S3 bucket names have 3 to 63")
    if bucket != bucket.lower() and _BUCKET.fullmatch(bucket.lower()):
        raise refuse(
            f"has uppercase letters in its bucket name; S3 bucket names are lowercase ({bucket.lower()!r})"
        )
    if not _BUCKET.fullmatch(bucket):
        raise refuse(
            f"has the bucket name {bucket!r}; S3 bucket names hold only lowercase letters, digits, "
            "dots and hyphens, and start and end with a letter or digit"
        )
    if ".." in bucket or _IP_ADDRESS.fullmatch(bucket):
        raise refuse(f"has the bucket name {bucket!r}; S3 bucket names have no '..' and are not IP addresses")
    return f"s3://{bucket}{_prefix(prefix, refuse)}"


def _prefix(prefix: str, refuse: Any) -> str:
    prefix = prefix.rstrip("/")
    if not prefix:
        return ""
    if "?" in prefix or "#" in prefix:
        raise refuse("holds '?' or '#' in its prefix")
    segments = prefix.split("/")
    if any(segment == "" for segment in segments):
        raise refuse("has an empty segment ('//') in its prefix")
    if any(segment in (".", "..") for segment in segments):
        raise refuse("has a '.' or '..' segment in its prefix")
    return "/" + prefix


def _local_root(path: str, refuse: Any) -> str:
    normalised = posixpath.normpath(re.sub("/+", "/", path))
    if normalised == "/":
        raise refuse("is the filesystem root: give a directory of its own")
    return f"file://{normalised}"


# -- source columns -------------------------------------------------------------------------


def template_fields(workload: Workload) -> tuple[str, ...]:
    """The row fields ``workload``'s user template reads, in template order.

    The workload parses its template once (``string.Formatter``) into ``template_fields``; its
    ``text_fields`` are a subset of them. A routing rule (``route``) is a function of the whole
    row and declares no fields, so the fields it reads cannot be checked here.
    """
    return tuple(workload.template_fields)


def _case_hint(dialect_name: str | None) -> str:
    if dialect_name == "duckdb":
        return (
            "names are case-sensitive: DuckDB matches identifiers in SQL regardless of case, but "
            "each row carries the source's spelling and staging looks fields up by exact name"
        )
    if dialect_name == "postgres":
        return (
            "names are case-sensitive: the pipeline quotes every name, so PostgreSQL does not "
            "fold it to lowercase"
        )
    return "names are case-sensitive: staging looks fields up by exact name"


def _near(name: str, available: Sequence[str], dialect_name: str | None) -> str:
    same = [column for column in available if column.lower() == name.lower()]
    if same:
        found = ", ".join(repr(column) for column in same)
        return f"; found {found}; {_case_hint(dialect_name)}"
    close = difflib.get_close_matches(name, list(available), n=2, cutoff=0.75)
    if close:
        return f"; did you mean {' or '.join(repr(column) for column in close)}?"
    return ""


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(repr(name) for name in names[:_SHOWN_COLUMNS])
    more = len(names) - _SHOWN_COLUMNS
    return f"{shown}, ... ({more} more)" if more > 0 else shown


def check_source_columns(
    available: Sequence[str],
    key_column: str,
    interval_column: str | None = None,
    template_fields: Sequence[str] = (),
    columns: Sequence[str] | None = None,
    *,
    dialect_name: str | None = None,
    source_name: str | None = None,
) -> None:
    """Raise :class:`PreflightError` naming every column the run needs that the source lacks.

    Matching is exact (case-sensitive): staging reads each row by its exact field name, so a
    name differing only in case would leave the field empty in every row (and every row
    ``dead``). A same-name-but-for-case column is named in the message, and so is a close
    spelling.

    Checked: the key column and each template field are in the rows (in ``columns`` when the
    source selects columns, and in the source); the interval column is in the source (it is
    compared in SQL, it need not be selected); each selected column is in the source.

    :param available: the source's column names (``SELECT * FROM <origin> LIMIT 0``).
    :param key_column: the record key column (``SourceSpec.key_column``).
    :param interval_column: the data interval's column, or None.
    :param template_fields: the row fields the user template reads (:func:`template_fields`).
    :param columns: the selected columns (``SourceSpec.columns``), or None for all.
    :param dialect_name: ``duckdb``, ``postgres`` or another dialect's name (for the hint).
    :param source_name: how to name the source in the message (e.g. its table).
    """
    available = list(available)
    present = set(available)
    selected = list(columns) if columns is not None else None
    problems: list[str] = []
    reported: set[str] = set()

    def need_in_rows(role: str, name: str) -> None:
        if selected is not None and name not in selected:
            where = (
                ""
                if name in present
                else f", and the source has no such column either{_near(name, available, dialect_name)}"
            )
            problems.append(
                f"{role} is not among the selected columns ({_listed(selected)}): "
                f"add {name!r} to columns{where}"
            )
            reported.add(name)
        elif name not in present:
            problems.append(f"{role} is not a column of the source{_near(name, available, dialect_name)}")
            reported.add(name)

    need_in_rows(f"key column {key_column!r}", key_column)
    if interval_column is not None and interval_column not in present:
        problems.append(
            f"interval column {interval_column!r} is not a column of the source"
            f"{_near(interval_column, available, dialect_name)}"
        )
        reported.add(interval_column)
    for field_name in dict.fromkeys(template_fields):
        need_in_rows(f"template field {{{field_name}}}", field_name)
    for column in dict.fromkeys(selected or ()):
        if column not in present and column not in reported:
            problems.append(
                f"selected column {column!r} is not a column of the source"
                f"{_near(column, available, dialect_name)}"
            )
    if problems:
        subject = f"the source {source_name}" if source_name else "the source"
        lines = "\n".join(f"  - {problem}" for problem in problems)
        raise PreflightError(
            f"{subject} lacks {len(problems)} column(s) the run needs; nothing was extracted or "
            f"submitted:\n{lines}\n  columns of the source: {_listed(available) or '(none)'}",
            problems,
        )


def check_workload_source(
    available: Sequence[str],
    workload: Workload,
    source: SourceSpec,
    *,
    dialect_name: str | None = None,
) -> None:
    """:func:`check_source_columns` for ``workload`` reading ``source`` (a ``SourceSpec``)."""
    check_source_columns(
        available,
        source.key_column,
        source.interval_column,
        template_fields(workload),
        source.columns,
        dialect_name=dialect_name,
        source_name=source.table if source.table else "query",
    )


def source_columns_query(source: SourceSpec, dialect: Dialect) -> tuple[str, list[Any]]:
    """The statement (and its parameters) whose cursor description lists the source's columns.

    ``SELECT * FROM <table or (query)> src LIMIT <0>``: no row is read. The limit is a parameter
    so the query text is passed the way every parameterised statement passes it
    (``Dialect.query_text``: PostgreSQL's ``%`` doubled).

    :param source: the source (table or trusted query).
    :param dialect: the warehouse's dialect (``quote``, ``query_text``, ``placeholder``).
    """
    origin = dialect.quote(source.table) if source.table else f"({dialect.query_text(source.query or '')})"
    return f"SELECT * FROM {origin} src LIMIT {dialect.placeholder}", [0]


# -- models ---------------------------------------------------------------------------------


def check_model(model: str, allowed_models: Sequence[str], *, role: str = "model") -> None:
    """Raise :class:`PreflightError` unless ``model`` is one of ``allowed_models``.

    :param model: the model a run would send to (a trigger's choice, or the workload's model).
    :param allowed_models: the allowed models (``PipelineConfig.models``: the configured
        ``allowed_models``, or the workload's own models when none are configured). An empty
        sequence allows nothing and is refused as a mistake of the caller.
    :param role: how to name the model in the message (e.g. ``"the workload's model"``).
    """
    allowed = list(dict.fromkeys(allowed_models))
    if not allowed:
        raise PreflightError(
            f"{role} {model!r} cannot be checked: the allowed models are empty "
            "(pass the configured allowed_models, or the workload's models)"
        )
    if not isinstance(model, str) or not model:
        raise PreflightError(f"{role} {model!r} is not a model id; allowed models: {allowed}")
    if model in allowed:
        return
    close = difflib.get_close_matches(model, allowed, n=1, cutoff=0.8)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise PreflightError(f"{role} {model!r} is not one of the allowed models {allowed}{hint}")
