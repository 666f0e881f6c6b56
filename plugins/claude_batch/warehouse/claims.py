"""The ledger's moves outside a load: claim, submit, take back, release, requeue.

Each move is one conditional statement keyed on the item's current status (and, for a run's own
moves, its ``run_id``), which is what makes a repeated task a no-op; the table of moves is in
docs/architecture.md (*Ledger states*), the status names in :mod:`claude_batch.warehouse.ledger`.
A claim takes an item only when it is new, already this run's and still open, or free and last
handled by another run (or by none): two live runs never hold, and never pay for, the same item.
Keys are joined as a relation (a 100,000-key shard is never probed row by row).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa

from claude_batch.staging import Manifest, iter_rejections, read_shard_keys
from claude_batch.storage import RunLayout
from claude_batch.warehouse.dbapi import Cursor
from claude_batch.warehouse.ledger import (
    DEAD,
    DUE_STATUSES,
    OPEN_STATUSES,
    PENDING,
    REQUEUEABLE_STATUSES,
    RETRY,
    SUBMITTED,
    sql_in,
    sql_literal,
)
from claude_batch.warehouse.tables import _STAGED_COLUMNS, WarehouseTables, _schema
from claude_batch.warehouse.types import ClaimResult, Holder, utcnow
from claude_batch.workloads import Workload

# A claim of this many rows or more refreshes the ledger's planner statistics (PostgreSQL).
STATISTICS_REFRESH_ROWS = 1_000
# Rejected rows recorded per statement.
_REJECTED_CHUNK_ROWS = 10_000
_OPEN, _DUE = sql_in(OPEN_STATUSES), sql_in(DUE_STATUSES)
_PENDING, _SUBMITTED, _DEAD, _RETRY = (sql_literal(s) for s in (PENDING, SUBMITTED, DEAD, RETRY))


class ClaimsMixin(WarehouseTables):
    """The ledger moves of :class:`~claude_batch.warehouse.Warehouse` that are not a load."""

    def claim_staged(self, workload: Workload, layout: RunLayout, manifest: Manifest) -> ClaimResult:
        """Claim the run's staged items (``pending``) and record its rejected rows (``dead``), atomically.

        One transaction, one conditional upsert per shard: an item is taken only when it is new,
        already this run's and still open (``pending``/``submitted``: a retried gate), or free
        (``retry``/``invalid``) and last handled by another run (or by none: released). A
        rejected row seen again (a row without a usable key matches no ledger key, so every run
        of its interval extracts it) is recorded ``dead`` again for this run. An item another run
        holds open, or one that is final, is left as it is, so two live runs never hold, and never
        pay for, the same item; on PostgreSQL the upsert's row locks make concurrent claims wait
        for each other and re-check the condition. Attempt counts of items seen before are kept.

        :param workload: the workload staged.
        :param layout: the run's S3 layout.
        :param manifest: the staging manifest.
        :returns: what was claimed, and for each shard the keys that were not, with their holders.
        """
        result = ClaimResult(manifest.run_id)
        with self.dialect.transaction(self.conn) as cursor:
            for shard in manifest.shards:
                keys = read_shard_keys(layout, shard)
                size = keys.num_rows
                staged = pa.table(
                    {
                        "record_key": keys.column("record_key"),
                        "custom_id": keys.column("custom_id"),
                        "status": pa.array([PENDING] * size, pa.string()),
                        "last_error": pa.nulls(size, pa.string()),
                    }
                )
                claimed = self._claim(cursor, workload, layout, staged, shard.part, result)
                result.claimed += claimed
            rejected: list[dict[str, Any]] = []
            for rejection in iter_rejections(layout, manifest):
                rejected.append(
                    {
                        "record_key": rejection["ledger_key"],
                        "custom_id": None,
                        "status": DEAD,
                        "last_error": rejection["reason"],
                    }
                )
                if len(rejected) >= _REJECTED_CHUNK_ROWS:
                    table = pa.Table.from_pylist(rejected, _schema(_STAGED_COLUMNS))
                    result.rejected += self._claim(cursor, workload, layout, table, None, result)
                    rejected.clear()
            if rejected:
                table = pa.Table.from_pylist(rejected, _schema(_STAGED_COLUMNS))
                result.rejected += self._claim(cursor, workload, layout, table, None, result)
        if result.claimed + result.rejected >= STATISTICS_REFRESH_ROWS:
            self.dialect.refresh_statistics(self.conn, self._q(self.ledger_table))
        return result

    def _claim(
        self,
        cursor: Cursor,
        workload: Workload,
        layout: RunLayout,
        rows: pa.Table,
        part: int | None,
        result: ClaimResult,
    ) -> int:
        """Upsert ``rows`` where the item may be taken; note the rest in ``result``. Returns rows taken."""
        run_id = layout.run_id
        d = self.dialect
        p = d.placeholder
        ledger = self._q(self.ledger_table)
        now = utcnow()
        with d.rows_relation(cursor, "cb_staged", rows) as staged:
            taken = d.execute(
                cursor,
                f"""INSERT INTO {ledger} AS l (workload, record_key, prompt_version, custom_id, status,
                    attempts, invalid_answers, last_error, batch_id, run_id, updated_at, claimed_at, dag_id)
                SELECT {p}, s.record_key, {p}, s.custom_id, s.status, 0, 0, s.last_error, NULL,
                    {p}, {p}, {p}, {p}
                FROM {staged} s
                ON CONFLICT (workload, record_key, prompt_version) DO UPDATE SET
                    custom_id = excluded.custom_id,
                    status = CASE WHEN l.status = {_SUBMITTED} AND l.run_id = excluded.run_id
                        THEN l.status ELSE excluded.status END,
                    last_error = excluded.last_error, run_id = excluded.run_id,
                    updated_at = excluded.updated_at, dag_id = excluded.dag_id,
                    claimed_at = CASE WHEN l.run_id = excluded.run_id AND l.claimed_at IS NOT NULL
                        THEN l.claimed_at ELSE excluded.claimed_at END
                WHERE (l.status IN {_OPEN} AND l.run_id = excluded.run_id)
                    OR (l.status IN {_DUE} AND l.run_id IS DISTINCT FROM excluded.run_id)
                    OR (l.status = {_DEAD} AND excluded.status = {_DEAD})""",
                [workload.name, workload.prompt_version, run_id, now, now, layout.dag_id],
            )
            if taken >= 0 and taken == rows.num_rows:
                return taken
            # Some were not taken: which, and who holds them (few, in the race this guards against).
            mine = (
                f"l.run_id = {p} AND (l.status = s.status "
                f"OR (s.status = {_PENDING} AND l.status = {_SUBMITTED}))"
            )
            left = d.query(
                cursor,
                f"""SELECT s.record_key, l.run_id, l.status FROM {staged} s JOIN {ledger} l
                ON l.workload = {p} AND l.prompt_version = {p} AND l.record_key = s.record_key
                WHERE NOT ({mine})""",
                [workload.name, workload.prompt_version, run_id],
            )
        for key, holder, status in left:
            result.not_claimed.setdefault(part, set()).add(key)
            label = holder if status in OPEN_STATUSES else f"{status} (done)"
            result.holders[label] = result.holders.get(label, 0) + 1
        return rows.num_rows - len(left)

    def take_back_retries(self, workload: Workload, run_id: str) -> int:
        """This run's ``retry`` items become its ``pending`` items again, for its next round.

        One conditional UPDATE: an item another run claimed meanwhile is not this run's any more.
        Attempt counts are kept (the load counts each answer), so an item goes round at most
        until the attempt limit makes it ``dead``.
        """
        d = self.dialect
        p = d.placeholder
        with d.transaction(self.conn) as cursor:
            return max(
                d.execute(
                    cursor,
                    f"""UPDATE {self._q(self.ledger_table)} SET status = {_PENDING}, updated_at = {p}
                    WHERE workload = {p} AND prompt_version = {p} AND run_id = {p} AND status = {_RETRY}""",
                    [utcnow(), workload.name, workload.prompt_version, run_id],
                ),
                0,
            )

    def release_claim(
        self,
        workload: Workload,
        run_id: str,
        reason: str,
        *,
        layout: RunLayout | None = None,
        parts: Sequence[Any] | None = None,
    ) -> int:
        """Give back the run's items not yet in a batch (a pilot that failed, a run that is over).

        They become ``retry`` held by no run, so the next run of any kind claims them; their
        attempt counts are kept. Items already ``submitted`` stay: their batch will answer.

        :param layout: with ``parts``, release only the items of those shards of the run.
        :param parts: the shards (``ShardManifest``) whose items to release (default: all).
        :returns: the number of items released.
        """
        d = self.dialect
        p = d.placeholder
        update = f"""UPDATE {self._q(self.ledger_table)} SET status = {_RETRY}, run_id = NULL,
                last_error = {p}, updated_at = {p}
            WHERE workload = {p} AND prompt_version = {p} AND run_id = {p} AND status = {_PENDING}"""
        params = [reason[:500], utcnow(), workload.name, workload.prompt_version, run_id]
        if parts is None:
            with d.transaction(self.conn) as cursor:
                return d.execute(cursor, update, params)
        if layout is None:
            raise ValueError("release_claim needs the run's layout to release by shard")
        released = 0
        with d.transaction(self.conn) as cursor:
            for shard in parts:
                keys = read_shard_keys(layout, shard).select(["record_key"])
                with d.rows_relation(cursor, "cb_release", keys, joined=True) as relation:
                    released += max(
                        d.execute(
                            cursor, f"{update} AND record_key IN (SELECT record_key FROM {relation})", params
                        ),
                        0,
                    )
        return released

    def open_holders(self, workload: Workload) -> list[Holder]:
        """Runs holding open items (``pending``/``submitted``) of the workload's prompt version."""
        p = self.dialect.placeholder
        rows = self._fetchall(
            f"""SELECT dag_id, run_id, SUM(CASE WHEN status = {_PENDING} THEN 1 ELSE 0 END),
                SUM(CASE WHEN status = {_SUBMITTED} THEN 1 ELSE 0 END), MIN(claimed_at)
            FROM {self._q(self.ledger_table)}
            WHERE workload = {p} AND prompt_version = {p} AND status IN {_OPEN}
                AND run_id IS NOT NULL
            GROUP BY dag_id, run_id ORDER BY MIN(claimed_at)""",
            [workload.name, workload.prompt_version],
        )
        return [
            Holder(dag_id, run_id, int(pending or 0), int(submitted or 0), since)
            for dag_id, run_id, pending, submitted, since in rows
        ]

    def mark_submitted(
        self, workload: Workload, layout: RunLayout, manifest: Manifest, part: int, batch_id: str
    ) -> None:
        """Record that shard ``part`` went out as ``batch_id`` (its items become ``submitted``).

        :param part: the shard's part number.
        :param batch_id: the batch the shard became.
        """
        d = self.dialect
        p = d.placeholder
        keys = read_shard_keys(layout, manifest.shard(part)).select(["record_key"])
        # Joined: a 100,000-key shard must not be probed row by row.
        with (
            d.transaction(self.conn) as cursor,
            d.rows_relation(cursor, "cb_keys", keys, joined=True) as relation,
        ):
            d.execute(
                cursor,
                f"""UPDATE {self._q(self.ledger_table)} SET status = {_SUBMITTED}, batch_id = {p},
                    updated_at = {p}
                WHERE workload = {p} AND prompt_version = {p} AND run_id = {p} AND status = {_PENDING}
                AND record_key IN (SELECT record_key FROM {relation})""",
                [batch_id, utcnow(), workload.name, workload.prompt_version, manifest.run_id],
            )

    def requeue(self, workload: Workload, record_keys: Iterable[str], *, by: str | None = None) -> int:
        """Put dead or invalid items back to ``retry`` with fresh attempts (after fixing their cause).

        The next run of the workload extracts them whatever its interval (as every ``retry`` item)
        and its gate claims them. Only items that are ``dead`` or ``invalid`` move, in one
        conditional UPDATE: an item a run holds open (``pending``/``submitted``) or that is done
        is left alone. The item keeps its last run (``run_id``) and its ``last_error`` (why it
        was dead); ``requeued_by`` and ``requeued_at`` say who asked, and when.

        :param workload: the workload (only its ``name`` and ``prompt_version`` are read).
        :param record_keys: the items' record keys.
        :param by: who asked (recorded in ``requeued_by``).
        :returns: the number of items requeued.
        """
        keys = pa.table({"record_key": pa.array(sorted(set(record_keys)), pa.string())})
        if keys.num_rows == 0:
            return 0
        d = self.dialect
        p = d.placeholder
        ledger = self._q(self.ledger_table)
        now = utcnow()
        params = [now, (by or "")[:200] or None, now, workload.name, workload.prompt_version]
        with (
            d.transaction(self.conn) as cursor,
            d.rows_relation(cursor, "cb_requeue", keys, joined=True) as relation,
        ):
            changed = d.execute(
                cursor,
                f"""UPDATE {ledger} SET status = {_RETRY}, attempts = 0, invalid_answers = 0,
                    updated_at = {p}, requeued_by = {p}, requeued_at = {p}
                WHERE workload = {p} AND prompt_version = {p} AND status IN {sql_in(REQUEUEABLE_STATUSES)}
                AND record_key IN (SELECT record_key FROM {relation})""",
                params,
            )
            if changed < 0:  # a driver that does not count: the rows this statement stamped
                changed = int(
                    d.query(
                        cursor,
                        f"""SELECT COUNT(*) FROM {ledger} WHERE requeued_at = {p} AND workload = {p}
                        AND prompt_version = {p} AND record_key IN (SELECT record_key FROM {relation})""",
                        [now, workload.name, workload.prompt_version],
                    )[0][0]
                )
        return changed
