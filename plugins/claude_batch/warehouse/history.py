"""Run history: one line per (workload, run) with counts, tokens, costs and the caching decision.

:meth:`HistoryMixin.record_run` writes (or overwrites) a run's line after its load and
accounting check; :meth:`HistoryMixin.recent_cache_observations` reads the recent lines back as
the caching policy and the estimate use them. Each line is built as one map from column name to
value, so a column and its value can never drift apart. Caching settings that measure a cache
are ``5m`` and ``1h``; anything else counts as ``off``.
"""

from __future__ import annotations

from typing import Any

from claude_batch.costs import PriceTable, default_prices
from claude_batch.staging import Manifest
from claude_batch.warehouse.accounting import AccountingMixin
from claude_batch.warehouse.ledger import DEAD, INVALID, INVALID_ANSWER, RETRY, SUCCEEDED, VALID, sql_in
from claude_batch.warehouse.types import AccountingReport, LoadSummary, utcnow
from claude_batch.workloads import CacheObservation, Workload

# The caching settings under which a run reads and writes the prompt cache.
CACHING_SETTINGS = ("5m", "1h")
# What recent_cache_observations reads of each line, in order.
_OBSERVED_COLUMNS = (
    "measured", "cache_setting", "cache_probe_setting", "cache_read_input_tokens",
    "cache_creation_input_tokens", "answers", "succeeded", "invalid", "output_tokens", "prompt_version",
    "run_id", "cache_decision", "runs_ago",
)  # fmt: skip


