"""Nothing stranded: items held by a run that failed or was given up are taken back.

A run holds its items (``pending``/``submitted`` in the ledger) from its gate until its load.
When the run fails after its gate (its wait timed out, a collect gave up, someone marked it
failed) no later run would touch them: extract skips items another run holds. So before a
run extracts, :func:`recover_stranded` looks at every other run holding items of the workload
and asks Airflow for its state. For each run that is over (``failed``, or ``success`` with
items still open, as a run marked success by hand):

- a shard whose batch exists (its submission state names it) waits until that batch has ended;
  then its results are collected, validated and loaded for the holding run, exactly as that
  run's own collect and load would have done: what the batch answered is kept and nothing is
  paid for again, and what it did not answer moves to ``retry``;
- a shard that was never submitted (no submission state) is released: its items become
  ``retry`` held by no run;
- a shard with only a submission intent (a crash right after a paid create) is left held: the
  holding run's own retry can still find its batch, and guessing here could pay twice.

The current run's extract then picks up everything that became ``retry``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from claude_batch.costs import PriceTable
from claude_batch.results import collect_results
from claude_batch.staging import Manifest, read_manifest
from claude_batch.storage import ObjectStore, RunLayout
from claude_batch.submission import SubmissionState
from claude_batch.validation import validate_part
from claude_batch.warehouse import Warehouse
from claude_batch.workloads import Workload

log = logging.getLogger(__name__)

# Airflow DAG run states after which a run will not move its items any more.
OVER_STATES = frozenset({"failed", "success"})
_STATE_FILE = re.compile(r"(?P<task>.+)\.part-(?P<index>\d{5})\.json")
_SUBMIT_TASK = re.compile(r"(?:^|\.)(?:(?P<pilot>pilot_)submit|submit(?:_(?P<round>\d+))?)$")


@dataclass
class RecoveryReport:
    """What :func:`recover_stranded` did, per holding run."""

    collected: dict[str, list[str]] = field(default_factory=dict)  # run -> batches collected and loaded
    released: dict[str, int] = field(default_factory=dict)  # run -> items released (never submitted)
    waiting: dict[str, list[str]] = field(default_factory=dict)  # run -> batches not ended yet
    live: list[str] = field(default_factory=list)  # runs still running: left alone

    @property
    def changed(self) -> bool:
        return bool(self.collected or self.released)


def recover_stranded(
    workload: Workload,
    warehouse: Warehouse,
    store: ObjectStore,
    client: Any,
    run_state: Callable[[str, str], str | None],
    *,
    current_run_id: str,
    prices: PriceTable | None = None,
    conn_id: str = "anthropic_default",
) -> RecoveryReport:
    """Take back the items of every run that is over but still holds items of ``workload``.

    :param workload: the workload (its current prompt version).
    :param warehouse: the warehouse holding the ledger.
    :param store: the object store the runs' layouts live in.
    :param client: an ``anthropic.Anthropic`` client (retrieve and results).
    :param run_state: ``(dag_id, run_id) -> state`` from Airflow (None when unknown: left alone).
    :param current_run_id: the run doing this (never recovered from).
    """
    report = RecoveryReport()
    for holder in warehouse.open_holders(workload):
        if holder.run_id == current_run_id:
            continue
        state = run_state(holder.dag_id, holder.run_id) if holder.dag_id else None
        if not holder.dag_id or state not in OVER_STATES:  # no DAG id: no state to go on, so live
            report.live.append(holder.run_id)
            continue
        layout = RunLayout(store, holder.dag_id, holder.run_id)
        if read_manifest(layout) is None:  # claimed but never staged here: nothing was sent
            report.released[holder.run_id] = warehouse.release_claim(
                workload, holder.run_id, f"released: run {holder.run_id} ended ({state}) before it submitted"
            )
            continue
        batches = _submitted_batches(layout)
        # Round 0 is the run's pilot (its own manifest under <run>/pilot/, when it had one).
        for number in sorted({0, 1, *(n for n, _ in batches)}):
            round_layout = layout.in_round(number)
            manifest = read_manifest(round_layout)
            if manifest is not None:
                parts = {index: batch for (n, index), batch in batches.items() if n == number}
                _recover_round(
                    workload, warehouse, round_layout, manifest, parts, client, state, report, prices, conn_id
                )
    return report


def _recover_round(
    workload: Workload,
    warehouse: Warehouse,
    layout: RunLayout,
    manifest: Manifest,
    by_index: dict[int, str | None],
    client: Any,
    state: str,
    report: RecoveryReport,
    prices: PriceTable | None,
    conn_id: str,
) -> None:
    run_id = layout.run_id
    # A submit task's map index i sent the round manifest's i-th shard.
    batches = {manifest.shards[i].part: batch for i, batch in by_index.items() if i < len(manifest.shards)}
    never_submitted = []
    for shard in manifest.shards:
        if shard.part not in batches:
            never_submitted.append(shard.part)
            continue
        batch_id = batches[shard.part]
        if batch_id is None:  # an intent only: the run's own retry must find that batch
            report.waiting.setdefault(run_id, []).append(f"part {shard.part} (submission intent only)")
            continue
        batch = client.messages.batches.retrieve(batch_id)
        if batch.processing_status != "ended":
            report.waiting.setdefault(run_id, []).append(batch_id)
            continue
        collect_results(
            client, layout, shard.part, batch_id, manifest=manifest, prices=prices, conn_id=conn_id
        )
        validate_part(workload, layout, shard.part)
        warehouse.load_run(workload, layout, manifest, parts=[shard.part])
        report.collected.setdefault(run_id, []).append(batch_id)
        log.info(
            "Recovered batch %s of run %s (%s): its results are loaded, the rest requeued.",
            batch_id,
            run_id,
            state,
        )
    if never_submitted:
        released = warehouse.release_claim(
            workload,
            run_id,
            f"released: run {run_id} ended ({state}) before submitting it",
            layout=layout,
            parts=[manifest.shard(part) for part in never_submitted],
        )
        report.released[run_id] = report.released.get(run_id, 0) + released


def _submitted_batches(layout: RunLayout) -> dict[tuple[int, int], str | None]:
    """(round, map index) -> the batch that submit task created (None: an intent, no batch id yet).

    Submission state is written per submit task and map index under ``<run>/state/``: round 1's
    task is ``<group>.submit``, round N's ``<group>.submit_N``, the pilot's (round 0)
    ``<group>.pilot_submit``.
    """
    found: dict[tuple[int, int], str | None] = {}
    for path in layout.store.list(layout.submission_states):
        match = _STATE_FILE.fullmatch(path.rsplit("/", 1)[-1])
        task = _SUBMIT_TASK.search(match["task"]) if match else None
        if match is None or task is None:
            continue
        data = layout.store.read_json_or_none(path)
        # ``refused``: the queue turned the create away and nothing was created since, so the
        # shard counts as never submitted (its items are released), not as an intent to wait on.
        if data is not None and data.get("phase") != "refused":
            number = 0 if task["pilot"] else int(task["round"]) if task["round"] else 1
            found[(number, int(match["index"]))] = SubmissionState.from_json(data).batch_id
    return found
