"""The pilot: a run's first requests sent alone, judged like the run, then a decision on the rest.

The gate splits the first ``pilot_size`` staged requests off into the pilot's own shards under
``<run>/pilot/`` (:class:`~claude_batch.storage.RunLayout` round 0); round 1's manifest keeps the
rest and still counts the pilot's items as extracted, so the run's accounting covers them. The
pilot then goes through the same steps as a round (pipeline tasks ``pilot_submit``,
``pilot_record``, ``pilot_wait`` deferred, ``pilot_collect`` with ``collect_results`` and
``validate_part``, ``pilot_load``): its answers are loaded and its items become final (or
``retry``), so the full run never sends or pays for them again. Then ``pilot_decide`` judges the
validated parquet (valid / judged): under the threshold the run stops and gives back its other
items; or, when the run asks for approval, ``pilot_approval.PilotApprovalOperator`` (Airflow's
human-in-the-loop ApprovalOperator) shows a person the pass rate, sample answers with their
verdicts and the full run's cost estimate, and the full run goes on only on approval.

Everything here is idempotent for its run: a gate that dies midway through the split finds the
pilot's manifest (written first) and finishes the split instead of taking a second pilot.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Generator, Iterable
from contextlib import ExitStack, closing
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, cast

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from claude_batch.staging import (
    SHARD_KEYS_SCHEMA,
    Manifest,
    ShardManifest,
    StagingError,
    StagingLimits,
    _rewrite_shard,  # the same rewrite restrict_to_claimed uses (a new name, never over the old)
    iter_shard_lines,
    read_manifest,
    read_shard_keys,
    shard_keys_path,
)
from claude_batch.storage import RunLayout
from claude_batch.validation import validated_path

PILOT_ROUND = 0
SAMPLE_ANSWERS = 5
_SAMPLE_CHARS = 240
_S3_BLOCK_SIZE = 8 * 1024 * 1024
_VALIDATED_COLUMNS = ["record_key", "batch_id", "status", "reason_code", "reason", "raw_text", "output_json",
                      "input_tokens", "output_tokens", "cost_usd"]  # fmt: skip


def pilot_layout(layout: RunLayout) -> RunLayout:
    """The run's pilot layout (``<run>/pilot/``)."""
    return layout.in_round(PILOT_ROUND)


def read_pilot(layout: RunLayout, prompt_version: str | None = None) -> Manifest | None:
    """The run's pilot manifest (None: no pilot, or one staged for another prompt version)."""
    pilot = read_manifest(pilot_layout(layout))
    if pilot is None or (prompt_version is not None and pilot.prompt_version != prompt_version):
        return None
    return pilot


def shard_paths(layout: RunLayout, manifest: Manifest) -> list[str]:
    """The manifest's request shard paths relative to the store root, in part order."""
    return [f"{layout.prefix}/{shard.requests}" for shard in manifest.shards]


# --- the split ------------------------------------------------------------------------------


def split_pilot(
    layout: RunLayout, manifest: Manifest, size: int, limits: StagingLimits
) -> tuple[Manifest, Manifest]:
    """Move the first ``size`` requests of round 1's ``manifest`` into the pilot's own shards.

    The pilot's shards and manifest are written first, then round 1's manifest without them
    (its ``extracted_rows`` unchanged: the run accounts for the pilot's items too). A gate that
    dies in between finds the pilot and finishes with :func:`exclude_pilot`.

    :param layout: round 1's layout.
    :param manifest: round 1's manifest, as claimed.
    :param size: how many requests the pilot takes (fewer than the manifest holds).
    :param limits: shard limits (a pilot larger than one shard's becomes several shards).
    :returns: (round 1's manifest without the pilot, the pilot's manifest).
    """
    if not 0 < size < manifest.staged_requests:
        raise ValueError(
            f"a pilot of {size} requests out of {manifest.staged_requests} leaves nothing to decide on"
        )
    at = pilot_layout(layout)
    writer = _PilotShards(at, limits)
    taken = 0
    try:
        for shard in manifest.shards:
            if taken >= size:
                break
            want = min(size - taken, shard.count)
            keys = read_shard_keys(layout, shard).slice(0, want)
            # The shard's first lines, in the order of its keys (the checksum covers the whole shard:
            # the rest is read, and checked, when round 1's shard is rewritten without them).
            # A generator (annotated as an Iterator): closing it closes the shard's file.
            shard_lines = cast(Generator[bytes, None, None], iter_shard_lines(layout, shard, verify=False))
            with closing(shard_lines) as lines:
                writer.add(itertools.islice(lines, want), keys)
            taken += want
    except BaseException:
        writer.abort()
        raise
    writer.close()
    pilot = replace(
        manifest,
        shards=writer.shards,
        models=sorted({model for shard in writer.shards for model in shard.models}),
        extracted_rows=taken,
        staged_requests=taken,
        rejected_rows=0,
        rejected_by_reason={},
        rejects=at.rejects[len(at.prefix) + 1 :],  # none: the run's rejected rows stay with round 1
        estimate=_scaled(manifest.estimate, taken / manifest.staged_requests),
        created_at=datetime.now(UTC).isoformat(),
    )
    at.store.write_json(at.manifest, pilot.to_dict())
    return exclude_pilot(layout, manifest, pilot), pilot