def _money(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


class HistoryMixin(AccountingMixin):
    """The run-history steps of :class:`~claude_batch.warehouse.Warehouse`."""

    def record_run(
        self,
        workload: Workload,
        manifest: Manifest,
        load: LoadSummary,
        report: AccountingReport | None = None,
        prices: PriceTable | None = None,
    ) -> None:
        """Write (or overwrite) the run's line in the run history: counts, tokens, cost, caching.

        The costs use the report's definitions (:class:`claude_batch.costs.RunCosts`):
        ``realtime_cost_usd`` is the same tokens as plain real-time calls without caching,
        ``batch_uncached_cost_usd`` the same in batches without caching, ``batching_saving_usd`` and
        ``caching_saving_usd`` (negative when caching cost money) the two savings apart, beside the
        estimate and its band. Lines written before these definitions have no
        ``batch_uncached_cost_usd`` (their ``realtime_cost_usd`` was the cost at list prices). A
        multi-model run's reference costs apportion its tokens by the requests each model was sent
        (``cache_decision``'s ``costs_exact`` is false); the report reads them per model.
        The caching decision and its evidence go in ``cache_decision`` (JSON), the probe apart.
        """
        import orjson

        from claude_batch.costs import TokenTotals, apportion_tokens, run_costs

        report = report or self.accounting(workload, manifest)
        table = prices or default_prices()
        estimate = manifest.estimate or {}
        plan = estimate.get("cache_plan") or {}
        probe = plan.get("probe") or {}
        probing = bool(probe.get("requests")) and probe.get("setting") in CACHING_SETTINGS
        shares = {
            model: entry.get("requests", 0) for model, entry in (estimate.get("per_model") or {}).items()
        }
        by_model = apportion_tokens(
            TokenTotals(load.input_tokens, load.output_tokens, load.cache_creation_input_tokens,
                        load.cache_read_input_tokens),
            shares or dict.fromkeys(manifest.models or [workload.model], 1),
        )  # fmt: skip
        costs = run_costs(load.cost_usd, by_model, table, estimate, exact=len(by_model) <= 1)
        # The batches whose requests used the cache, each starting with a write (see claude_batch.caching).
        if probing:
            cached_batches = max(
                1, len(next((s.models for s in manifest.shards if s.part == probe.get("part")), {}))
            )
        elif manifest.cache_setting in CACHING_SETTINGS:
            cached_batches = sum(max(1, len(shard.models)) for shard in manifest.shards)
        else:
            cached_batches = 0
        decision = {**plan, "costs_exact": costs.exact, "estimate_method": estimate.get("method"),
                    "cached_batches": cached_batches}  # fmt: skip
        line: dict[str, Any] = {
            "workload": workload.name,
            "run_id": manifest.run_id,
            "prompt_version": workload.prompt_version,
            "cache_setting": manifest.cache_setting,
            "extracted": manifest.extracted_rows,
            "staged": manifest.staged_requests,
            "rejected": manifest.rejected_rows,
            "succeeded": report.by_status.get(SUCCEEDED, 0),
            "invalid": report.by_status.get(INVALID, 0),
            "retry": report.by_status.get(RETRY, 0),
            "dead": report.by_status.get(DEAD, 0),
            "input_tokens": load.input_tokens,
            "output_tokens": load.output_tokens,
            "cache_creation_input_tokens": load.cache_creation_input_tokens,
            "cache_read_input_tokens": load.cache_read_input_tokens,
            "cost_usd": round(load.cost_usd, 6),
            "realtime_cost_usd": _money(costs.realtime_uncached_usd),
            "recorded_at": utcnow(),
            "answers": load.by_status.get(VALID, 0) + load.by_status.get(INVALID_ANSWER, 0),
            "batch_uncached_cost_usd": _money(costs.batch_uncached_usd),
            "batching_saving_usd": _money(costs.saving_from_batching_usd),
            "caching_saving_usd": _money(costs.saving_from_caching_usd),
            "estimated_cost_usd": _money(costs.estimated_usd),
            "estimate_low_usd": _money(costs.estimate_low_usd),
            "estimate_high_usd": _money(costs.estimate_high_usd),
            "cache_policy": plan.get("policy") or workload.cache,
            "cache_probe_setting": probe.get("setting") if probing else None,
            "cache_probe_requests": int(probe.get("requests") or 0) if probing else 0,
            "cache_decision": orjson.dumps(decision).decode(),
        }
        names = ", ".join(line)
        # The key (workload, run_id) stays; every other column is overwritten by a re-run.
        updates = ", ".join(f"{n} = excluded.{n}" for n in list(line)[2:])
        with self.dialect.transaction(self.conn) as cursor:
            self.dialect.execute(
                cursor,
                f"""INSERT INTO {self._q(self.runs_table)} ({names}) VALUES ({self._p(len(line))})
                ON CONFLICT (workload, run_id) DO UPDATE SET {updates}""",
                list(line.values()),
            )

    def recent_cache_observations(self, workload: Workload, limit: int = 3) -> list[CacheObservation]:
        """The workload's recent runs as the caching policy and the estimate read them, latest first.

        For each setting a run measured (its own, or its probe's when it went with caching off and
        probed; ``off`` when it measured none) the ``limit`` latest such runs, however many runs of
        other settings came after them: a streak of runs without caching erases no evidence. The
        latest ``limit`` runs overall are always among them (for the output tokens per answer).
        ``runs_ago`` counts the workload's runs recorded since each.
        """
        import orjson

        p = self.dialect.placeholder
        caching = sql_in(CACHING_SETTINGS)
        measured = (
            f"CASE WHEN cache_setting IN {caching} THEN cache_setting "
            f"WHEN cache_probe_setting IN {caching} THEN cache_probe_setting ELSE 'off' END"
        )
        rows = self._fetchall(
            f"""SELECT {", ".join(_OBSERVED_COLUMNS)}
            FROM (
                SELECT m.*, ROW_NUMBER() OVER (ORDER BY recorded_at DESC, run_id DESC) - 1 AS runs_ago,
                    ROW_NUMBER() OVER (PARTITION BY measured ORDER BY recorded_at DESC, run_id DESC) AS nth
                FROM (SELECT r.*, {measured} AS measured FROM {self._q(self.runs_table)} r
                    WHERE workload = {p}) m
            ) t
            WHERE nth <= {int(limit)} ORDER BY runs_ago""",
            [workload.name],
        )
        observations = []
        for row in rows:
            line = dict(zip(_OBSERVED_COLUMNS, row, strict=True))
            decision = line["cache_decision"]
            try:
                plan = orjson.loads(decision) if decision else {}
            except orjson.JSONDecodeError:
                plan = {}
            plan = plan if isinstance(plan, dict) else {}
            prefix = plan.get("prefix_tokens")
            batches = plan.get("cached_batches")
            answers = line["answers"]
            run_setting, probe_setting = line["cache_setting"], line["cache_probe_setting"]
            observations.append(
                CacheObservation(
                    line["measured"],
                    int(line["cache_read_input_tokens"] or 0),
                    int(line["cache_creation_input_tokens"] or 0),
                    runs_ago=int(line["runs_ago"]),
                    probe=run_setting not in CACHING_SETTINGS and probe_setting in CACHING_SETTINGS,
                    prefix_tokens=int(prefix) if isinstance(prefix, int | float) and prefix > 0 else None,
                    answers=int(
                        answers if answers is not None else (line["succeeded"] or 0) + (line["invalid"] or 0)
                    ),
                    output_tokens=int(line["output_tokens"] or 0),
                    prompt_version=line["prompt_version"],
                    run_setting=run_setting,
                    run_id=line["run_id"],
                    batches=int(batches) if isinstance(batches, int) and batches > 0 else None,
                )
            )
        return observations
