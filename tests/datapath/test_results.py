"""Collect against the emulator: raw JSONL and Parquet on S3, cut streams retried, never accepted."""

from __future__ import annotations

import anthropic
import orjson
import pytest
from claude_batch.results import (
    BatchNotEnded,
    ResultsIncomplete,
    ResultsMismatch,
    collect_results,
    read_results,
)
from claude_batch.staging import StagingLimits, stage_requests
from claude_batch.storage import RunLayout

from tests.conftest import EMULATOR_API_KEY
from tests.datapath.conftest import make_workload, ticket_rows
from tests.datapath.helpers import submit_shard


@pytest.fixture
def client(emulator):
    return anthropic.Anthropic(api_key=EMULATOR_API_KEY, base_url=emulator.base_url, max_retries=0)


def staged(layout, rows, **limits):
    return stage_requests(
        rows, make_workload(), layout, key_field="id", cache_setting="off", limits=StagingLimits(**limits)
    )


def run_batch(client, emulator, layout, manifest, part=0):
    batch_id = submit_shard(client, layout, manifest.shard(part))
    emulator.advance(3600)
    return batch_id


def test_collect_writes_raw_jsonl_and_parquet_to_s3(s3_store, emulator, client):
    layout = RunLayout(s3_store, "invoices_dag", "run-1")
    rows = list(ticket_rows(40)) + [{"id": "needs hashing!", "body": "Invoice total: $5.00"}]
    manifest = staged(layout, rows)
    emulator.configure(faults={"batch": {"errored_rate": 0.2, "expired_rate": 0.1}})
    batch_id = run_batch(client, emulator, layout, manifest)
    summary = collect_results(client, layout, 0, batch_id, manifest=manifest)
    assert summary.lines == 41 and summary.attempts == 1 and not summary.problems
    assert (
        sum(summary.counts.values()) == 41 and summary.counts["errored"] > 0 and summary.counts["expired"] > 0
    )
    raw = s3_store.read_bytes(layout.results_jsonl(0)).splitlines()
    assert len(raw) == 41 and all(orjson.loads(line)["custom_id"] for line in raw)
    table = read_results(layout, 0)
    assert table.num_rows == 41
    rows_by_key = {row["record_key"]: row for row in table.to_pylist()}
    assert set(rows_by_key) == {row["id"] for row in rows}
    hashed = rows_by_key["needs hashing!"]
    assert hashed["custom_id"].startswith("k_")
    ok = next(row for row in table.to_pylist() if row["outcome"] == "succeeded")
    assert ok["model"] == "claude-haiku-4-5-20251001" and ok["text"] and ok["cost_usd"] > 0
    assert ok["prompt_version"] == manifest.prompt_version and ok["batch_id"] == batch_id
    failed = next(row for row in table.to_pylist() if row["outcome"] == "errored")
    assert failed["error_type"] and failed["error_message"] and failed["cost_usd"] == 0
    assert summary.cost_usd == pytest.approx(sum(r["cost_usd"] for r in table.to_pylist()), rel=1e-6)


def test_a_cut_stream_is_detected_and_downloaded_again(layout, emulator, client):
    manifest = staged(layout, ticket_rows(30))
    batch_id = run_batch(client, emulator, layout, manifest)
    emulator.configure(faults={"results_cut": {"after_lines": 12, "times": 2, "mid_line": True}})
    summary = collect_results(client, layout, 0, batch_id, manifest=manifest, retry_wait_seconds=0.01)
    assert summary.attempts == 3 and summary.lines == 30
    assert any("not a complete result" in p or "result lines" in p for p in summary.problems)
    assert read_results(layout, 0).num_rows == 30


def test_a_stream_that_stays_short_is_never_accepted(layout, emulator, client):
    manifest = staged(layout, ticket_rows(20))
    batch_id = run_batch(client, emulator, layout, manifest)
    emulator.configure(faults={"results_cut": {"fraction": 0.5, "mid_line": False}})
    with pytest.raises(
        ResultsIncomplete, match="incomplete after 2 downloads.*but the batch has 20 requests"
    ):
        collect_results(
            client, layout, 0, batch_id, manifest=manifest, max_attempts=2, retry_wait_seconds=0.01
        )
    assert not layout.store.exists(layout.results_jsonl(0))
    assert not layout.store.exists(layout.results_parquet(0))


def test_results_of_another_batch_are_refused(layout, emulator, client):
    manifest = staged(layout, ticket_rows(15), max_requests_per_shard=10)
    first = run_batch(client, emulator, layout, manifest, part=0)
    with pytest.raises(ResultsMismatch, match="has 10 requests but shard part 1 has 5"):
        collect_results(client, layout, 1, first, manifest=manifest)


def test_a_batch_still_processing_is_not_collected(layout, emulator, client):
    manifest = staged(layout, ticket_rows(3))
    batch_id = submit_shard(client, layout, manifest.shard(0))
    with pytest.raises(BatchNotEnded, match="in_progress"):
        collect_results(client, layout, 0, batch_id, manifest=manifest)


