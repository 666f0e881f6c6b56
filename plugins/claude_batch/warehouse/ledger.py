"""The ledger's vocabulary and its state machine: every status name and every move of a load.

The ledger holds one row per (workload, record key, prompt version): ``pending`` once staged,
``submitted`` once in a batch, then ``succeeded``, ``invalid`` (an answer that failed
validation, retried once), ``retry`` (errored, expired or canceled, retried up to the attempt
limit) or ``dead`` (``invalid_request_error``, rejected input, or out of attempts). Items due
for retry are extracted again by the next run; items done for the prompt version never are.
The full table of moves, and which step makes each, is in docs/architecture.md (*Ledger states*).

Three vocabularies meet here and are mapped in one place: the verdicts of validated rows
(``validation.STATUSES``: the API's result types ``errored``, ``expired``, ``canceled`` plus
``valid`` and ``invalid``), the ledger states, and the run history's counts (which use the
ledger's names). :data:`OUTCOME_RULES` is the map from a verdict to the next ledger state; the
load's SQL ``CASE`` is built from it (:func:`outcome_status_sql`) and :func:`outcome_status`
evaluates the same rules in Python, so a test can check the SQL against the table.
Only items ``pending`` or ``submitted`` for the loading run move, which makes a repeated load a
no-op. Every constant is a fixed word, never row content: quoting them as SQL literals is safe.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

# -- ledger states ------------------------------------------------------------------------------
PENDING = "pending"
SUBMITTED = "submitted"
SUCCEEDED = "succeeded"
INVALID = "invalid"
RETRY = "retry"
DEAD = "dead"
LEDGER_STATUSES = (PENDING, SUBMITTED, SUCCEEDED, INVALID, RETRY, DEAD)
# What a run's accounting adds up: every item of a finished run is in one of these.
FINAL_STATUSES = (SUCCEEDED, INVALID, RETRY, DEAD)
# Held by a run (its run_id): no other run may claim or extract them.
OPEN_STATUSES = (PENDING, SUBMITTED)
# Due for another try: any run extracts them whatever its interval, and claims them.
DUE_STATUSES = (RETRY, INVALID)
# Done for the prompt version: never extracted again (until a person requeues them).
DONE_STATUSES = (SUCCEEDED, DEAD)
# What ``requeue`` puts back to ``retry``.
REQUEUEABLE_STATUSES = (DEAD, INVALID)

# -- verdicts of validated rows (validation.STATUSES) -------------------------------------------
VALID = "valid"
INVALID_ANSWER = "invalid"
ERRORED = "errored"
EXPIRED = "expired"
CANCELED = "canceled"
VERDICTS = (VALID, INVALID_ANSWER, ERRORED, EXPIRED, CANCELED)
# The one API error that no retry can fix: the request itself is wrong.
INVALID_REQUEST_ERROR = "invalid_request_error"


class Guard(enum.Enum):
    """A condition on the item's ledger row; ``attempts`` counts the answer being loaded too."""

    ALWAYS = "always"
    LAST_ATTEMPT = "attempts + 1 >= limit"
    REPEATED_INVALID_OR_LAST_ATTEMPT = "a second invalid answer, or attempts + 1 >= limit"


@dataclass(frozen=True)
class OutcomeRule:
    """One row of the load's transition table: the first rule that matches an item moves it.

    :param to: the item's next ledger state.
    :param verdict: the validated row's status it applies to (None: any).
    :param error_type: the API error type it applies to (None: any).
    :param guard: what the item's ledger row must also satisfy.
    """

    to: str
    verdict: str | None = None
    error_type: str | None = None
    guard: Guard = Guard.ALWAYS


OUTCOME_RULES: tuple[OutcomeRule, ...] = (
    OutcomeRule(SUCCEEDED, verdict=VALID),
    OutcomeRule(DEAD, verdict=INVALID_ANSWER, guard=Guard.REPEATED_INVALID_OR_LAST_ATTEMPT),
    OutcomeRule(INVALID, verdict=INVALID_ANSWER),
    OutcomeRule(DEAD, verdict=ERRORED, error_type=INVALID_REQUEST_ERROR),
    OutcomeRule(DEAD, guard=Guard.LAST_ATTEMPT),
    OutcomeRule(RETRY),
)


def sql_literal(word: str) -> str:
    """One of this module's constants as an SQL string literal."""
    return f"'{word}'"


def sql_in(words: Iterable[str]) -> str:
    """Constants as the parenthesised list of an SQL ``IN``."""
    return "(" + ", ".join(sql_literal(word) for word in words) + ")"


def _guard_holds(guard: Guard, attempts: int, invalid_answers: int, attempt_limit: int) -> bool:
    last_attempt = attempts + 1 >= attempt_limit
    if guard is Guard.LAST_ATTEMPT:
        return last_attempt
    if guard is Guard.REPEATED_INVALID_OR_LAST_ATTEMPT:
        return invalid_answers >= 1 or last_attempt
    return True


def outcome_status(
    verdict: str, error_type: str | None, attempts: int, invalid_answers: int, attempt_limit: int
) -> str:
    """The ledger state an open item moves to when a result with ``verdict`` is loaded."""
    for rule in OUTCOME_RULES:
        if rule.verdict is not None and rule.verdict != verdict:
            continue
        if rule.error_type is not None and rule.error_type != error_type:
            continue
        if _guard_holds(rule.guard, attempts, invalid_answers, attempt_limit):
            return rule.to
    raise AssertionError("OUTCOME_RULES ends with a rule that always matches")


def _guard_sql(guard: Guard, limit: str) -> str | None:
    if guard is Guard.LAST_ATTEMPT:
        return f"l.attempts + 1 >= {limit}"
    if guard is Guard.REPEATED_INVALID_OR_LAST_ATTEMPT:
        return f"(l.invalid_answers >= 1 OR l.attempts + 1 >= {limit})"
    return None


def outcome_status_sql(limit: str) -> tuple[str, int]:
    """:data:`OUTCOME_RULES` as an SQL ``CASE`` over outcome ``o`` and ledger row ``l``.

    :param limit: the placeholder the attempt limit is bound to.
    :returns: the expression and how many times it uses ``limit`` (bind that many values).
    """
    branches = []
    uses = 0
    for rule in OUTCOME_RULES:
        conditions = []
        if rule.verdict is not None:
            conditions.append(f"o.status = {sql_literal(rule.verdict)}")
        if rule.error_type is not None:
            conditions.append(f"o.error_type = {sql_literal(rule.error_type)}")
        guard = _guard_sql(rule.guard, limit)
        if guard is not None:
            conditions.append(guard)
            uses += 1
        if conditions:
            branches.append(f"WHEN {' AND '.join(conditions)} THEN {sql_literal(rule.to)}")
        else:
            branches.append(f"ELSE {sql_literal(rule.to)}")
    return "CASE " + " ".join(branches) + " END", uses
