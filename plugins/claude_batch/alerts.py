"""Alerts that reach people: a run that failed, and a run still not done at its deadline.

Both go through Airflow notifiers (``airflow.sdk.bases.notifier.BaseNotifier``), configured per
DAG with ``claude_batch_dag(..., notifiers=[...])``:

    from claude_batch.alerts import email, notifier
    from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

    claude_batch_dag(config, start_date=..., notifiers=[
        email("data-oncall@example.com"),                       # SmtpNotifier on smtp_default
        notifier(SlackWebhookNotifier, slack_webhook_conn_id="slack_alerts"),
    ])

A notifier is given as a :class:`NotifierSpec` (the notifier's class and its arguments, plain
JSON), not as an instance: the deadline alert is stored with the serialized DAG and its
callback runs in the triggerer, which rebuilds each notifier there. The alert's subject and
text fill the notifier's message fields (``subject`` and ``html_content`` for email, ``text``
for Slack; :func:`notifier` takes ``subject_field`` / ``body_field`` for others).

The default (``notifiers=None``) is :func:`default_notifiers`: every alert is logged (an error
line in the log of the component that raises it: the triggerer for the deadline, the DAG
processor for a failure), and e-mailed too when ``CLAUDE_BATCH_ALERT_EMAIL`` names recipients
(comma-separated) and the SMTP connection (``CLAUDE_BATCH_ALERT_SMTP_CONN_ID``, default
``smtp_default``) exists. ``notifiers=[]`` turns alerts off.

Where each alert comes from:

- a run that failed: the DAG's ``on_failure_callback`` (:class:`RunFailedNotifier`), run by the
  DAG processor (by ``dag.test()`` in process): one alert per failed run, naming the task that
  failed and linking to its log;
- a run past its deadline: the DAG's deadline alert (``DeadlineReference.DAGRUN_QUEUED_AT`` plus
  ``CLAUDE_BATCH_DEADLINE_HOURS``, 20 by default) calls :func:`run_overdue` in the triggerer.
"""

from __future__ import annotations

import asyncio
import html
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from airflow.sdk.bases.notifier import BaseNotifier

if TYPE_CHECKING:
    from airflow.sdk import Context

log = logging.getLogger(__name__)

ALERT_EMAIL_ENV = "CLAUDE_BATCH_ALERT_EMAIL"
ALERT_SMTP_CONN_ENV = "CLAUDE_BATCH_ALERT_SMTP_CONN_ID"
DEFAULT_SMTP_CONN_ID = "smtp_default"
SMTP_NOTIFIER = "airflow.providers.smtp.notifications.smtp.SmtpNotifier"

# The message fields of notifiers we know: (subject field, body field, body is HTML).
KNOWN_NOTIFIERS: dict[str, tuple[str | None, str | None, bool]] = {
    SMTP_NOTIFIER: ("subject", "html_content", True),
    "airflow.providers.slack.notifications.slack.SlackNotifier": (None, "text", False),
    "airflow.providers.slack.notifications.slack_webhook.SlackWebhookNotifier": (None, "text", False),
    "airflow.providers.discord.notifications.discord.DiscordNotifier": (None, "text", False),
    "airflow.providers.apprise.notifications.apprise.AppriseNotifier": ("title", "body", False),
    "airflow.providers.pagerduty.notifications.pagerduty.PagerdutyNotifier": ("summary", None, False),
    "airflow.providers.microsoft.azure.notifications.msgraph.MSGraphNotifier": (None, None, False),
    "claude_batch.alerts.LogNotifier": ("subject", "text", False),
    "claude_batch.alerts.DefaultNotifier": ("subject", "text", False),
}


@dataclass(frozen=True)
class Alert:
    """What happened, in words a person on call reads: a subject line and a few lines of text."""

    kind: str  # "failed" or "overdue"
    subject: str
    lines: tuple[str, ...]
    link: str | None = None

    @property
    def text(self) -> str:
        return "\n".join([*self.lines, *([f"Open the run: {self.link}"] if self.link else [])])

    @property
    def html(self) -> str:
        body = "".join(f"<p>{html.escape(line)}</p>" for line in self.lines)
        if self.link:
            link = html.escape(self.link, quote=True)
            body += f'<p><a href="{link}">Open the run in Airflow</a></p>'
        return f"<html><body><h3>{html.escape(self.subject)}</h3>{body}</body></html>"


