"""The DAG run's note: what a run did and cost, readable in the runs list without opening a log.

The pipeline's tasks say what they learned as an XCom (:data:`NOTE_KEY`): ``stage`` what it
staged and the estimate, ``gate`` a dry run, a refusal or nothing to do, ``pilot_decide`` a
failed pilot, ``report`` the run's outcome and cost. A task cannot write its own run's note
(the Task SDK's execution API has no such call), so this module is also an Airflow listener
(registered by the plugin): when a run ends, in the scheduler (or in ``dag.test()``), it writes
the newest of those lines as the run's note, with ``FAILED`` and the failed task in front
when the run failed. A note someone wrote by hand is kept; the summary goes below it.

The same figures go on each results Asset event's ``extra`` (:func:`cost_summary`), so a DAG
scheduled on the results table sees what the run cost without reading the warehouse.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

log = logging.getLogger(__name__)

NOTE_KEY = "claude_batch_note"
NOTE_MAX_CHARS = 1000  # the dag_run_note column
SEPARATOR = "\n\n---\n"
# The first words of every note this package writes (so a re-run replaces it, not a person's).
OURS = (
    "**Cost**",
    "**Dry run**",
    "**Nothing to do**",
    "**Refused**",
    "**FAILED**",
    "**Staged**",
    "**Pilot failed**",
    "**Error**",
)


def _money(value: Any) -> str:
    return f"${float(value or 0):,.4f}"


def _counts(by_status: Mapping[str, int] | None) -> str:
    order = ("succeeded", "invalid", "retry", "dead", "pending", "submitted")
    items = sorted(
        (by_status or {}).items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else 99, kv[0])
    )
    return " · ".join(f"{count:,} {status}" for status, count in items if count) or "none"


def staged_note(staged: Mapping[str, Any]) -> str:
    """What ``stage`` found (the note until a later task says more)."""
    return (
        f"**Staged** {staged.get('staged', 0):,} requests in {staged.get('shards', 0):,} shard(s) "
        f"({staged.get('rejected', 0):,} rejected before sending); "
        f"estimated {_money(staged.get('estimated_cost_usd'))}"
    )


def dry_run_note(staged: Mapping[str, Any], model: str | None = None) -> str:
    return (
        f"**Dry run** nothing was submitted. {staged.get('staged', 0):,} requests staged in "
        f"{staged.get('shards', 0):,} shard(s) ({staged.get('rejected', 0):,} rejected); "
        f"estimated cost {_money(staged.get('estimated_cost_usd'))}" + (f" on {model}" if model else "") + "."
    )


def nothing_note(reason: str) -> str:
    return f"**Nothing to do** {reason}"


def refused_note(reason: str) -> str:
    return f"**Refused** {reason}"


def pilot_failed_note(reason: str) -> str:
    return f"**Pilot failed** {reason}"


def error_note(task: str, error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"**Error** in {task}: {type(error).__name__}: {text[:400]}"


def report_note(report: Mapping[str, Any]) -> str:
    """The run's outcome and cost, from its report: three short lines."""
    cost, realtime = float(report.get("cost_usd") or 0), float(report.get("realtime_cost_usd") or 0)
    saving = float(report.get("saving_usd") or realtime - cost)
    share = f" ({saving / realtime:.0%})" if realtime else ""
    lines = [
        f"**Cost** {_money(cost)} in batches · {_money(realtime)} real-time · saved {_money(saving)}{share}",
        f"**Items** {_counts(report.get('ledger'))} (of {int(report.get('extracted') or 0):,} extracted)",
    ]
    batch = f"**Batches** {int(report.get('batches') or 0):,}"
    rounds = report.get("rounds") or []
    if len(rounds) > 1:
        batch += f" in {len(rounds)} rounds"
    seconds = report.get("batch_seconds") or {}
    if seconds.get("max") is not None:
        batch += f", longest {_duration(seconds['max'])}"
    hit = report.get("cache_hit_rate")
    batch += f" · cache hit rate {hit:.0%}" if hit is not None else " · no cache reads"
    lines.append(batch)
    pilot = report.get("pilot") or {}
    if pilot.get("pass_rate") is not None:
        lines.append(f"**Pilot** {pilot.get('judged', 0):,} answers, {pilot['pass_rate']:.0%} valid")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def cost_summary(loaded: Mapping[str, Any], *, run_id: str, workload: str) -> dict[str, Any]:
    """The run's figures so far, from a ``load`` task's result (the results Asset event's ``extra``).

    What the run paid and for what; the comparisons with real-time calls are the report's
    (``report.json``, the run's note), which sees every round.
    """
    load = loaded.get("load") or {}
    cost = float(load.get("cost_usd") or 0)
    read, written = (
        int(load.get("cache_read_input_tokens") or 0),
        int(load.get("cache_creation_input_tokens") or 0),
    )
    rounds = loaded.get("rounds") or []
    return {
        "workload": workload,
        "run_id": run_id,
        "round": rounds[-1]["round"] if rounds else None,
        "extracted": int(loaded.get("extracted") or 0),
        "results_upserted": int(load.get("results_upserted") or 0),
        "ledger": dict(loaded.get("ledger") or {}),
        "cost_usd": round(cost, 6),
        "input_tokens": int(load.get("input_tokens") or 0),
        "output_tokens": int(load.get("output_tokens") or 0),
        "cache_hit_rate": round(read / (read + written), 4) if read + written else None,
    }