def exclude_pilot(layout: RunLayout, manifest: Manifest, pilot: Manifest) -> Manifest:
    """Round 1's manifest without the pilot's items (written when it changes; idempotent).

    Each shard holding pilot items is rewritten under a new name without them, as
    :func:`~claude_batch.staging.restrict_to_claimed` does; the manifest keeps its
    ``extracted_rows`` and scales its cost estimate to what is left.
    """
    at = pilot_layout(layout)
    if not pilot.shards:
        return manifest
    taken = pa.concat_tables([read_shard_keys(at, shard).select(["record_key"]) for shard in pilot.shards])
    value_set = taken.column("record_key").combine_chunks()
    shards: list[ShardManifest] = []
    changed = False
    for shard in manifest.shards:
        keys = read_shard_keys(layout, shard).column("record_key")
        held = pc.is_in(keys, value_set=value_set)
        drop = set(keys.filter(held).to_pylist())
        if not drop:
            shards.append(shard)
            continue
        changed = True
        if len(drop) < shard.count:
            rewritten = _rewrite_shard(layout, shard, drop)
            if rewritten is not None:
                shards.append(rewritten)
    if not changed:
        return manifest
    staged = sum(shard.count for shard in shards)
    rest = replace(
        manifest,
        shards=shards,
        models=sorted({model for shard in shards for model in shard.models}),
        staged_requests=staged,
        estimate=_scaled(
            manifest.estimate, staged / manifest.staged_requests if manifest.staged_requests else 0.0
        ),
    )
    layout.store.write_json(layout.manifest, rest.to_dict())
    return rest


def with_pilot(layout: RunLayout, manifest: Manifest) -> Manifest:
    """The run as a whole: round 1's ``manifest`` plus its pilot's shards, requests and estimate.

    For the run's accounting, history and report only (the pilot's shard paths are made relative
    to round 1's prefix, ``pilot/requests/...``; part numbers may repeat).
    """
    pilot = read_pilot(layout, manifest.prompt_version)
    if pilot is None or not pilot.shards:
        return manifest
    moved = [
        replace(shard, requests=f"pilot/{shard.requests}", keys=f"pilot/{shard.keys}")
        for shard in pilot.shards
    ]
    estimate = dict(manifest.estimate or {})
    for key, value in (pilot.estimate or {}).items():
        if isinstance(value, int | float) and not isinstance(value, bool) and key != "assumed_cache_hit_rate":
            estimate[key] = estimate.get(key, 0) + value
    return replace(
        manifest,
        shards=[*manifest.shards, *moved],
        models=sorted({*manifest.models, *pilot.models}),
        staged_requests=manifest.staged_requests + pilot.staged_requests,
        estimate=estimate,
    )


def _scaled(estimate: dict[str, Any] | None, scale: float) -> dict[str, Any]:
    """The cost estimate for a share of its requests (as restrict_to_claimed scales it)."""
    return {
        key: (
            value * scale
            if key.startswith(("cost_usd", "realtime_cost_usd")) and isinstance(value, int | float)
            else value
        )
        for key, value in (estimate or {}).items()
    }


