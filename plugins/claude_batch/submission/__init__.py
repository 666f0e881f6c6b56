"""Submit a staged shard as one batch, exactly once.

Plain Python, no Airflow: the operator is a thin shell over :class:`BatchSubmitter`.

- A shard (JSONL of ``{"custom_id", "params"}`` lines) is checked in one streaming pass
  before any paid call: request count, body size, custom_id syntax and uniqueness, and
  that every line is a request object. Errors name the line. A shard staging wrote (its
  manifest records the shard's sha256) is not parsed as JSON line by line: it is checked a
  block of whole lines at a time (the digest over the raw bytes, each custom_id found by one
  pattern over the block), and a shard not in staging's exact form, over a limit or with
  another digest is scanned again line by line before anything is sent.
- The shard is read from the store once, in one streaming download, into a local copy (a
  temporary file) that the request body streams from (``{"requests": [`` + lines + ``]}``;
  for a shard in staging's form, the copy's bytes with each newline made a comma), so memory
  does not grow with the shard; the lines are sent as staged, never re-serialised.
- Submission state is written in two phases with a fingerprint of the shard: the *intent*
  before the paid call, the *batch id* after it. A crash between the two is recovered by
  listing the batches created since the intent, never by paying again: one unclaimed batch of
  the right size is taken; among several, the one whose results hold exactly the shard's
  custom_ids (recorded as a digest in the intent) is. A candidate still running makes the
  attempt fail retryably (:class:`RecoveryPending`); two exact matches stop it, saying what to
  check.

Layout: ``sources`` (request sources and the streamed body), ``scan`` (the checks and the
custom_ids digest), ``state`` (the two-phase state, the result, the API protocols) and
``submitter`` (:class:`BatchSubmitter` and its recovery); this facade re-exports every name.
"""

from __future__ import annotations

from claude_batch.submission.scan import (
    Limits,
    ShardRejected,
    ShardScan,
    custom_ids_digest,
    scan_requests,
)
from claude_batch.submission.sources import BatchBody, InlineRequests, RequestSource, StoredShard
from claude_batch.submission.state import (
    BatchApi,
    RecoveryPending,
    ResultIdsApi,
    SubmissionResult,
    SubmissionState,
    SubmissionUndecidable,
    result_custom_ids,
)
from claude_batch.submission.submitter import CLOCK_SKEW, BatchSubmitter

__all__ = [
    "CLOCK_SKEW",
    "BatchApi",
    "BatchBody",
    "BatchSubmitter",
    "InlineRequests",
    "Limits",
    "RecoveryPending",
    "RequestSource",
    "ResultIdsApi",
    "ShardRejected",
    "ShardScan",
    "StoredShard",
    "SubmissionResult",
    "SubmissionState",
    "SubmissionUndecidable",
    "custom_ids_digest",
    "result_custom_ids",
    "scan_requests",
]
