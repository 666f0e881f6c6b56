"""What an operator asks of a warehouse: status, runs, ledger counts, dead items, requeue, cost.

The query layer shared by the ``claude-batch`` CLI (``claude_batch.cli``) and the Airflow UI
page: plain Python over a :class:`~claude_batch.warehouse.Warehouse` (no Airflow import), typed
results (dataclasses; :func:`to_jsonable` turns any of them into JSON-ready data), every value a
bound parameter.

It reads the two tables the pipeline writes: the ledger (``claude_batch_ledger``, one row per
workload, record key and prompt version; see docs/layout.md) and the run history
(``claude_batch_runs``, one line per run, written by each round's load). Where the run history
says nothing, the ledger does: a run's DAG and its start (the gate's claim, ``claimed_at``), a
batch in flight (its items ``submitted``; its age from when the ``record`` task wrote its id).

Reads never change a table (no ``CREATE``/``ALTER``, which on PostgreSQL would wait behind a
running load); a warehouse no pipeline has run on says so. :meth:`Ops.requeue` is the one
write: it adds the ledger's newer columns first (``Warehouse.ensure_tables``), then calls
:meth:`Warehouse.requeue`, whose conditional UPDATE moves only ``dead``/``invalid`` items, so
an item a live run holds open is never touched (docs/concurrency.md).

Layout: ``results`` (the typed answers and errors), ``queries`` (the connection, workloads and
prompt versions), ``status`` (status, runs, cost), ``items`` (dead items and requeue); this
facade composes them into :class:`Ops` and re-exports every name.
"""

from __future__ import annotations

from claude_batch.ops.items import ItemQueries
from claude_batch.ops.queries import WarehouseQueries, to_jsonable
from claude_batch.ops.results import (
    BATCH_EXPIRY,
    MAX_LISTED_KEYS,
    REQUEUEABLE,
    BatchInFlight,
    DailyCost,
    DeadItem,
    DeadItems,
    HeldItems,
    LedgerCounts,
    NoLedger,
    OpsError,
    ReasonCount,
    RequeueResult,
    RunSummary,
    SkippedKey,
    Status,
    UnknownWorkload,
    WorkloadRef,
)
from claude_batch.ops.status import StatusQueries


class Ops(StatusQueries, ItemQueries):
    """The operator's questions, over one warehouse connection.

    :param warehouse: an open warehouse (its ledger and run-history table names are used).
    :param now: the clock (naive UTC, as the ledger stores it); for tests.
    """


__all__ = [
    "BATCH_EXPIRY",
    "MAX_LISTED_KEYS",
    "REQUEUEABLE",
    "BatchInFlight",
    "DailyCost",
    "DeadItem",
    "DeadItems",
    "HeldItems",
    "ItemQueries",
    "LedgerCounts",
    "NoLedger",
    "Ops",
    "OpsError",
    "ReasonCount",
    "RequeueResult",
    "RunSummary",
    "SkippedKey",
    "Status",
    "StatusQueries",
    "UnknownWorkload",
    "WarehouseQueries",
    "WorkloadRef",
    "to_jsonable",
]