class _PilotShards:
    """Writes the pilot's lines and keys into ``requests/part-NNNNN.jsonl`` shards within the limits."""

    def __init__(self, layout: RunLayout, limits: StagingLimits) -> None:
        self.layout = layout
        self.limits = limits
        self.shards: list[ShardManifest] = []
        self._stack: ExitStack | None = None
        self._handle: Any = None
        self._count = 0
        self._bytes = 0
        self._sha = hashlib.sha256()
        self._keys: list[pa.Table] = []

    def add(self, lines: Iterable[bytes], keys: pa.Table) -> None:
        start = 0
        for index, line in enumerate(lines):
            data = line + b"\n"
            if self._handle is not None and (
                self._count >= self.limits.max_requests_per_shard
                or self._bytes + len(data) > self.limits.max_shard_bytes
            ):
                self._keys.append(keys.slice(start, index - start))
                start = index
                self._finish_shard()
            if self._handle is None:
                self._open()
            self._handle.write(data)
            self._sha.update(data)
            self._count += 1
            self._bytes += len(data)
        self._keys.append(keys.slice(start))

    def _open(self) -> None:
        self._stack = ExitStack()
        part = len(self.shards)
        self._handle = self._stack.enter_context(
            self.layout.store.open(self.layout.requests(part), "wb", block_size=_S3_BLOCK_SIZE)
        )
        self._count = self._bytes = 0
        self._sha = hashlib.sha256()
        self._keys = []

    def _finish_shard(self) -> None:
        assert self._stack is not None
        self._stack.close()
        part = len(self.shards)
        keys = pa.concat_tables(self._keys).cast(SHARD_KEYS_SCHEMA)
        if keys.num_rows != self._count:
            raise StagingError(
                f"pilot shard {part}: {self._count} lines but {keys.num_rows} keys; "
                "its source shard is cut short"
            )
        with self.layout.store.open(shard_keys_path(self.layout, part), "wb") as handle:
            pq.write_table(keys, handle)
        models: dict[str, int] = {}
        for model in keys.column("model").to_pylist():
            models[model] = models.get(model, 0) + 1
        prefix = len(self.layout.prefix) + 1
        self.shards.append(
            ShardManifest(
                part=part,
                requests=self.layout.requests(part)[prefix:],
                keys=shard_keys_path(self.layout, part)[prefix:],
                count=self._count,
                bytes=self._bytes,
                sha256=self._sha.hexdigest(),
                models=dict(sorted(models.items())),
            )
        )
        self._stack = self._handle = None

    def close(self) -> None:
        if self._handle is not None:
            self._finish_shard()

    def abort(self) -> None:
        if self._stack is not None:
            self._stack.close()
        self._stack = self._handle = None


# --- the verdict ------------------------------------------------------------------------------


@dataclass
class PilotVerdict:
    """What the pilot's validated answers say: counts, failures by reason, a few samples, cost."""

    requests: int
    valid: int = 0
    judged: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    batch_ids: list[str] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    @property
    def pass_rate(self) -> float:
        return self.valid / self.judged if self.judged else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pass_rate": round(self.pass_rate, 6)}


