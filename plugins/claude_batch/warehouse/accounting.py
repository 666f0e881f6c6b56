"""The accounting check: every item a run extracted ends in exactly one final ledger state.

``extracted = succeeded + invalid + retry + dead`` over the ledger rows whose ``run_id`` is the
run, with no item left ``pending`` or ``submitted``. Items the run left as ``retry`` or
``invalid`` that a later run has since claimed count as handed on, so re-checking an older run
still holds. A gap raises :class:`~claude_batch.warehouse.types.AccountingError` naming it
(docs/architecture.md, *The accounting check*).
"""

from __future__ import annotations

from claude_batch.staging import Manifest, read_shard_keys
from claude_batch.storage import RunLayout
from claude_batch.warehouse.ledger import LEDGER_STATUSES, OPEN_STATUSES, PENDING, SUBMITTED, sql_in
from claude_batch.warehouse.tables import WarehouseTables
from claude_batch.warehouse.types import AccountingError, AccountingReport
from claude_batch.workloads import Workload


class AccountingMixin(WarehouseTables):
    """The ledger's counts and the accounting check of :class:`~claude_batch.warehouse.Warehouse`."""

    def accounting(self, workload: Workload, manifest: Manifest) -> AccountingReport:
        """The ledger's counts for the run, by status."""
        p = self.dialect.placeholder
        rows = self._fetchall(
            f"""SELECT status, COUNT(*) FROM {self._q(self.ledger_table)}
            WHERE workload = {p} AND prompt_version = {p} AND run_id = {p} GROUP BY status""",
            [workload.name, workload.prompt_version, manifest.run_id],
        )
        return AccountingReport(
            manifest.run_id, manifest.extracted_rows, {status: int(n) for status, n in rows}
        )

    def check_accounting(
        self, workload: Workload, manifest: Manifest, *, sample: int = 20, layout: RunLayout | None = None
    ) -> AccountingReport:
        """Check ``extracted = succeeded + invalid + retry + dead`` for the run; raise naming the gap.

        Items this run left as ``retry`` or ``invalid`` that a later run has since claimed count
        as handed on (given ``layout``, the run's keys are looked up), so re-checking an older
        run after a later one retried its items still holds.

        :param workload: the workload.
        :param manifest: the run's staging manifest (``extracted_rows`` is the left side).
        :param sample: how many unaccounted keys the error names.
        :param layout: the run's layout, to find items handed on to later runs.
        """
        report = self.accounting(workload, manifest)
        open_items = report.by_status.get(PENDING, 0) + report.by_status.get(SUBMITTED, 0)
        total = sum(report.by_status.values())
        if report.accounted == report.extracted and open_items == 0 and total == report.extracted:
            return report
        if layout is not None and open_items == 0 and total < report.extracted:
            handed_on = self._handed_on(workload, layout, manifest)
            if total + handed_on == report.extracted:
                return AccountingReport(report.run_id, report.extracted, report.by_status, handed_on)
        p = self.dialect.placeholder
        keys = self._fetchall(
            f"""SELECT record_key, status, batch_id FROM {self._q(self.ledger_table)}
            WHERE workload = {p} AND prompt_version = {p} AND run_id = {p}
            AND status IN {sql_in(OPEN_STATUSES)}
            ORDER BY record_key LIMIT {int(sample)}""",
            [workload.name, workload.prompt_version, manifest.run_id],
        )
        named = ", ".join(
            f"{key} ({status}{', batch ' + batch if batch else ''})" for key, status, batch in keys
        )
        counts = ", ".join(f"{s}={report.by_status.get(s, 0)}" for s in LEDGER_STATUSES)
        gap = report.extracted - report.accounted
        message = (
            f"accounting failed for {workload.name} run {manifest.run_id!r}: extracted {report.extracted} "
            f"but succeeded + invalid + retry + dead = {report.accounted} (gap {gap}; ledger: {counts})"
        )
        if open_items:
            message += f"; {open_items} items never got an outcome, e.g. {named}"
        if total != report.extracted:
            message += f"; the ledger holds {total} items for this run, not {report.extracted}"
        raise AccountingError(message)

    def _handed_on(self, workload: Workload, layout: RunLayout, manifest: Manifest) -> int:
        """How many of the run's staged items another run holds now (claimed after this run left them)."""
        d = self.dialect
        p = d.placeholder
        handed_on = 0
        with d.transaction(self.conn) as cursor:
            for shard in manifest.shards:
                keys = read_shard_keys(layout, shard).select(["record_key"])
                with d.rows_relation(cursor, "cb_run_keys", keys, joined=True) as relation:
                    handed_on += int(
                        d.query(
                            cursor,
                            f"""SELECT COUNT(*) FROM {relation} k JOIN {self._q(self.ledger_table)} l
                            ON l.workload = {p} AND l.prompt_version = {p} AND l.record_key = k.record_key
                            WHERE l.run_id IS DISTINCT FROM {p}""",
                            [workload.name, workload.prompt_version, manifest.run_id],
                        )[0][0]
                    )
        return handed_on

    def ledger_counts(self, workload: Workload) -> dict[str, int]:
        """Items of the workload's current prompt version, by status."""
        p = self.dialect.placeholder
        rows = self._fetchall(
            f"""SELECT status, COUNT(*) FROM {self._q(self.ledger_table)}
            WHERE workload = {p} AND prompt_version = {p} GROUP BY status""",
            [workload.name, workload.prompt_version],
        )
        return {status: int(n) for status, n in rows}
