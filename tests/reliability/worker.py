"""A task's worker process, killed with SIGKILL at a chosen point of one pipeline step.

The fault matrix forks a worker (``harness.run_killed_worker``), which calls :func:`arm` and
runs the step exactly as the parent would; ``python -m tests.reliability.worker SPEC`` does
the same from a JSON spec in a fresh interpreter. SIGKILL gives the step no chance to clean up
(no ``finally``, no rollback, no flush): what survives is what the step had made durable.
Exit code 3 means the step finished without reaching its kill point.

Kill points:
- ``stage:mid_write``: at the second S3 write of staging (one object written, the rest not);
- ``submit:after_create``: the paid create returned a batch id, before the state records it;
- ``collect:mid_download``: half-way through the first chunk of results (ledger already ``submitted``);
- ``load:before_commit``: results upserted and the ledger moved, inside the uncommitted transaction;
- ``load:after_commit``: the load committed, before the accounting check and the run record.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from datetime import datetime
from typing import Any

_ARMED: list[Any] = []


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str) -> None:
    """Arrange for this process to be killed at ``point`` (patches live in this process only)."""
    from tests.reliability import harness, injected_faults

    def die(*_args: Any, **_kwargs: Any) -> None:
        _die()

    if point == "stage:mid_write":
        # The second S3 write of staging: the first shard object is written, the rest not.
        patch = injected_faults.s3_call_faults(injected_faults.S3_WRITES, 2, die)
        patch.__enter__()
        _ARMED.append(patch)  # a collected context manager would undo the patch
    elif point == "submit:after_create":
        from claude_batch.hooks import ClaudeBatchHook

        original_create = ClaudeBatchHook.create_batch_from_body

        def create(self, *args, **kwargs):
            original_create(self, *args, **kwargs)
            _die()  # the batch exists and is paid for; only the intent is on S3

        ClaudeBatchHook.create_batch_from_body = create
    elif point == "collect:mid_download":
        from claude_batch import results

        original_stream = results._stream

        def stream(client, batch_id):
            for chunk in original_stream(client, batch_id):
                yield chunk[: len(chunk) // 2]  # half the bytes reach the open S3 objects
                _die()

        results._stream = stream
    elif point == "load:before_commit":
        # Results upserted and the ledger moved; the transaction's commit never runs.
        injected_faults._statement_faults.append(
            injected_faults.StatementFault("^COMMIT$", die, after=harness.RESULTS_UPSERT)
        )
    elif point == "load:after_commit":
        from claude_batch.warehouse import Warehouse

        Warehouse.check_accounting = die
    else:
        raise SystemExit(f"unknown kill point {point!r}")


def _args(step: str, args: list[Any]) -> list[Any]:
    if step == "stage":  # run_id, [start, end]
        run_id, (start, end) = args
        return [run_id, (datetime.fromisoformat(start), datetime.fromisoformat(end))]
    return args


def main(argv: list[str]) -> int:
    from tests.reliability.harness import STEPS, Stack

    spec = json.loads(argv[1])
    stack = Stack.from_json(spec["stack"])
    arm(spec["point"])
    STEPS[spec["step"]](stack, *_args(spec["step"], spec["args"]))
    return 3


if __name__ == "__main__":
    sys.exit(main(sys.argv))
