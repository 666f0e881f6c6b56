"""What ``claude-batch`` prints: aligned tables and one renderer per command (without ``--json``).

The output is the CLI's contract with the people who read it (and tests/ops checks it byte for
byte): numbers right-aligned with thousands separators, money to four places under $100, times
as UTC minutes, ``-`` for a value that is not known, ``(none)`` for an empty table.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from datetime import date, datetime
from typing import Any

from claude_batch.ops import DeadItems, LedgerCounts, RequeueResult, RunSummary, Status

STATUS_COLUMNS = ("pending", "submitted", "succeeded", "invalid", "retry", "dead")


class _Right(str):
    """A pre-formatted cell that aligns right (money, durations, rates)."""


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, empty: str = "(none)") -> str:
    """Rows under headers in aligned columns: numbers (and :class:`_Right` cells) right-aligned, text left."""
    if not rows:
        return "  " + empty
    cells = [[_cell(value) for value in row] for row in rows]
    right = [
        all(
            isinstance(row[i], int | float | _Right) and not isinstance(row[i], bool) or row[i] is None
            for row in rows
        )
        for i in range(len(headers))
    ]
    widths = [max(len(headers[i]), *(len(row[i]) for row in cells)) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(widths[i]) if right[i] else v.ljust(widths[i]) for i, v in enumerate(values)]
        return "  " + "  ".join(parts).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(row) for row in cells)])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, _Right):
        return str(value)
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.4f}"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def money(value: float | None) -> str:
    if value is None:
        return "-"
    return f"${value:,.4f}" if abs(value) < 100 else f"${value:,.2f}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    sign = "-" if seconds < 0 else ""
    seconds = abs(int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{sign}{hours}h {minutes:02d}m"
    if minutes:
        return f"{sign}{minutes}m {secs:02d}s"
    return f"{sign}{secs}s"


def percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.0f}%"


def _short(text: str | None, width: int = 70) -> str:
    if text is None:
        return "-"
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _ledger_table(counts: Sequence[LedgerCounts]) -> str:
    rows = [
        [
            c.workload,
            c.prompt_version,
            c.current,
            *(c.counts.get(s, 0) for s in STATUS_COLUMNS),
            c.total,
            c.requeued,
        ]
        for c in counts
    ]
    return table(["workload", "prompt version", "current", *STATUS_COLUMNS, "total", "requeued"], rows)


def _runs_table(runs: Sequence[RunSummary]) -> str:
    rows = [
        [r.workload, r.run_id, r.recorded_at, r.extracted, r.succeeded, r.invalid, r.retry, r.dead,
         _Right(money(r.cost_usd)), _Right(money(r.realtime_cost_usd)), _Right(money(r.saving_usd)),
         _Right(percent(r.cache_hit_rate)), _Right(duration(r.duration_seconds))]
        for r in runs
    ]  # fmt: skip
    headers = ["workload", "run", "recorded (UTC)", "extracted", "succeeded", "invalid", "retry", "dead",
               "cost", "real-time", "saving", "cache hits", "duration"]  # fmt: skip
    return table(headers, rows)


def render_status(status: Status, args: argparse.Namespace) -> str:
    parts = [f"claude-batch status of {args.conn_id} at {_cell(status.generated_at)} UTC"]
    if not status.workloads:
        parts.append("  no workload has run on this warehouse yet")
        return "\n".join(parts)
    parts += ["", "Ledger (items per status)", _ledger_table(status.ledger)]
    flight = [
        [b.batch_id, b.workload, b.run_id, b.items, _Right(duration(b.age_seconds)),
         _Right(duration(b.expires_in_seconds))]
        for b in status.in_flight
    ]  # fmt: skip
    parts += [
        "",
        "Batches in flight",
        table(["batch", "workload", "run", "items", "age", "expires in"], flight),
    ]
    held = [
        [h.workload, h.dag_id, h.run_id, h.pending, h.submitted, _Right(duration(h.age_seconds))]
        for h in status.holders
    ]
    parts += [
        "",
        "Runs holding items",
        table(["workload", "dag", "run", "pending", "submitted", "held for"], held),
    ]
    parts += ["", "Last run of each workload", _runs_table(status.last_runs)]
    return "\n".join(parts)


def render_runs(runs: list[RunSummary], args: argparse.Namespace) -> str:
    return "\n".join([f"Recent runs ({len(runs)})", _runs_table(runs)])


def render_ledger(counts: list[LedgerCounts], args: argparse.Namespace) -> str:
    return "\n".join(["Ledger (items per status)", _ledger_table(counts)])


def render_dead(dead: DeadItems, args: argparse.Namespace) -> str:
    scope = dead.workload or "every workload"
    versions = ", ".join(dead.prompt_versions) or "-"
    head = f"{dead.total:,} dead/invalid item(s) of {scope} (prompt version {versions})"
    if dead.search:
        head += f" matching {dead.search!r}"
    reasons = table(
        ["status", "items", "reason"], [[r.status, r.items, _short(r.reason, 100)] for r in dead.reasons]
    )
    items = table(
        ["workload", "key", "status", "attempts", "rejected", "run", "updated (UTC)", "reason"],
        [
            [
                i.workload,
                i.record_key,
                i.status,
                i.attempts,
                i.rejected,
                i.run_id,
                i.updated_at,
                _short(i.reason),
            ]
            for i in dead.items
        ],
    )
    shown = (
        f"Items ({len(dead.items):,} shown"
        + (f", from {args.offset:,}" if getattr(args, "offset", 0) else "")
        + ")"
    )
    return "\n".join([head, "", "Reasons", reasons, "", shown, items])


def render_requeue(result: RequeueResult, args: argparse.Namespace) -> str:
    where = f"{result.workload} at prompt version {result.prompt_version}"
    if result.dry_run:
        lines = [
            f"Would requeue {result.selected:,} item(s) of {where} ({result.selection}); nothing changed."
        ]
    else:
        lines = [
            f"Requeued {result.requeued:,} item(s) of {where} ({result.selection}), by {result.by} at "
            f"{_cell(result.at)} UTC: the workload's next run sends them again."
        ]
        if result.requeued < result.selected:
            lines.append(
                f"  {result.selected - result.requeued:,} changed meanwhile (another run moved them) "
                "and were left."
            )
    if result.keys:
        listed = ", ".join(result.keys[:20]) + (" ..." if len(result.keys) > 20 else "")
        lines.append(f"  keys: {listed}")
    if result.skipped:
        lines += ["", f"Not requeued ({len(result.skipped):,})"]
        lines.append(
            table(["key", "status", "why"], [[s.record_key, s.status, s.why] for s in result.skipped])
        )
    return "\n".join(lines)


def render_cost(days: list[Any], args: argparse.Namespace) -> str:
    rows = [
        [d.day, d.workload, d.runs, d.succeeded, _Right(money(d.cost_usd)),
         _Right(money(d.realtime_cost_usd)), _Right(money(d.saving_usd))]
        for d in days
    ]  # fmt: skip
    if days:
        rows.append(
            ["total", "", sum(d.runs for d in days), sum(d.succeeded for d in days),
             _Right(money(sum(d.cost_usd for d in days))),
             _Right(money(sum(d.realtime_cost_usd for d in days))),
             _Right(money(sum(d.saving_usd for d in days)))]
        )  # fmt: skip
    headers = ["day (UTC)", "workload", "runs", "succeeded", "cost", "real-time", "saving"]
    return "\n".join([f"Cost by day, last {args.days} day(s)", table(headers, rows)])


RENDERERS: dict[str, Callable[[Any, argparse.Namespace], str]] = {
    "status": render_status,
    "runs": render_runs,
    "ledger": render_ledger,
    "dead": render_dead,
    "requeue": render_requeue,
    "cost": render_cost,
}