@dataclass(frozen=True)
class NotifierSpec:
    """An Airflow notifier the alerts go through: its class (a dotted path) and its arguments.

    Plain JSON, so the deadline alert carries it to the triggerer. Build one with
    :func:`notifier`, :func:`email` or :func:`log_only`.
    """

    path: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    subject_field: str | None = None
    body_field: str | None = None
    html: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kwargs": dict(self.kwargs), "subject_field": self.subject_field,
                "body_field": self.body_field, "html": self.html}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NotifierSpec:
        return cls(
            path=data["path"],
            kwargs=dict(data.get("kwargs") or {}),
            subject_field=data.get("subject_field"),
            body_field=data.get("body_field"),
            html=bool(data.get("html")),
        )

    def build(self, alert: Alert) -> BaseNotifier:
        """The notifier, with the alert's subject and text in its message fields."""
        from airflow.sdk.module_loading import import_string

        cls = import_string(self.path)
        kwargs = dict(self.kwargs)
        templated = set(getattr(cls, "template_fields", ()))
        if self.subject_field and self.subject_field not in kwargs:
            kwargs[self.subject_field] = _literal(alert.subject, self.subject_field in templated)
        if self.body_field and self.body_field not in kwargs:
            body = (
                alert.html
                if self.html
                else (alert.text if self.subject_field else f"{alert.subject}\n{alert.text}")
            )
            kwargs[self.body_field] = _literal(body, self.body_field in templated)
        return cls(**kwargs)


def _literal(text: str, templated: bool) -> str:
    """Text a notifier renders with Jinja, kept as it is (an error message may hold ``{{``)."""
    if not templated:
        return text
    return "{% raw %}" + text.replace("{% endraw %}", "{ % endraw % }") + "{% endraw %}"


def notifier(
    notifier_class: type[BaseNotifier] | str,
    *,
    subject_field: str | None = None,
    body_field: str | None = None,
    html: bool | None = None,
    **kwargs: Any,
) -> NotifierSpec:
    """Any Airflow notifier, e.g. ``notifier(SlackWebhookNotifier, slack_webhook_conn_id="slack")``.

    :param notifier_class: a ``BaseNotifier`` subclass or its dotted path.
    :param subject_field: the argument that takes the alert's subject (known for the SMTP, Slack,
        Discord, Apprise and PagerDuty notifiers); None: the subject goes first in the body.
    :param body_field: the argument that takes the alert's text.
    :param html: whether the body field takes HTML (the SMTP notifier's does).
    :param kwargs: the notifier's own arguments (plain JSON: connection ids, channels,
        recipients; never a secret, which belongs in the connection).
    """
    path = (
        notifier_class
        if isinstance(notifier_class, str)
        else f"{notifier_class.__module__}.{notifier_class.__qualname__}"
    )
    if not isinstance(notifier_class, str) and not issubclass(notifier_class, BaseNotifier):
        raise TypeError(f"{path} is not an Airflow notifier (a BaseNotifier subclass)")
    known = KNOWN_NOTIFIERS.get(path, (None, None, False))
    spec = NotifierSpec(
        path=path,
        kwargs=kwargs,
        subject_field=subject_field if subject_field is not None else known[0],
        body_field=body_field if body_field is not None else known[1],
        html=html if html is not None else known[2],
    )
    _check_json(spec.to_dict(), path)
    return spec


def email(
    to: str | Sequence[str],
    *,
    smtp_conn_id: str = DEFAULT_SMTP_CONN_ID,
    from_email: str | None = None,
    **kwargs: Any,
) -> NotifierSpec:
    """E-mail through Airflow's SMTP notifier (the ``smtp`` provider) on an SMTP connection.

    :param to: the recipients.
    :param smtp_conn_id: the connection (host, port, login; ``from_email`` in its extra).
    :param from_email: the sender, if the connection does not give one.
    """
    recipients = [to] if isinstance(to, str) else list(to)
    return notifier(SMTP_NOTIFIER, to=recipients, smtp_conn_id=smtp_conn_id, from_email=from_email, **kwargs)


def log_only() -> NotifierSpec:
    """Alerts as error lines in the log of the component that raises them, nothing else."""
    return notifier("claude_batch.alerts.LogNotifier")


def default_notifiers() -> tuple[NotifierSpec, ...]:
    """The default: log every alert; e-mail it too when ``CLAUDE_BATCH_ALERT_EMAIL`` is set.

    See the module's docstring.
    """
    return (notifier("claude_batch.alerts.DefaultNotifier"),)


def _check_json(data: Any, path: str) -> None:
    import json

    try:
        json.dumps(data)
    except TypeError as exc:
        raise TypeError(
            f"The arguments of notifier {path} must be plain JSON (ids, names, addresses): {exc}"
        ) from exc


# --- the notifiers of this package -------------------------------------------------------------


