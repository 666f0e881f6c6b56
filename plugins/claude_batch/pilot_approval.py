"""The pilot's approval: a person approves the full run (Airflow's human-in-the-loop operator).

The Airflow half of the pilot, apart from :mod:`claude_batch.pilot` so the plain-Python steps
that split, judge and describe a pilot import no Airflow.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from airflow.providers.standard.exceptions import HITLRejectException
from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException


class PilotApprovalOperator(ApprovalOperator):
    """A person approves the full run after its pilot (Airflow's human-in-the-loop approval).

    Skips unless the decision task asked for approval (otherwise the pass rate decided). Its
    subject and body are the decision task's XCom (``subject``, ``body``), set when it runs, not
    templated, so a model's answer text is never rendered as Jinja. The task waits in
    ``awaiting_input`` (no worker slot, no pool slot) until someone answers in the Required
    Actions view (or the HITL REST API). On Reject (or, given ``response_timeout``, no answer in
    time: the default is Reject) ``on_reject`` gives the run's other items back and the task
    fails, so nothing else is submitted.

    :param decision_task_id: the task whose XCom holds the decision (``approval``, ``subject``, ``body``).
    :param on_reject: ``(context, reason) -> items released``.
    :param response_timeout: how long to wait for an answer (None: no limit).
    """

    def __init__(
        self,
        *,
        decision_task_id: str,
        on_reject: Callable[[Any, str], int],
        response_timeout: timedelta | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("subject", "Approve the full run after its pilot?")
        if response_timeout is not None:
            kwargs.setdefault("defaults", ApprovalOperator.REJECT)
        super().__init__(fail_on_reject=True, response_timeout=response_timeout, **kwargs)
        self.decision_task_id = decision_task_id
        self.on_reject = on_reject

    def execute(self, context: Any) -> Any:
        decision = context["ti"].xcom_pull(task_ids=self.decision_task_id) or {}
        if not decision.get("approval"):
            raise AirflowSkipException("No approval asked for: the pilot's pass rate decided.")
        self.subject = decision["subject"]
        self.body = decision["body"]
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        try:
            return super().execute_complete(context=context, event=event)
        except HITLRejectException:
            if event.get("timedout"):
                how = "not answered in time (rejected by default)"
            else:
                how = f"rejected by {(event.get('responded_by_user') or {}).get('name') or 'a reviewer'}"
            reason = f"The pilot was {how}; nothing else was submitted."
            released = self.on_reject(context, reason)
            raise AirflowFailException(
                f"{reason} {released:,} item(s) were given back for later runs."
            ) from None