def compose(existing: str | None, ours: str) -> str:
    """The note to store: ours, below a note a person wrote (which is kept), within the column's size."""
    kept = (existing or "").split(SEPARATOR)[0].strip() if existing else ""
    if kept.startswith(OURS):
        kept = ""
    if not kept:
        return ours[:NOTE_MAX_CHARS]
    room = NOTE_MAX_CHARS - len(SEPARATOR) - len(ours)
    if room < 40:
        return ours[:NOTE_MAX_CHARS]
    return (kept[: room - 1] + "…" if len(kept) > room else kept) + SEPARATOR + ours


def run_note(notes: list[tuple[str, str]], failed_tasks: list[str] | None) -> str | None:
    """The note from the run's note XComs ``[(task_id, text)]``, newest last, and its failed tasks.

    Two pipelines in one DAG (TaskGroups) each get a line: the newest note of each group.
    """
    if not notes and not failed_tasks:
        return None
    newest: dict[str, str] = {}
    for task_id, text in notes:
        newest[task_id.rsplit(".", 1)[0] if "." in task_id else ""] = text
    body = "\n\n".join(newest.values())
    if failed_tasks:
        head = f"**FAILED** at {', '.join(sorted(set(failed_tasks))[:5])}"
        return f"{head}\n{body}" if body else head
    return body


# --- the listener (the scheduler calls it as runs end) --------------------------------------------

_Listener = TypeVar("_Listener", bound=Callable[..., Any])


class _HookMarker(Protocol):
    """What the listener functions are decorated with: pluggy's marker, or nothing at all."""

    def __call__(self, function: _Listener, /) -> _Listener: ...


def _unmarked(function: _Listener) -> _Listener:
    return function


hookimpl: _HookMarker
try:
    from airflow.listeners import hookimpl
except ImportError:  # pragma: no cover - the Task SDK alone (a worker without airflow-core)
    hookimpl = _unmarked


def _notes_of(dag_run: Any, session: Any) -> list[tuple[str, str]]:
    from airflow.models.xcom import XComModel
    from sqlalchemy import select

    rows = session.execute(
        select(XComModel.task_id, XComModel.value, XComModel.timestamp)
        .where(
            XComModel.dag_id == dag_run.dag_id, XComModel.run_id == dag_run.run_id, XComModel.key == NOTE_KEY
        )
        .order_by(XComModel.timestamp)
    ).all()
    notes = []
    for row in rows:
        value = XComModel.deserialize_value(row)
        if isinstance(value, str) and value:
            notes.append((row.task_id, value))
    return notes


def _failed_tasks(dag_run: Any, session: Any) -> list[str]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.state import TaskInstanceState
    from sqlalchemy import select

    rows = session.execute(
        select(TaskInstance.task_id, TaskInstance.map_index).where(
            TaskInstance.dag_id == dag_run.dag_id,
            TaskInstance.run_id == dag_run.run_id,
            TaskInstance.state == TaskInstanceState.FAILED,
        )
    ).all()
    return [f"{task}[{index}]" if index >= 0 else task for task, index in rows]


def write_note(dag_run: Any, failed: bool) -> str | None:
    """Set the ended run's note from its note XComs (in the run's own session); returns it."""
    from airflow.utils.session import create_session
    from sqlalchemy.orm import object_session

    session = object_session(dag_run)
    if session is None:
        with create_session() as own:
            attached = own.merge(dag_run)
            return _write(attached, own, failed)
    return _write(dag_run, session, failed)


def _write(dag_run: Any, session: Any, failed: bool) -> str | None:
    notes = _notes_of(dag_run, session)
    if not notes:
        return None  # not a claude-batch run (or it failed before it staged: the failure alert says so)
    note = run_note(notes, _failed_tasks(dag_run, session) if failed else None)
    if note is None:
        return None
    dag_run.note = compose(dag_run.note, note)
    return dag_run.note


@hookimpl
def on_dag_run_success(dag_run: Any, msg: str) -> None:
    try:
        write_note(dag_run, failed=False)
    except Exception:
        log.exception("claude-batch: could not write the note of run %s", getattr(dag_run, "run_id", "?"))


@hookimpl
def on_dag_run_failed(dag_run: Any, msg: str) -> None:
    try:
        write_note(dag_run, failed=True)
    except Exception:
        log.exception("claude-batch: could not write the note of run %s", getattr(dag_run, "run_id", "?"))
