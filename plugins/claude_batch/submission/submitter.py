"""Submit a source as one batch, exactly once: :class:`BatchSubmitter`.

A crash between the intent and the batch id is recovered by listing the batches created since
the intent, never by paying again: one unclaimed batch of the right size is taken; among
several, the one whose results hold exactly the shard's custom_ids (the intent's digest) is.
A candidate still running makes the attempt fail retryably (:class:`RecoveryPending`); two
exact matches stop it, saying what to check.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from contextlib import closing
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

from anthropic.types.messages import MessageBatch

from claude_batch.storage import ObjectStore
from claude_batch.submission.scan import (
    Limits,
    ShardScan,
    _contains,
    _digest_of_sorted,
    _id_hash,
    _sorted,
    scan_requests,
)
from claude_batch.submission.sources import BatchBody, RequestSource, _read_once
from claude_batch.submission.state import (
    BatchApi,
    RecoveryPending,
    SubmissionResult,
    SubmissionState,
    SubmissionUndecidable,
    _Unreadable,
    result_custom_ids,
)

# How far the API's clock may be behind ours when matching created_at to a recorded intent.
CLOCK_SKEW = timedelta(minutes=10)
# The default limits (frozen, so one shared instance is safe).
API_LIMITS = Limits()


def _now() -> datetime:
    return datetime.now(UTC)


def _total(batch: MessageBatch) -> int:
    counts = batch.request_counts
    return counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired


class BatchSubmitter:
    """Submits one source as one batch, idempotently, with state at ``state_relpath``.

    :param api: the batch API (a :class:`~claude_batch.hooks.ClaudeBatchHook`).
    :param store: where the state lives.
    :param state_relpath: this submission's state object, unique per DAG, task, run and map index.
    :param limits: the per-batch limits to enforce before sending.
    """

    def __init__(
        self, api: BatchApi, store: ObjectStore, state_relpath: str, limits: Limits = API_LIMITS
    ) -> None:
        self.api = api
        self.store = store
        self.state_relpath = state_relpath
        self.limits = limits

    @property
    def state_uri(self) -> str:
        return self.store.uri(self.state_relpath)

    def read_state(self) -> SubmissionState | None:
        data = self.store.read_json_or_none(self.state_relpath)
        return SubmissionState.from_json(data) if data else None

    def _write_state(self, state: SubmissionState) -> None:
        self.store.write_json(self.state_relpath, asdict(state))

    def submit(self, source: RequestSource, log: Callable[[str], None] = lambda _m: None) -> SubmissionResult:
        """Send ``source`` as a batch unless this submission already has one.

        :param source: the shard or inline requests.
        :param log: where to say what happened (the task log).
        """
        with _read_once(source) as local:
            return self._submit(local, log)

    def _submit(self, source: RequestSource, log: Callable[[str], None]) -> SubmissionResult:
        scan = scan_requests(source, self.limits)
        state = self.read_state()
        superseded: list[str] = []
        if state is not None:
            superseded = list(state.superseded_batch_ids)
            same_input = state.fingerprint == scan.fingerprint
            previous_id = state.batch_id or (
                self._recover(state, scan if same_input else None) if state.phase == "intent" else None
            )
            if previous_id and same_input:
                how = "reattached" if state.phase == "submitted" else "recovered"
                if how == "recovered":
                    self._write_state(
                        SubmissionState(
                            **{
                                **asdict(state),
                                "phase": "submitted",
                                "batch_id": previous_id,
                                "submitted_at": _now().isoformat(),
                                "custom_ids_digest": state.custom_ids_digest or scan.custom_ids_digest,
                            }
                        )
                    )
                log(
                    f"Batch {previous_id} was already submitted for this input ({how}); not submitting again."
                )
                return SubmissionResult(previous_id, scan.request_count, how)
            if previous_id and not same_input:
                log(
                    f"The input changed since batch {previous_id} was submitted; "
                    "cancelling it before resubmitting."
                )
                self.api.cancel_batch(previous_id)
                superseded.append(previous_id)

        intent = SubmissionState(
            phase="intent",
            fingerprint=scan.fingerprint,
            request_count=scan.request_count,
            body_bytes=scan.body_bytes,
            source=source.description,
            intent_at=_now().isoformat(),
            superseded_batch_ids=superseded,
            custom_ids_digest=scan.custom_ids_digest,
        )
        self._write_state(intent)
        batch = self.api.create_batch_from_body(
            BatchBody(source),
            scan.body_bytes,
            scan.request_count,
            recover=lambda: self._find_one(intent, scan),
        )
        intent.phase, intent.batch_id, intent.submitted_at = "submitted", batch.id, _now().isoformat()
        self._write_state(intent)
        log(f"Submitted batch {batch.id} with {scan.request_count:,} requests ({scan.body_bytes:,} bytes).")
        return SubmissionResult(batch.id, scan.request_count, "created")

    def _recover(self, state: SubmissionState, scan: ShardScan | None = None) -> str | None:
        batch = self._find_one(state, scan)
        return batch.id if batch else None

    def _find_one(self, state: SubmissionState, scan: ShardScan | None = None) -> MessageBatch | None:
        """The batch an interrupted attempt created, if exactly one can be it.

        One unclaimed batch of the right size is taken as it is. Among several, each that has
        ended is ours if its results hold exactly the shard's custom_ids; a batch still running
        cannot be checked yet.

        :param state: the intent of the interrupted attempt.
        :param scan: the scan of the same input (same fingerprint), if at hand: its id hashes let
            a foreign batch be ruled out at its first foreign custom_id.
        :raises RecoveryPending: (retryable) no ended candidate is ours and some have not ended or
            could not be read.
        :raises SubmissionUndecidable: several candidates hold exactly these custom_ids, or the
            state has no digest to check them against.
        """
        since = datetime.fromisoformat(state.intent_at) - CLOCK_SKEW
        claimed = self._claimed_batch_ids() | set(state.superseded_batch_ids)
        candidates = [
            batch
            for batch in self.api.batches_created_since(since)
            if _total(batch) == state.request_count and batch.id not in claimed
        ]
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        expected = state.custom_ids_digest or (scan.custom_ids_digest if scan is not None else None)
        if not expected:
            why = (
                "This state has no digest of its custom_ids and the input changed since, "
                "so none can be checked."
            )
            raise SubmissionUndecidable(self._undecidable(state, candidates, why))
        ours = scan.id_hashes if scan is not None and scan.custom_ids_digest == expected else None
        matches: list[MessageBatch] = []
        waiting: dict[str, str] = {}
        for batch in candidates:
            if batch.processing_status != "ended":
                waiting[batch.id] = batch.processing_status
                continue
            try:
                if self._holds_exactly(batch, expected, ours):
                    matches.append(batch)
            except _Unreadable as exc:
                waiting[batch.id] = f"ended, but its results could not be read whole ({exc})"
        if len(matches) == 1:
            return matches[0]
        if matches:
            why = (
                f"{' and '.join(b.id for b in matches)} all hold exactly this shard's custom_ids "
                "(another run sent the same ones)."
            )
            raise SubmissionUndecidable(self._undecidable(state, candidates, why))
        if not waiting:
            return None  # every candidate holds other custom_ids: the create never landed
        which = ", ".join(f"{batch_id} ({why})" for batch_id, why in waiting.items())
        until = (
            f"batch {next(iter(waiting))} ends" if len(waiting) == 1 else f"batches {', '.join(waiting)} end"
        )
        raise RecoveryPending(
            f"A previous attempt recorded its intent to submit {state.request_count:,} requests at "
            f"{state.intent_at} but not the batch id, and {len(candidates)} unclaimed batches of that size "
            f"were created since. None of those checked holds this shard's custom_ids; not checked yet: "
            f"{which}. Only a batch's results list its custom_ids, and they exist once it has ended. "
            f"Nothing was created. This will be decidable when {until}; a task retry checks again.",
            list(waiting),
        )

    def _holds_exactly(self, batch: MessageBatch, expected: str, ours: Any) -> bool:
        """Whether an ended batch's results hold exactly the custom_ids whose digest is ``expected``.

        :param batch: an ended candidate of the right size.
        :param expected: the shard's :func:`custom_ids_digest`.
        :param ours: the shard's sorted id hashes, or ``None`` (then the whole results are read).
        :raises _Unreadable: the results could not be read whole, so they prove nothing.
        """
        seen = array("q")
        try:
            with closing(result_custom_ids(self.api, batch.id)) as custom_ids:
                for custom_id in custom_ids:
                    value = _id_hash(custom_id)
                    if ours is not None and not _contains(ours, value):
                        return False  # a foreign id is proof, even from a cut stream
                    seen.append(value)
        except Exception as exc:  # a download cut, a 404, a bad line: retry later, never create
            raise _Unreadable(f"{type(exc).__name__}: {exc}") from exc
        if len(seen) != _total(batch):
            raise _Unreadable(f"{len(seen):,} result lines for {_total(batch):,} requests")
        return _digest_of_sorted(_sorted(seen)) == expected

    def _undecidable(self, state: SubmissionState, candidates: list[MessageBatch], why: str) -> str:
        ids = ", ".join(batch.id for batch in candidates)
        return (
            f"A previous attempt recorded its intent to submit {state.request_count:,} requests at "
            f"{state.intent_at} but not the batch id, and {len(candidates)} unclaimed batches of that size "
            f"were created since: {ids}. {why} Refusing to guess and refusing to pay twice. "
            "Check them in the Claude Console: cancel the strays, then either write the right id into "
            f'{self.state_uri} (set "phase": "submitted" and "batch_id") '
            "or delete that file to submit afresh."
        )

    def _claimed_batch_ids(self) -> set[str]:
        """Batch ids already recorded by sibling submissions (the other shards of this run)."""
        folder = self.state_relpath.rsplit("/", 1)[0]
        claimed: set[str] = set()
        for relpath in self.store.list(folder):
            if relpath == self.state_relpath or not relpath.endswith(".json"):
                continue
            data = self.store.read_json_or_none(relpath) or {}
            if data.get("batch_id"):
                claimed.add(data["batch_id"])
            claimed.update(data.get("superseded_batch_ids") or [])
        return claimed