class LogNotifier(BaseNotifier):
    """An alert as one error line in the log (the triggerer's, the DAG processor's, or the test's)."""

    template_fields = ()

    def __init__(self, subject: str = "claude-batch alert", text: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.subject = subject
        self.text = text

    def notify(self, context: Any) -> None:
        log.error("claude-batch ALERT: %s\n%s", self.subject, self.text)

    async def async_notify(self, context: Any) -> None:
        self.notify(context)


class DefaultNotifier(LogNotifier):
    """The default: logs the alert, and e-mails it when ``CLAUDE_BATCH_ALERT_EMAIL`` has recipients.

    The SMTP connection is ``CLAUDE_BATCH_ALERT_SMTP_CONN_ID`` (default ``smtp_default``); when it
    does not exist, the log line says so and nothing else is sent.
    """

    def _email(self) -> BaseNotifier | None:
        recipients = [a.strip() for a in os.environ.get(ALERT_EMAIL_ENV, "").split(",") if a.strip()]
        if not recipients:
            return None
        conn_id = os.environ.get(ALERT_SMTP_CONN_ENV) or DEFAULT_SMTP_CONN_ID
        if not _connection_exists(conn_id):
            log.warning(
                "%s is set, but there is no %r connection: the alert is only logged.",
                ALERT_EMAIL_ENV,
                conn_id,
            )
            return None
        alert = Alert("", self.subject, tuple(self.text.splitlines()))
        return email(recipients, smtp_conn_id=conn_id).build(alert)

    def notify(self, context: Any) -> None:
        super().notify(context)
        mail = self._email()
        if mail is not None:
            mail(_render_context(context))

    async def async_notify(self, context: Any) -> None:
        super().notify(context)
        mail = self._email()
        if mail is not None:
            await _deliver(mail, context)


def _connection_exists(conn_id: str) -> bool:
    from airflow.sdk import BaseHook

    try:
        BaseHook.get_connection(conn_id)
        return True
    except Exception:
        return False


# --- what the alerts say -------------------------------------------------------------------------


def _base_url() -> str | None:
    try:
        from airflow.configuration import conf

        return (conf.get("api", "base_url", fallback="") or "").rstrip("/") or None
    except Exception:
        return None


def run_url(dag_id: str, run_id: str) -> str | None:
    """The run's page in Airflow's UI (``[api] base_url``), if the base URL is configured."""
    from urllib.parse import quote

    base = _base_url()
    return f"{base}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}" if base else None


def failure_alert(workload: str, context: Mapping[str, Any]) -> Alert:
    """The alert for a run that failed, from a DAG failure callback's context."""
    dag = context.get("dag")
    dag_id = getattr(dag, "dag_id", None) or str(context.get("dag_id") or workload)
    run_id = str(context.get("run_id") or getattr(context.get("dag_run"), "run_id", "?"))
    ti = context.get("ti") or context.get("task_instance")
    lines = [
        f"The {workload} run {run_id} of DAG {dag_id} failed ({context.get('reason') or 'task_failure'})."
    ]
    if ti is not None:
        task = getattr(ti, "task_id", "?")
        index = getattr(ti, "map_index", -1)
        lines.append(f"Failed task: {task}{f' [{index}]' if index is not None and index >= 0 else ''}"
                     f" (try {getattr(ti, 'try_number', '?')}).")  # fmt: skip
        if getattr(ti, "log_url", None):
            lines.append(f"Its log: {ti.log_url}")
    lines.append(
        "Nothing is lost: items the run held go back to later runs, and a re-run (clear the failed task) "
        "never pays twice for what was sent."
    )
    return Alert(
        "failed", f"claude-batch: {dag_id} run failed ({run_id})", tuple(lines), run_url(dag_id, run_id)
    )


def overdue_alert(workload: str, context: Mapping[str, Any] | None) -> Alert:
    """The alert for a run past its deadline, from the deadline callback's context."""
    context = context or {}
    dag_run = context.get("dag_run") or {}
    deadline = context.get("deadline") or {}
    dag_id = str(dag_run.get("dag_id") or workload)
    run_id = str(dag_run.get("dag_run_id") or dag_run.get("run_id") or "?")
    lines = [
        f"The {workload} run {run_id} of DAG {dag_id} is still not done at its deadline "
        f"({deadline.get('deadline_time', 'unknown')}); "
        f"it was queued at {dag_run.get('queued_at', 'unknown')} "
        f"and is {dag_run.get('state', 'running')}.",
        "Its batches may be waiting in the API's queue, or a task may be stuck. "
        "Batches are canceled 23 hours after submission and their unanswered items go round again, "
        "so the run will still end; look at its wait task's progress lines to see where it is.",
    ]
    return Alert(
        "overdue", f"claude-batch: {dag_id} run overdue ({run_id})", tuple(lines), run_url(dag_id, run_id)
    )


# --- sending -----------------------------------------------------------------------------------------


def specs_of(notifiers: Iterable[NotifierSpec | Mapping[str, Any]] | None) -> tuple[NotifierSpec, ...]:
    if notifiers is None:
        return default_notifiers()
    return tuple(
        spec if isinstance(spec, NotifierSpec) else NotifierSpec.from_dict(spec) for spec in notifiers
    )


def _render_context(context: Mapping[str, Any]) -> Context:
    """The context a notifier renders its templates with.

    ``dag.test()`` passes the scheduler's SerializedDAG as ``dag``, which has no template
    environment (BaseNotifier would fail on it); without it the default environment is used.
    """
    context = dict(context)
    if "dag" in context and not hasattr(context["dag"], "get_template_env"):
        context.pop("dag")
    return cast("Context", context)  # Airflow's own context, less at most its ``dag``


async def _deliver(notifier_: BaseNotifier, context: Mapping[str, Any]) -> None:
    """Send through one notifier from the event loop: its async path, or its sync one in a thread."""
    if type(notifier_).async_notify is not BaseNotifier.async_notify:
        notifier_.context = _render_context(context)  # BaseNotifier.__await__ renders with it
        await notifier_
    else:
        await asyncio.to_thread(notifier_, _render_context(context))


def send(alert: Alert, notifiers: Iterable[NotifierSpec], context: Mapping[str, Any]) -> list[str]:
    """Send through every notifier (sync); one that fails is logged and the others still send.

    :returns: the paths of the notifiers that failed.
    """
    failed = []
    for spec in notifiers:
        try:
            spec.build(alert)(_render_context(context))
        except Exception:
            log.exception("claude-batch: the %s notifier could not send %r", spec.path, alert.subject)
            failed.append(spec.path)
    return failed


async def asend(alert: Alert, notifiers: Iterable[NotifierSpec], context: Mapping[str, Any]) -> list[str]:
    """:func:`send` from the event loop (the triggerer): notifiers send concurrently."""
    specs = list(notifiers)

    async def one(spec: NotifierSpec) -> bool:
        try:
            await _deliver(spec.build(alert), context)
            return True
        except Exception:
            log.exception("claude-batch: the %s notifier could not send %r", spec.path, alert.subject)
            return False

    results = await asyncio.gather(*(one(spec) for spec in specs))
    return [spec.path for spec, ok in zip(specs, results, strict=True) if not ok]


class RunFailedNotifier(BaseNotifier):
    """The DAG's ``on_failure_callback``: tells the notifiers that a run failed, and which task.

    :param workload: the workload's name (for the message).
    :param notifiers: where the alert goes (:func:`default_notifiers` when None).
    """

    template_fields = ()

    def __init__(self, workload: str, notifiers: Iterable[NotifierSpec] | None = None) -> None:
        super().__init__()
        self.workload = workload
        self.notifiers = specs_of(notifiers)

    def render_template_fields(self, context: Any, jinja_env: Any = None) -> None:
        """Nothing to render (the notifiers it sends through render their own fields)."""

    def notify(self, context: Any) -> None:
        alert = failure_alert(self.workload, context)
        failed = send(alert, self.notifiers, context)
        if failed and len(failed) == len(self.notifiers):
            log.error("claude-batch ALERT (no notifier could send it): %s\n%s", alert.subject, alert.text)


async def run_overdue(
    workload: str,
    notifiers: Sequence[Mapping[str, Any]] | None = None,
    context: Mapping[str, Any] | None = None,
    **_: Any,
) -> list[str]:
    """The deadline alert's callback (the triggerer runs it): a run is still not done at its deadline.

    :param workload: the workload's name.
    :param notifiers: :meth:`NotifierSpec.to_dict` of each notifier (None: the default).
    :param context: what Airflow passes: ``dag_run`` (its fields) and ``deadline``.
    :returns: the paths of the notifiers that failed (the triggerer records the return value).
    """
    alert = overdue_alert(workload, context)
    specs = specs_of(notifiers)
    failed = await asend(alert, specs, dict(context or {}))
    if failed and len(failed) == len(specs):
        log.error("claude-batch ALERT (no notifier could send it): %s\n%s", alert.subject, alert.text)
    return failed


def deadline_callback_kwargs(workload: str, notifiers: Iterable[NotifierSpec] | None) -> dict[str, Any]:
    """The deadline callback's kwargs (plain JSON, stored with the serialized DAG)."""
    return {"workload": workload, "notifiers": [spec.to_dict() for spec in specs_of(notifiers)]}
