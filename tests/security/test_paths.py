"""Nothing writes outside the storage root: ObjectStore refuses paths that climb out, RunLayout encodes ids.

Hostile segments come from where users can put them: DAG ids and run ids (a run triggered from
the UI or the API names its own run id), task ids, the operator's templated ``shard`` path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from claude_batch.operators import ClaudeBatchOperator
from claude_batch.staging import rejects_path, shard_keys_path
from claude_batch.storage import ObjectStore, RunLayout, UnsafePathError, safe_segment
from claude_batch.validation import validated_path

CLIMBING_PATHS = [
    "../outside.json",
    "../../etc/passwd",
    "dag/../../outside.json",
    "dag/run/../../../outside.json",
    "/etc/passwd",
    "/outside.json",
    "..",
    ".",
    "",
    "dag//run/manifest.json",
    "dag/./run/manifest.json",
    "dag/run/..",
]
HOSTILE_IDS = [
    "../../outside",
    "../..",
    "a/../../b",
    "/absolute",
    "run/../../../etc",
    "manual__2026-01-01T00:00:00+00:00",
    "scheduled__2026-11-10T00:00:00+00:00/../../x",
    "%2e%2e",
    "..%2F..%2Foutside",
    "tab\tand\nnewline",
    "nul\x00byte",
    "ключ/..",
    "...",
    "\\..\\..\\outside",
]
REFUSED_IDS = ["..", ".", ""]


def layout_paths(layout: RunLayout) -> list[str]:
    return [
        layout.manifest,
        layout.report,
        layout.requests(0),
        layout.submission_state("submit", 7),
        layout.results_jsonl(3),
        layout.results_parquet(3),
        shard_keys_path(layout, 0),
        rejects_path(layout),
        validated_path(layout, 3),
        f"{layout.prefix}/state/submit.part-00000.json",
    ]


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if p.is_file()}


@pytest.fixture
def sandbox(tmp_path) -> tuple[Path, ObjectStore]:
    """A store rooted one level down, so anything that escapes lands in the sandbox, not elsewhere."""
    root = tmp_path / "root"
    root.mkdir()
    return tmp_path, ObjectStore(str(root))


@pytest.mark.parametrize("relpath", CLIMBING_PATHS)
def test_the_store_refuses_paths_that_leave_its_root(sandbox, relpath):
    tmp_path, store = sandbox
    operations = [
        lambda: store.write_bytes(relpath, b"x"),
        lambda: store.write_json(relpath, {"x": 1}),
        lambda: store.read_bytes(relpath),
        lambda: store.exists(relpath),
        lambda: store.delete(relpath),
        lambda: store.list(relpath),
        lambda: store.uri(relpath),
        lambda: store.open(relpath, "wb").__enter__(),
    ]
    for operation in operations:
        with pytest.raises(UnsafePathError):
            operation()
    assert files_under(tmp_path) == set()


@pytest.mark.parametrize("relpath", CLIMBING_PATHS)
def test_an_s3_store_refuses_them_too(s3_store, relpath):
    with pytest.raises(UnsafePathError):
        s3_store.write_bytes(relpath, b"x")
    with pytest.raises(UnsafePathError):
        s3_store.uri(relpath)
    bucket = s3_store.root_path.split("/", 1)[0]
    assert s3_store.fs.find(bucket) == []


def test_a_sibling_prefix_is_not_reachable(s3_store):
    """``<root>-other`` shares the root's text as a prefix; a key can still not reach it."""
    for relpath in ("../claude-batch-other/x", "..claude-batch-other/x"):
        try:
            uri = s3_store.uri(relpath)
        except UnsafePathError:
            continue
        assert uri.startswith(s3_store.root + "/")


@pytest.mark.parametrize("dag_id", HOSTILE_IDS)
def test_hostile_dag_and_run_ids_stay_inside_their_own_folder(sandbox, dag_id):
    """Each id becomes one encoded segment; a path is written inside the run's folder or refused."""
    tmp_path, store = sandbox
    root = Path(store.root_path)
    layout = RunLayout(store, dag_id, dag_id[::-1])
    dag_segment, run_segment = layout.prefix.split("/")
    assert dag_segment == safe_segment(dag_id) and "/" not in dag_segment + run_segment
    written = 0
    for relpath in layout_paths(layout):
        try:
            store.write_bytes(relpath, b"x")
            written += 1
        except UnsafePathError:  # e.g. a segment starting with "..": refused, never followed
            pass
    files = files_under(tmp_path)
    assert len(files) == written
    for path in files:  # resolved, every file is inside the run's own folder under the root
        assert path.resolve().is_relative_to((root / dag_segment / run_segment).resolve())


@pytest.mark.parametrize("segment", REFUSED_IDS)
def test_ids_that_are_path_syntax_are_refused(sandbox, segment):
    _, store = sandbox
    for layout in (RunLayout(store, segment, "run"), RunLayout(store, "dag", segment)):
        with pytest.raises(UnsafePathError):
            layout.manifest  # noqa: B018


class _TaskInstance:
    dag_id, task_id, map_index = "dag", "submit", 0

    def xcom_push(self, key, value):
        raise AssertionError("nothing may be pushed for a refused shard")


@pytest.mark.parametrize(
    "shard", ["../other-tenant/requests/part-00000.jsonl", "/etc/passwd", "a/../../b.jsonl"]
)
def test_the_operator_refuses_a_shard_outside_the_root_before_any_call(sandbox, emulator, shard):
    tmp_path, store = sandbox
    (tmp_path / "other-tenant" / "requests").mkdir(parents=True)
    (tmp_path / "other-tenant" / "requests" / "part-00000.jsonl").write_text(
        '{"custom_id": "x", "params": {}}\n'
    )
    operator = ClaudeBatchOperator(
        task_id="submit", shard=shard, storage_root=str(store.root_path), wait="none"
    )
    with pytest.raises(UnsafePathError):
        operator.execute({"ti": _TaskInstance(), "run_id": "run-1"})
    assert emulator.stats()["http_requests"]["create"] == 0
    assert files_under(Path(store.root_path)) == set()  # not even a state file