def test_collecting_again_overwrites_the_same_objects(layout, emulator, client):
    manifest = staged(layout, ticket_rows(10))
    batch_id = run_batch(client, emulator, layout, manifest)
    collect_results(client, layout, 0, batch_id, manifest=manifest)
    first = layout.store.read_bytes(layout.results_jsonl(0))
    collect_results(client, layout, 0, batch_id, manifest=manifest)
    assert layout.store.read_bytes(layout.results_jsonl(0)) == first
    assert read_results(layout, 0).num_rows == 10


def test_a_refused_key_is_explained_without_the_key(layout, emulator):
    from claude_batch.hooks import ClaudeBatchAuthError

    manifest = staged(layout, ticket_rows(3))
    wrong_key = "sk-ant-api03-refused-0123456789abcdef"
    refused = anthropic.Anthropic(api_key=wrong_key, base_url=emulator.base_url, max_retries=0)
    with pytest.raises(
        ClaudeBatchAuthError, match="Authentication failed while retrieving batch msgbatch_x"
    ) as error:
        collect_results(refused, layout, 0, "msgbatch_x", manifest=manifest, conn_id="claude_prod")
    assert "'claude_prod'" in str(error.value) and wrong_key not in str(error.value)


def test_a_refused_download_is_explained_at_once_and_leaves_nothing(layout, emulator, client):
    from claude_batch.hooks import ClaudeBatchAuthError

    manifest = staged(layout, ticket_rows(5))
    batch_id = run_batch(client, emulator, layout, manifest)
    emulator.configure(faults={"http": [{"endpoint": "results", "status": 403}]})
    with pytest.raises(ClaudeBatchAuthError, match="Permission denied while downloading the results"):
        collect_results(client, layout, 0, batch_id, manifest=manifest, retry_wait_seconds=0)
    assert sum(emulator.stats()["faults_injected"].values()) == 1  # not downloaded again
    assert not layout.store.exists(layout.results_jsonl(0))
    assert not layout.store.exists(layout.results_parquet(0))


def _download(layout, keys, lines, row_group_rows=2):
    """One download of ``lines`` (dicts) against a shard holding ``keys`` (custom_id = record key)."""
    import pyarrow as pa
    from claude_batch.costs import default_prices
    from claude_batch.results import _Download, _ShardKeys

    shard_keys = _ShardKeys(pa.table({"custom_id": keys, "record_key": [f"record-{key}" for key in keys]}))
    download = _Download(layout, 0, "msgbatch_1", shard_keys, row_group_rows)
    chunks = [orjson.dumps(line) + b"\n" for line in lines]  # a chunk a line: row groups of row_group_rows
    chunks[:1] = [chunks[0][:20], chunks[0][20:]]  # and a line split across chunks
    download.run(iter(chunks), "pv", default_prices())
    return download


def test_record_keys_come_from_the_shard_whatever_the_order_of_the_results(layout):
    from tests.datapath.helpers import ended, succeeded

    download = _download(
        layout, ["a", "b", "c"], [succeeded("c", "{}"), ended("a", "expired"), succeeded("b", "{}")]
    )
    download.check({"succeeded": 2, "expired": 1})
    assert not download.problems and download.seen.all()
    rows = read_results(layout, 0, columns=["custom_id", "record_key"]).to_pylist()
    assert rows == [{"custom_id": c, "record_key": f"record-{c}"} for c in ("c", "a", "b")]


def test_a_custom_id_seen_twice_is_a_problem_even_across_row_groups(layout):
    from tests.datapath.helpers import succeeded

    download = _download(
        layout, ["a", "b", "c"], [succeeded("a", "{}"), succeeded("b", "{}"), succeeded("a", "{}")]
    )
    download.check({"succeeded": 3})
    assert "some custom_ids appear more than once" in download.problems


def test_custom_ids_that_are_not_the_shards_are_refused(layout):
    from tests.datapath.helpers import succeeded

    download = _download(layout, ["a", "b"], [succeeded("a", "{}"), succeeded("zz", "{}")])
    with pytest.raises(
        ResultsMismatch, match="returned 1 custom_ids that are not in shard part 0 \\(e.g. zz\\)"
    ):
        download.check({"succeeded": 2})