def judge_pilot(layout: RunLayout, pilot: Manifest, samples: int = SAMPLE_ANSWERS) -> PilotVerdict:
    """Read the pilot's validated parts (what ``validate_part`` wrote, as for any round).

    Every validated row is judged (errored, expired and canceled requests count against the
    pass rate, as an invalid answer does); the samples mix failures and valid answers.

    :param layout: the pilot's layout.
    :param pilot: the pilot's manifest.
    :param samples: how many sample answers to keep (texts cut to a few hundred characters).
    """
    verdict = PilotVerdict(requests=pilot.staged_requests)
    failed: list[dict[str, Any]] = []
    passed: list[dict[str, Any]] = []
    batches: set[str] = set()
    for shard in pilot.shards:
        with layout.store.open(validated_path(layout, shard.part), "rb") as handle:
            table = pq.read_table(handle, columns=_VALIDATED_COLUMNS)
        verdict.judged += table.num_rows
        verdict.input_tokens += int(pc.sum(table.column("input_tokens")).as_py() or 0)
        verdict.output_tokens += int(pc.sum(table.column("output_tokens")).as_py() or 0)
        verdict.cost_usd += float(pc.sum(table.column("cost_usd")).as_py() or 0.0)
        batches.update(batch for batch in table.column("batch_id").to_pylist() if batch)
        for row in table.to_pylist():
            if row["status"] == "valid":
                verdict.valid += 1
                if len(passed) < samples:
                    passed.append(_sample(row))
            else:
                reason = row["reason_code"] or row["status"]
                verdict.failures[reason] = verdict.failures.get(reason, 0) + 1
                if len(failed) < samples:
                    failed.append(_sample(row))
    # Failures first (what a reviewer needs to see), then valid answers, up to ``samples``.
    first = failed[: max(samples - len(passed), (samples + 1) // 2)]
    verdict.samples = (first + passed)[:samples]
    verdict.batch_ids = sorted(batches)
    verdict.cost_usd = round(verdict.cost_usd, 6)
    return verdict


def _sample(row: dict[str, Any]) -> dict[str, Any]:
    text = row["output_json"] if row["status"] == "valid" else (row["raw_text"] or "")
    return {
        "record_key": row["record_key"],
        "status": row["status"],
        "reason_code": row["reason_code"],
        "reason": _cut(row["reason"] or "", _SAMPLE_CHARS),
        "text": _cut(text or "", _SAMPLE_CHARS),
    }


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def threshold_message(verdict: PilotVerdict, threshold: float) -> str:
    """Why a pilot under its threshold stops the run."""
    return (
        f"The pilot's validation pass rate is {verdict.pass_rate:.0%} ({verdict.valid} of {verdict.judged}), "
        f"under the threshold {threshold:.0%}; nothing else was submitted. Failures: {verdict.failures}"
    )


# --- the approval -------------------------------------------------------------------------------


def _inline(text: str) -> str:
    """Text as one Markdown code span: no markup, links or HTML of a model's answer take effect."""
    flat = " ".join(str(text).split()).replace("`", "'")
    return f"`{flat}`" if flat else "(empty)"


def approval_text(
    verdict: PilotVerdict, rest: Manifest, *, workload: str, run_id: str, threshold: float
) -> tuple[str, str]:
    """The approval's subject and Markdown body: pass rate, sample verdicts, the full run's estimate.

    :param verdict: the pilot's verdict.
    :param rest: round 1's manifest (what the full run sends if approved).
    """
    estimate = rest.estimate or {}
    expected = float(estimate.get("cost_usd_expected", 0.0))
    worst = float(estimate.get("cost_usd_max", 0.0))
    measured = verdict.cost_usd / verdict.judged * rest.staged_requests if verdict.judged else None
    meets = "meets" if verdict.pass_rate >= threshold else "is under"
    subject = (
        f"{workload}: the pilot passed {verdict.pass_rate:.0%} ({verdict.valid} of {verdict.judged}). "
        f"Send the other {rest.staged_requests:,} requests (estimated ${expected:,.4f})?"
    )
    failures = ", ".join(f"{reason} {count}" for reason, count in sorted(verdict.failures.items())) or "none"
    lines = [
        f"**Pilot of run** {_inline(run_id)}: {verdict.requests:,} request(s) sent alone, in batch(es) "
        f"{', '.join(_inline(b) for b in verdict.batch_ids) or '(none)'}.",
        "",
        f"- **Validation pass rate: {verdict.pass_rate:.0%}** ({verdict.valid} of {verdict.judged} valid); "
        f"it {meets} the threshold {threshold:.0%}.",
        f"- Failures by reason: {failures}.",
        f"- The pilot cost ${verdict.cost_usd:,.4f} "
        f"({verdict.input_tokens:,} input, {verdict.output_tokens:,} output tokens); "
        "its answers are kept and are not sent again.",
        "",
        f"**The full run if approved:** {rest.staged_requests:,} more request(s) "
        f"in {len(rest.shards)} batch(es), model(s) {', '.join(rest.models) or '(none)'}; "
        f"estimated cost **${expected:,.4f}** (at most ${worst:,.4f})"
        + (f"; ${measured:,.4f} at the pilot's measured cost per request." if measured is not None else "."),
        "",
        f"**Sample answers** ({len(verdict.samples)} of {verdict.judged}):",
        "",
    ]
    for sample in verdict.samples:
        key = _inline(sample["record_key"])
        if sample["status"] == "valid":
            lines.append(f"- {key} **valid**: {_inline(sample['text'])}")
            continue
        line = f"- {key} **{sample['status']} ({sample['reason_code']})**: {_inline(sample['reason'])}"
        lines.append(line + (f"; the answer: {_inline(sample['text'])}" if sample["text"] else ""))
    lines += [
        "",
        "Approve to send the full run; Reject to stop it and give its other items back for later runs.",
    ]
    return subject, "\n".join(lines)
