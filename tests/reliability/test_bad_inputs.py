"""The bad-input corpus through a whole DAG: every row ends in a clear ledger state with a readable reason.

One ``dag.test()`` of ``cb_reliability_corpus`` (tests/dags/reliability_dags.py) over a DuckDB
warehouse, moto S3 and an emulator whose responder answers badly on cue; see
``tests/reliability/corpus.py`` for the rows and what each must become.
"""

from __future__ import annotations

import re
from collections import Counter

import duckdb
import pytest
from claude_batch.contracts import custom_id_for
from claude_batch.storage import RunLayout

from tests.reliability.corpus import CASES, DAG_ID, RESULTS_TABLE, Case

pytestmark = pytest.mark.airflow


def ledger_rows(corpus_run) -> dict[str, tuple]:
    conn = duckdb.connect(str(corpus_run.warehouse_path), read_only=True)
    try:
        rows = conn.execute(
            "SELECT record_key, status, last_error, custom_id, attempts, run_id FROM claude_batch_ledger"
        ).fetchall()
    finally:
        conn.close()
    return {row[0]: row[1:] for row in rows}


def warehouse_query(corpus_run, sql: str) -> list[tuple]:
    conn = duckdb.connect(str(corpus_run.warehouse_path), read_only=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_the_corpus_has_at_least_twenty_kinds_of_bad_rows():
    kinds = {case.kind for case in CASES if case.kind != "plain text (the control row)"}
    assert len(kinds) >= 20, len(kinds)
    assert {case.status for case in CASES} == {"succeeded", "dead", "invalid"}


def test_the_corpus_run_succeeds(corpus_run):
    assert corpus_run.state == "success", corpus_run.notes
    tasks = corpus_run.notes["tasks"]
    # Round 1 does everything; later rounds skip (nothing is left to retry: no item errored), and
    # so do the pilot's tasks (no pilot was asked for).
    follow_up = re.compile(r"(?:^|\.)(requeue|submit|record|wait|collect|load)_\d|(?:^|\.)pilot")
    assert all(state == "success" for task, state in tasks.items() if not follow_up.search(task)), tasks
    assert {state for task, state in tasks.items() if follow_up.search(task)} == {"skipped"}, tasks
    staged = sum(1 for case in CASES if case.status != "dead" or case.reason is None)
    assert corpus_run.emulator_stats["batches_created"] == 2  # 25 requests a shard
    assert corpus_run.emulator_stats["requests_received"] == staged


def _match(case: Case, status: str, last_error: str | None) -> str | None:
    """Why the ledger row does not fit the case (None: it fits)."""
    if status != case.status:
        return f"status {status!r}, expected {case.status!r} ({last_error})"
    if case.reason is None:
        return None if last_error is None else f"unexpected error {last_error!r}"
    if not last_error or not re.search(case.reason, last_error):
        return f"reason {last_error!r} does not match {case.reason!r}"
    return None


def test_every_row_ends_in_a_clear_ledger_state_with_a_readable_reason(corpus_run):
    ledger = ledger_rows(corpus_run)
    problems = []
    claimed: set[str] = set()
    for case in CASES:
        if case.ledger_prefix is None:
            row = ledger.get(case.key)
            if row is None:
                problems.append(f"{case.kind}: no ledger row for key {case.key!r}")
                continue
            claimed.add(case.key)
            problem = _match(case, row[0], row[1])
        else:  # a made-up ledger key: find an unclaimed row of that shape that fits
            candidates = [k for k in ledger if k.startswith(case.ledger_prefix) and k not in claimed]
            fits = [k for k in candidates if _match(case, ledger[k][0], ledger[k][1]) is None]
            problem = (
                None
                if fits
                else f"no ledger row {case.ledger_prefix}* fits: {[ledger[k] for k in candidates]}"
            )
            if fits:
                claimed.add(fits[0])
        if problem:
            problems.append(f"{case.kind}: {problem}")
    assert not problems, "\n".join(problems)
    assert len(ledger) == len(CASES) == len(claimed)  # one ledger item per row, nothing else
    for _status, last_error, *_ in ledger.values():
        if last_error is not None:  # readable: short, one line of plain words, no traceback or repr noise
            assert len(last_error) < 400 and "Traceback" not in last_error and "\n" not in last_error
            assert re.match(r"^(row \d+: )?[a-z]", last_error), last_error


def test_rejected_rows_keep_their_content_for_the_record(corpus_run):
    store = corpus_run.store()
    layout = RunLayout(store, DAG_ID, corpus_run.run_id)
    rejects = store.read_bytes(f"{layout.prefix}/requests/rejects.jsonl").decode().splitlines()
    dead_at_staging = [case for case in CASES if case.status == "dead"]
    assert len(rejects) == len(dead_at_staging)
    assert all('"row":' in line and '"reason_code":' in line for line in rejects)


def test_keys_join_back_to_their_rows_without_collisions(corpus_run):
    ledger = ledger_rows(corpus_run)
    results = dict(warehouse_query(corpus_run, f"SELECT record_key, custom_id FROM {RESULTS_TABLE}"))
    succeeded = {case.key for case in CASES if case.status == "succeeded"}
    assert set(results) == succeeded  # each succeeded row once, under its own key
    assert len(set(results.values())) == len(results)  # no two rows share a custom_id
    for key, custom_id in results.items():
        assert custom_id == custom_id_for(key) == ledger[key][2]
    hash_shaped = next(case.key for case in CASES if case.kind.startswith("literal key shaped"))
    assert results["order #17/b"] == hash_shaped  # the other key's hash is the literal's text...
    assert results[hash_shaped] != hash_shaped  # ...so the literal itself is hashed: no collision
    assert results["a" * 64] == "a" * 64 and results["a" * 65] != "a" * 65
    assert len({results["Case"], results["case"], results[" padded "], results["padded"]}) == 4
    assert results["trailing-newline\n"] == custom_id_for("trailing-newline\n") != "trailing-newline\n"


def test_sql_and_injection_content_is_only_data(corpus_run):
    tables = {
        name for (name,) in warehouse_query(corpus_run, "SELECT table_name FROM information_schema.tables")
    }
    assert {"corpus", "claude_batch_ledger", "claude_batch_runs", RESULTS_TABLE} <= tables
    assert warehouse_query(corpus_run, "SELECT COUNT(*) FROM corpus")[0][0] == len(CASES)
    answers = dict(warehouse_query(corpus_run, f"SELECT record_key, category FROM {RESULTS_TABLE}"))
    allowed = {"billing", "bug", "feature_request", "cancellation", "other"}
    for key in ("sql-text", "injection", "x'; DROP TABLE claude_batch_ledger; --"):
        assert answers[key] in allowed  # validated against the schema like any answer


def test_the_accounting_holds_for_the_corpus_run(corpus_run):
    ledger = ledger_rows(corpus_run)
    by_status = Counter(row[0] for row in ledger.values())
    expected = Counter(case.status for case in CASES)
    assert by_status == expected
    report = corpus_run.store().read_json(RunLayout(corpus_run.store(), DAG_ID, corpus_run.run_id).report)
    assert report["extracted"] == len(CASES) == sum(report["ledger"].values())
    assert report["ledger"] == dict(expected)
    assert report["rejected"] == expected["dead"]
    extracted, succeeded, invalid, retry, dead = warehouse_query(
        corpus_run, "SELECT extracted, succeeded, invalid, retry, dead FROM claude_batch_runs"
    )[0]
    assert extracted == succeeded + invalid + retry + dead == len(CASES)


def test_a_key_with_a_trailing_newline_does_not_break_its_batch(anthropic_conn, tmp_path):
    """Regression (fixed in fd6fcc4): the key was kept as its custom_id, cutting its JSONL line in two."""
    from claude_batch.hooks import ClaudeBatchHook
    from claude_batch.staging import stage_requests
    from claude_batch.storage import ObjectStore
    from claude_batch.submission import BatchSubmitter, StoredShard

    from tests.reliability.harness import WORKLOAD

    layout = RunLayout(ObjectStore(str(tmp_path)), "dag", "run-1")
    rows = [{"id": key, "body": "charged twice"} for key in ("ok-1", "ok-2", "trailing-newline\n")]
    manifest = stage_requests(rows, WORKLOAD, layout, key_field="id", cache_setting="off")
    assert manifest.staged_requests == 3
    shard = f"{layout.prefix}/{manifest.shards[0].requests}"
    submitter = BatchSubmitter(ClaudeBatchHook(), layout.store, layout.submission_state("submit", 0))
    submitter.submit(StoredShard(layout.store, shard))
    assert anthropic_conn.stats()["batches_created"] == 1