def test_cost_is_priced_per_model_and_null_for_an_unknown_model():
    from claude_batch.costs import Usage, default_prices, usage_cost

    from tests.datapath.helpers import ended, errored, results_batch, succeeded

    split = {
        "input_tokens": 10,
        "output_tokens": 7,
        "cache_creation_input_tokens": 300,
        "cache_read_input_tokens": 40,
        "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
    }
    unsplit = {
        "input_tokens": 3,
        "output_tokens": 5,
        "cache_creation_input_tokens": 50,
        "cache_read_input_tokens": 0,
    }
    lines = [
        succeeded("a", "{}", model="claude-haiku-4-5-20251001", usage=split),
        succeeded("b", "{}", model="claude-sonnet-4-5", usage=unsplit),
        succeeded("c", "{}", model="claude-unknown-9", usage=unsplit),
        errored("d"),
        ended("e", "expired"),
        succeeded("f", "{}", model="claude-haiku-4-5-20251001", usage=unsplit),
    ]
    rows = results_batch(lines).to_pylist()
    expected = [
        usage_cost(Usage.from_api(split), "claude-haiku-4-5-20251001"),
        usage_cost(Usage.from_api(unsplit), "claude-sonnet-4-5"),
        None,
        0.0,
        0.0,
        usage_cost(Usage.from_api(unsplit), "claude-haiku-4-5-20251001"),
    ]
    assert default_prices().find("claude-sonnet-4-5") is not None
    for row, cost in zip(rows, expected, strict=True):
        assert row["cost_usd"] == (None if cost is None else pytest.approx(cost, rel=1e-12))
    assert (rows[0]["cache_creation_5m_input_tokens"], rows[0]["cache_creation_1h_input_tokens"]) == (
        100,
        200,
    )
    assert (rows[1]["cache_creation_5m_input_tokens"], rows[1]["cache_creation_1h_input_tokens"]) == (50, 0)


def _mixed_lines(count):
    from tests.datapath.helpers import ended, errored, succeeded

    kinds = [
        lambda i: succeeded(f"k{i:04d}", f'{{"n": {i}}}', usage={"input_tokens": i, "output_tokens": 3}),
        lambda i: errored(f"k{i:04d}", message=f"boom {i}"),
        lambda i: ended(f"k{i:04d}", "expired"),
        lambda i: succeeded(f"k{i:04d}", tool_input={"n": i}, stop_reason="tool_use"),
    ]
    return [kinds[i % 4](i) for i in range(count)]


def test_row_groups_and_chunks_of_any_size_write_the_same_results(tmp_path):
    """The results Parquet does not depend on the chunk size: one row a row group, or all in one."""
    import pyarrow.parquet as pq
    from claude_batch.costs import default_prices
    from claude_batch.results import _Download, _ShardKeys
    from claude_batch.storage import ObjectStore

    keys = [f"k{i:04d}" for i in range(250)]
    shard_keys = _ShardKeys(pa_keys(keys))
    lines = _mixed_lines(250)
    body = b"".join(orjson.dumps(line) + b"\n" for line in reversed(lines))
    tables = []
    for name, row_group_rows, chunk, groups in (
        ("tiny", 1, 7, 250), ("small", 16, 301, 16), ("whole", 10_000, len(body), 1),
    ):  # fmt: skip
        layout = RunLayout(ObjectStore(str(tmp_path / name)), "dag", "run")
        download = _Download(layout, 0, "msgbatch_1", shard_keys, row_group_rows)
        download.run(iter([body[i : i + chunk] for i in range(0, len(body), chunk)]), "pv", default_prices())
        download.check({"succeeded": 125, "errored": 63, "expired": 62})
        assert not download.problems and download.seen.all()
        assert (download.lines, download.bytes) == (250, len(body))
        tables.append(read_results(layout, 0))
        with layout.store.open(layout.results_parquet(0), "rb") as handle:
            assert pq.ParquetFile(handle).metadata.num_row_groups == groups
    assert tables[0].equals(tables[1]) and tables[1].equals(tables[2])
    assert tables[0].column("record_key").to_pylist() == [f"record-k{i:04d}" for i in reversed(range(250))]


def pa_keys(keys):
    import pyarrow as pa

    return pa.table({"custom_id": keys, "record_key": [f"record-{key}" for key in keys]})


def test_shard_keys_find_each_id_by_its_hash_and_check_it(monkeypatch):
    import pyarrow as pa
    from claude_batch import results

    ids = ["a", "zz", "b", "a-but-not-the-shards", ""]
    keys = results._ShardKeys(pa_keys(["a", "b", "c"]))
    assert keys._by_id is None
    assert keys.positions(ids, pa.array(ids)).to_pylist() == [0, None, 1, None, None]
    # Every id hashed alike: the shard's own ids go to a dict, and a look-up still checks the id.
    monkeypatch.setattr(results, "hash", lambda value: 7, raising=False)
    colliding = results._ShardKeys(pa_keys(["a", "b", "c"]))
    assert colliding._by_id == {"a": 0, "b": 1, "c": 2}
    assert colliding.positions(ids, pa.array(ids)).to_pylist() == [0, None, 1, None, None]
    single = results._ShardKeys(pa_keys(["a"]))  # one key: no collision among the shard's own ids
    assert single._by_id is None
    assert single.positions(ids, pa.array(ids)).to_pylist() == [0, None, None, None, None]
    empty = results._ShardKeys(pa_keys([]))
    assert empty.positions(ids, pa.array(ids)).to_pylist() == [None] * 5
