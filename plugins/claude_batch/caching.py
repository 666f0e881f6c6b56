"""The caching policy: which prompt-cache setting a run uses, decided from what earlier runs measured.

A cached prefix token costs ``h * read + (1 - h) * write`` times the plain input price at hit
rate ``h`` (batch prices: reads 0.1x, writes 1.25x for the 5-minute cache and 2x for the 1-hour
one), so the 5-minute cache pays above a hit rate of about 22% and the 1-hour cache above about
53%. Batch hit rates are best effort and differ by setting (a long batch may lose 5-minute
entries), so they are measured per setting, never assumed.

``auto`` is never dearer than caching off, by construction:

- It uses a cached setting only when that setting's measured hit rate, one standard error under
  the measurement (the Wilson interval's low end), still makes a cached prefix token cheaper
  than a plain one, and only on evidence measured within the last :data:`REMEASURE_AFTER_RUNS`
  runs. Near the break-even rate a wrong pick costs little (a few percent of the prefix's price,
  for one run: that run measures the setting over all its requests); far from it the pick is sure.
- Otherwise the run goes with caching off. A setting never measured, measured too long ago, or
  measured inconclusively, is *probed*: a few requests of the run (its last ones) go in a shard
  of their own with that setting, in a batch of their own. The probe is sized so that even if
  every one of its requests were a cache write it would cost at most :data:`DEFAULT_PROBE_SHARE`
  (1%) of the run's cost with caching off (``CLAUDE_BATCH_CACHE_PROBE_SHARE``; 0 turns probes
  off), and at most :data:`MAX_PROBE_REQUESTS` requests. The next run decides on what it measured.
- Evidence is kept per setting: the last :data:`EVIDENCE_RUNS` runs that measured each setting,
  however many runs without caching came after them, so a streak of ``off`` runs erases nothing.
- A probe that showed a setting does not pay (conclusively) is not repeated until that evidence
  is :data:`REMEASURE_AFTER_RUNS` runs old; an inconclusive one at most :data:`EVIDENCE_RUNS` times.

The decision, the evidence and the numbers it rests on go into the manifest's estimate
(``cache_plan``), the stage task's log and the run's line in the run history. The probe's
requests are cut into their own shard by :func:`claude_batch.cache_probe.split_probe`
(importable from here too).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from claude_batch.cache_probe import split_probe as split_probe  # re-exported: the old import path
from claude_batch.costs import (
    CacheSetting,
    PriceTable,
    cache_break_even_hit_rate,
    default_prices,
    prefix_cost_factor,
)

if TYPE_CHECKING:
    from claude_batch.workloads import CacheObservation, Workload

CACHED_SETTINGS: tuple[CacheSetting, ...] = ("5m", "1h")  # probed in this order: 5m writes cost less
EVIDENCE_RUNS = 3  # runs pooled per setting
REMEASURE_AFTER_RUNS = 20  # evidence this many runs old is measured again before it is used
DECISION_Z = 1.0  # one standard error: a setting is used only if it pays at the low end
ESTIMATE_Z = 1.96  # the estimate's band: two-sided 95%
HIT_RATE_DRIFT = 0.02  # the estimate's band is at least this wide each side (hit rates move run to run)
PROBE_SHARE_ENV = "CLAUDE_BATCH_CACHE_PROBE_SHARE"
DEFAULT_PROBE_SHARE = 0.01
MAX_PROBE_REQUESTS = 200
MIN_PROBE_REQUESTS = 10

Conclusion = Literal["pays", "does not pay", "inconclusive"]


def probe_share() -> float:
    """The most a probe may add to a run, as a share of its cost with caching off."""
    try:
        value = float(os.environ.get(PROBE_SHARE_ENV, DEFAULT_PROBE_SHARE))
    except ValueError:
        return DEFAULT_PROBE_SHARE
    return min(max(value, 0.0), 0.1)


def wilson_interval(hits: float, trials: float, z: float) -> tuple[float, float]:
    """The Wilson score interval of a proportion (``hits`` of ``trials``; fractional trials are fine)."""
    if trials <= 0:
        return 0.0, 1.0
    p = min(max(hits / trials, 0.0), 1.0)
    z2 = z * z
    denominator = 1.0 + z2 / trials
    centre = (p + z2 / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Evidence:
    """What recent runs measured for one cache setting, pooled.

    A batch's first request for a prefix can only write it (nothing is cached yet), so each
    batch's first request is not counted as a trial: the hit rate is the share of reads among a
    batch's *other* requests, which is what a run of any size can expect for them.

    :param requests: cached requests measured (cache tokens / prefix tokens per request).
    :param batches: the batches they were in (one forced write each).
    :param runs_ago: runs of the workload recorded since the most recent measurement (0: the last run).
    :param probes: how many of the pooled runs measured it with a probe only.
    """

    setting: CacheSetting
    runs: int
    read_tokens: int
    write_tokens: int
    requests: float
    runs_ago: int
    probes: int = 0
    batches: int = 0
    reads: float = 0.0  # cached requests that read

    @property
    def trials(self) -> float:
        return max(self.requests - self.batches, self.reads, 0.0)

    @property
    def hit_rate(self) -> float:
        return min(self.reads / self.trials, 1.0) if self.trials > 0 else 0.0

    def interval(self, z: float) -> tuple[float, float]:
        return wilson_interval(self.reads, self.trials, z)

    @property
    def stale(self) -> bool:
        return self.runs_ago >= REMEASURE_AFTER_RUNS

    def to_dict(self) -> dict[str, Any]:
        low, high = self.interval(DECISION_Z)
        return {
            "runs": self.runs,
            "probes": self.probes,
            "requests": round(self.requests),
            "batches": self.batches,
            "read_tokens": self.read_tokens,
            "write_tokens": self.write_tokens,
            "hit_rate": round(self.hit_rate, 4),
            "hit_rate_low": round(low, 4),
            "hit_rate_high": round(high, 4),
            "runs_ago": self.runs_ago,
        }


def gather_evidence(
    observations: Iterable[CacheObservation], prefix_tokens: int, runs: int = EVIDENCE_RUNS
) -> dict[CacheSetting, Evidence]:
    """Each cached setting's evidence: its ``runs`` most recent measurements, pooled.

    :param observations: the workload's recent runs (``Warehouse.recent_cache_observations``);
        ``off`` runs and runs that measured nothing are skipped.
    :param prefix_tokens: the cached prefix's tokens per request, for runs that did not record theirs.
    """
    pooled: dict[CacheSetting, list[CacheObservation]] = {}
    for observation in sorted(observations, key=lambda o: o.runs_ago):
        if observation.setting not in CACHED_SETTINGS:
            continue
        if observation.cache_read_tokens + observation.cache_write_tokens <= 0:
            continue
        chosen = pooled.setdefault(observation.setting, [])
        if len(chosen) < runs:
            chosen.append(observation)
    evidence: dict[CacheSetting, Evidence] = {}
    for setting, chosen in pooled.items():
        per_request = [max(o.prefix_tokens or prefix_tokens, 1) for o in chosen]
        evidence[setting] = Evidence(
            setting,
            runs=len(chosen),
            read_tokens=sum(o.cache_read_tokens for o in chosen),
            write_tokens=sum(o.cache_write_tokens for o in chosen),
            requests=sum(
                (o.cache_read_tokens + o.cache_write_tokens) / size
                for o, size in zip(chosen, per_request, strict=True)
            ),
            runs_ago=chosen[0].runs_ago,
            probes=sum(1 for o in chosen if o.probe),
            batches=sum(o.batches or 1 for o in chosen),
            reads=sum(o.cache_read_tokens / size for o, size in zip(chosen, per_request, strict=True)),
        )
    return evidence


@dataclass(frozen=True)
class HitRate:
    """The hit rate an estimate prices a setting at, with its band and where it comes from."""

    point: float
    low: float
    high: float
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"point": round(self.point, 4), "low": round(self.low, 4), "high": round(self.high, 4),
                "source": self.source}  # fmt: skip


@dataclass
class CacheDecision:
    """The cache setting of a run, why, and (for ``auto`` with nothing conclusive) its probe.

    :param policy: the workload's policy (``off``, ``5m``, ``1h``, ``auto``).
    :param setting: what the run's requests use.
    :param factors: per measured setting, the price of a cached prefix token relative to plain
        input at the measured hit rate and one standard error either side, and the conclusion.
    :param probe_setting: the setting a few of the run's requests measure (None: no probe).
    :param probe_requests: how many (0 until sized, or when the run is too small for one).
    :param probe_max_extra_usd: what the probe costs at most beyond caching off (all writes).
    """

    policy: str
    setting: CacheSetting
    reason: str
    cacheable: bool = True
    evidence: dict[CacheSetting, Evidence] = field(default_factory=dict)
    factors: dict[str, dict[str, Any]] = field(default_factory=dict)
    probe_setting: CacheSetting | None = None
    probe_reason: str = ""
    probe_requests: int = 0
    probe_max_extra_usd: float = 0.0
    probe_share_of_run: float = 0.0
    prefix_tokens: int | None = None

    @property
    def probing(self) -> bool:
        return self.probe_setting is not None and self.probe_requests > 0

    def hit_rate(self, setting: CacheSetting) -> HitRate | None:
        """The hit rate to price ``setting`` at: measured, else the other setting's, else break-even.

        It is the rate of a batch's requests after its first (which writes); the estimate applies
        it to each batch's other requests.

        A measured rate has a 95% band at least :data:`HIT_RATE_DRIFT` wide each side. With only the
        other setting measured, 1h is priced at 5m's rate (1-hour entries outlive 5-minute ones) and
        5m at 1h's, the band reaching to all hits or no hits. Never measured: the break-even rate
        (the prefix priced as if uncached), band from no hits to all hits.
        """
        if setting == "off":
            return None
        measured = self.evidence.get(setting)
        if measured is not None and measured.requests > 0:
            low, high = measured.interval(ESTIMATE_Z)
            point = measured.hit_rate
            return HitRate(
                point,
                max(0.0, min(low, point - HIT_RATE_DRIFT)),
                min(1.0, max(high, point + HIT_RATE_DRIFT)),
                f"measured: {round(measured.requests):,} cached requests over {measured.runs} run(s)",
            )
        other = self.evidence.get("5m" if setting == "1h" else "1h")
        if other is not None and other.requests > 0:
            low, high = other.interval(ESTIMATE_Z)
            point = other.hit_rate
            if setting == "1h":
                return HitRate(
                    point, max(0.0, low - HIT_RATE_DRIFT), 1.0, f"not measured; {other.setting}'s rate"
                )
            return HitRate(
                point, 0.0, min(1.0, high + HIT_RATE_DRIFT), f"not measured; {other.setting}'s rate"
            )
        even = cache_break_even_hit_rate(setting)
        return HitRate(even, 0.0, 1.0, "not measured yet: priced at break-even (as if uncached)")

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "setting": self.setting,
            "reason": self.reason,
            "cacheable": self.cacheable,
            "evidence": {setting: evidence.to_dict() for setting, evidence in sorted(self.evidence.items())},
            "factors": self.factors,
            "probe": (
                {
                    "setting": self.probe_setting,
                    "reason": self.probe_reason,
                    "requests": self.probe_requests,
                    "max_extra_usd": round(self.probe_max_extra_usd, 6),
                    "max_share_of_run": round(self.probe_share_of_run, 4),
                }
                if self.probe_setting is not None
                else None
            ),
            "prefix_tokens": self.prefix_tokens,
        }

    def describe(self) -> str:
        """One log line: the setting, the probe and the evidence."""
        text = f"Caching ({self.policy}): {self.setting}, {self.reason}"
        if self.probe_setting is not None:
            if self.probe_requests:
                text += (
                    f"; probing {self.probe_setting} on {self.probe_requests:,} request(s) "
                    f"in a batch of their own ({self.probe_reason}), "
                    f"at most ${self.probe_max_extra_usd:.4f} more than caching off "
                    f"({self.probe_share_of_run:.1%} of the run)"
                )
            else:
                text += f"; no probe of {self.probe_setting} ({self.probe_reason})"
        measured = ", ".join(
            f"{s} {e.hit_rate:.1%} hits over {round(e.requests):,} requests in {e.batches} batch(es) "
            f"({e.runs} run(s), last {e.runs_ago} run(s) ago)"
            for s, e in sorted(self.evidence.items())
        )
        return text + f". Evidence: {measured or 'none yet'}."


def _factors(evidence: Evidence, prices: PriceTable) -> dict[str, Any]:
    low, high = evidence.interval(DECISION_Z)
    worst = prefix_cost_factor(evidence.setting, low, prices)
    best = prefix_cost_factor(evidence.setting, high, prices)
    if evidence.trials < MIN_PROBE_REQUESTS:
        conclusion: Conclusion = "inconclusive"  # too few requests to go on, whatever they showed
    else:
        conclusion = "pays" if worst < 1.0 else "does not pay" if best >= 1.0 else "inconclusive"
    return {
        "hit_rate": round(evidence.hit_rate, 4),
        "expected": round(prefix_cost_factor(evidence.setting, evidence.hit_rate, prices), 4),
        "at_low_hit_rate": round(worst, 4),
        "at_high_hit_rate": round(best, 4),
        "conclusion": conclusion,
        "stale": evidence.stale,
    }


def decide(
    workload: Workload, observations: Iterable[CacheObservation] = (), prices: PriceTable | None = None
) -> CacheDecision:
    """Resolve the workload's caching policy for a run (the probe is sized later: :func:`size_probe`).

    A prefix under the smallest minimum cacheable length of the workload's models is never cached.
    A fixed policy is used as it is (its evidence is still reported, for the estimate).
    """
    table = prices or default_prices()
    observations = list(observations)
    minimum = min(table.for_model(model).min_cacheable_tokens for model in workload.models)
    if workload.prefix_tokens < minimum:
        return CacheDecision(
            workload.cache,
            "off",
            f"the shared prefix (about {workload.prefix_tokens:,} tokens) is under the "
            f"models' minimum cacheable length ({minimum:,})",
            cacheable=False,
        )
    evidence = gather_evidence(observations, workload.prefix_tokens)
    factors: dict[str, dict[str, Any]] = {
        setting: _factors(found, table) for setting, found in evidence.items()
    }
    if workload.cache != "auto":
        return CacheDecision(
            workload.cache, workload.cache, "fixed by the workload", evidence=evidence, factors=factors
        )
    best: CacheSetting = "off"
    best_factor = 1.0
    for setting in CACHED_SETTINGS:
        numbers = factors.get(setting)
        if (
            numbers
            and numbers["conclusion"] == "pays"
            and not numbers["stale"]
            and numbers["at_low_hit_rate"] < best_factor
        ):
            best, best_factor = setting, numbers["at_low_hit_rate"]
    if best != "off":
        chosen = evidence[best]
        low, _ = chosen.interval(DECISION_Z)
        reason = (
            f"measured hit rate {chosen.hit_rate:.1%} (one standard error under it: {low:.1%}): "
            f"a cached prefix token costs {factors[best]['expected']:.3f}x plain input, "
            f"at most {best_factor:.3f}x"
        )
        return CacheDecision("auto", best, reason, evidence=evidence, factors=factors)
    decision = CacheDecision(
        "auto", "off", "no cache setting is measured to pay", evidence=evidence, factors=factors
    )
    for setting in CACHED_SETTINGS:
        found = evidence.get(setting)
        if found is None:
            decision.probe_setting, decision.probe_reason = setting, "never measured"
        elif found.stale:
            decision.probe_setting, decision.probe_reason = (
                setting,
                f"last measured {found.runs_ago} runs ago",
            )
        elif factors[setting]["conclusion"] == "inconclusive" and found.runs < EVIDENCE_RUNS:
            decision.probe_setting, decision.probe_reason = setting, "measured, not yet conclusively"
        else:
            continue
        break
    return decision


def size_probe(
    decision: CacheDecision,
    *,
    staged_requests: int,
    uncached_cost_usd: float,
    extra_per_request_usd: float,
    share: float | None = None,
) -> CacheDecision:
    """How many requests the decision's probe takes (in place; 0 when the run is too small).

    :param staged_requests: the run's requests.
    :param uncached_cost_usd: the run's estimated cost with caching off.
    :param extra_per_request_usd: what one probe request costs beyond caching off if it is a cache write.
    :param share: the probe's bound as a share of ``uncached_cost_usd`` (default :func:`probe_share`).
    """
    if decision.probe_setting is None:
        return decision
    share = probe_share() if share is None else share
    allowance = share * uncached_cost_usd
    fitting = int(allowance // extra_per_request_usd) if extra_per_request_usd > 0 else MAX_PROBE_REQUESTS
    requests = min(MAX_PROBE_REQUESTS, staged_requests // 4, fitting)
    if requests < MIN_PROBE_REQUESTS:
        decision.probe_requests = 0
        decision.probe_reason += (
            f"; the run is too small to probe within {share:.1%} of its cost"
            if share
            else "; probes are turned off"
        )
        return decision
    decision.probe_requests = requests
    decision.probe_max_extra_usd = requests * extra_per_request_usd
    decision.probe_share_of_run = (
        decision.probe_max_extra_usd / uncached_cost_usd if uncached_cost_usd else 0.0
    )
    return decision
