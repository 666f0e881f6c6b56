"""Dead and invalid items, and requeueing them: the one write an operator makes.

:meth:`ItemQueries.requeue` adds the ledger's newer columns first (``Warehouse.ensure_tables``),
then calls :meth:`Warehouse.requeue`, whose conditional UPDATE moves only ``dead``/``invalid``
items, so an item a live run holds open is never touched (docs/concurrency.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from claude_batch.ops.queries import WarehouseQueries, _chunks, _like_pattern
from claude_batch.ops.results import (
    MAX_LISTED_KEYS,
    REQUEUEABLE,
    DeadItem,
    DeadItems,
    OpsError,
    ReasonCount,
    RequeueResult,
    SkippedKey,
    WorkloadRef,
)


class ItemQueries(WarehouseQueries):
    """Dead/invalid items with their reasons, and putting them back to ``retry``."""

    # -- dead and invalid items ----------------------------------------------------------------

    def dead_items(
        self,
        workload: str | None = None,
        *,
        prompt_version: str | None = None,
        search: str | None = None,
        statuses: Sequence[str] = REQUEUEABLE,
        limit: int = 50,
        offset: int = 0,
    ) -> DeadItems:
        """Dead and invalid items with their reasons, newest first.

        :param workload: one workload (default: all), at its current prompt version unless
            ``prompt_version`` (a unique prefix will do) says otherwise.
        :param search: text found (case-insensitive) in the reason or the record key.
        :param statuses: ``dead``, ``invalid`` or both.
        """
        self._require_ledger()
        bad = [s for s in statuses if s not in REQUEUEABLE]
        if bad or not statuses:
            raise OpsError(f"statuses must be among {', '.join(REQUEUEABLE)}, not {', '.join(bad) or 'none'}")
        if prompt_version is not None and workload is None:
            raise OpsError("a prompt version needs its workload (--workload)")
        scopes = [(name, self.resolve_prompt_version(name, prompt_version)) for name in self._scope(workload)
                  if self.prompt_versions(name)]  # fmt: skip
        limit = max(1, min(int(limit), 10_000))
        offset = max(0, int(offset))
        p = self._p
        if not scopes:
            return DeadItems(workload, [], search, 0, [], [])
        scope_sql = " OR ".join([f"(workload = {p} AND prompt_version = {p})"] * len(scopes))
        params: list[Any] = [value for scope in scopes for value in scope]
        where = f"({scope_sql}) AND status IN ({', '.join([p] * len(statuses))})"
        params += list(statuses)
        if search:
            pattern = _like_pattern(search)
            where += (
                f" AND (LOWER(COALESCE(last_error, '')) LIKE {p} ESCAPE '!'"
                f" OR LOWER(record_key) LIKE {p} ESCAPE '!')"
            )
            params += [pattern, pattern]
        total = int(self._rows(f"SELECT COUNT(*) FROM {self._ledger} WHERE {where}", params)[0][0])
        rows = self._rows(
            f"""SELECT workload, prompt_version, record_key, status, last_error, attempts, invalid_answers,
                batch_id, run_id, dag_id, custom_id, updated_at
            FROM {self._ledger} WHERE {where}
            ORDER BY updated_at DESC, workload, record_key LIMIT {limit} OFFSET {offset}""",
            params,
        )
        items = [
            DeadItem(name, version, key, status, reason, int(attempts or 0), int(invalid or 0), batch_id,
                     run_id, dag_id, custom_id is None, updated)
            for name, version, key, status, reason, attempts, invalid, batch_id, run_id, dag_id, custom_id,
            updated in rows
        ]  # fmt: skip
        reasons = [
            ReasonCount(status, reason, int(count))
            for status, reason, count in self._rows(
                f"""SELECT status, last_error, COUNT(*) FROM {self._ledger} WHERE {where}
                GROUP BY status, last_error ORDER BY COUNT(*) DESC, status, last_error LIMIT 50""",
                params,
            )
        ]
        return DeadItems(workload, sorted({v for _, v in scopes}), search, total, items, reasons)

    # -- requeue -------------------------------------------------------------------------------

    def requeue(
        self,
        workload: str,
        *,
        keys: Iterable[str] | None = None,
        reason: str | None = None,
        all_dead: bool = False,
        prompt_version: str | None = None,
        by: str | None = None,
        dry_run: bool = False,
    ) -> RequeueResult:
        """Put dead (or invalid) items back to ``retry``, so the workload's next run sends them again.

        Exactly one selection: ``keys`` (each must be ``dead`` or ``invalid``; the others are
        reported in ``skipped`` with why), ``reason`` (every dead or invalid item whose reason
        contains the text, case-insensitive) or ``all_dead`` (every ``dead`` item). Only the
        workload's current prompt version unless ``prompt_version`` names another (the DAG's
        next run sends only its current one).

        The next run extracts the items whatever its data interval and claims them at its gate;
        each gets fresh attempts. A rejected row (never sent) comes back once its source row
        is fixed; a row without a usable key matches no source row and stays ``retry`` until
        its interval is run again. ``requeued_by``/``requeued_at`` in the ledger say who and when.
        """
        self._require_ledger()
        self.check_workload(workload)
        chosen = [keys is not None, bool(reason), all_dead]
        if sum(chosen) != 1:
            raise OpsError("requeue needs exactly one of: keys, a reason, or all dead items")
        version = self.resolve_prompt_version(workload, prompt_version)
        p = self._p
        skipped: list[SkippedKey] = []
        scope = [workload, version]
        if keys is not None:
            wanted = sorted({str(key) for key in keys})
            if not wanted:
                raise OpsError("no keys given")
            found: dict[str, tuple[str, str | None]] = {}
            for chunk in _chunks(wanted, 500):
                for key, status, run_id in self._rows(
                    f"""SELECT record_key, status, run_id FROM {self._ledger} WHERE workload = {p}
                    AND prompt_version = {p} AND record_key IN ({", ".join([p] * len(chunk))})""",
                    [*scope, *chunk],
                ):
                    found[key] = (status, run_id)
            selected = []
            for key in wanted:
                if key not in found:
                    skipped.append(
                        SkippedKey(key, None, None, f"no item with this key at prompt version {version}")
                    )
                    continue
                status, run_id = found[key]
                if status in REQUEUEABLE:
                    selected.append(key)
                elif status in ("pending", "submitted"):
                    skipped.append(
                        SkippedKey(key, status, run_id, f"held open by run {run_id} ({status}): left to it")
                    )
                elif status == "retry":
                    skipped.append(
                        SkippedKey(key, status, run_id, "already due for retry: the next run sends it")
                    )
                else:
                    skipped.append(SkippedKey(key, status, run_id, f"{status}: done, nothing to requeue"))
            selection = f"{len(wanted):,} key(s)"
        else:
            where = f"workload = {p} AND prompt_version = {p}"
            params: list[Any] = list(scope)
            if reason:
                where += (
                    " AND status IN ('dead', 'invalid')"
                    f" AND LOWER(COALESCE(last_error, '')) LIKE {p} ESCAPE '!'"
                )
                params.append(_like_pattern(reason))
                selection = f"reason contains {reason!r}"
            else:
                where += " AND status = 'dead'"
                selection = "all dead items"
            selected = [
                key for (key,) in self._rows(f"SELECT record_key FROM {self._ledger} WHERE {where}", params)
            ]
            selected.sort()
        at = self.now
        requeued = 0
        if selected and not dry_run:
            if "requeued_at" not in (self._table_columns(self.warehouse.ledger_table) or set()):
                # A ledger made before requeues gains requeued_by / requeued_at.
                self.warehouse.ensure_tables()
                self._columns.pop(self.warehouse.ledger_table, None)
            requeued = self.warehouse.requeue(WorkloadRef(workload, version), selected, by=by)  # type: ignore[arg-type]
        return RequeueResult(
            workload=workload,
            prompt_version=version,
            selection=selection,
            by=by,
            at=at,
            dry_run=dry_run,
            selected=len(selected),
            requeued=requeued,
            keys=selected[:MAX_LISTED_KEYS],
            skipped=skipped,
        )
