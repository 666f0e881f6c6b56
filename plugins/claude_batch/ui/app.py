"""The Claude Batches page's FastAPI app: its routes, what each asks of :mod:`claude_batch.ops`, the requeue.

Built once in the API server (see :class:`claude_batch.ui.LazyApp`). Every route depends on
:func:`claude_batch.ui.auth.reader` (Airflow's token; read access to some DAG) and checks the
workload's DAGs itself (read to see it, edit to requeue). Pages are rendered from the Jinja
templates beside this module, with autoescaping on: no text from a warehouse (a failure reason,
a record key) is ever markup.

The warehouse is opened per request through :func:`claude_batch.connections.open_warehouse`
(the providers' hooks, the DuckDB file lock; the API server is a server context, so connections
are found in the metadata database too) and closed before the page is rendered; a DuckDB
file a task holds is waited for at most ``CLAUDE_BATCH_UI_LOCK_TIMEOUT`` seconds (default 10),
then the page says it is busy (503). No connection secret or driver message reaches a page or
a log line: an unexpected warehouse error is shown and logged by its type only.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import Depends, FastAPI, Form, HTTPException, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from markupsafe import Markup

from claude_batch.cli import DEFAULT_WAREHOUSE_CONN_ID, duration, money, percent
from claude_batch.ops import (
    REQUEUEABLE,
    BatchInFlight,
    DeadItems,
    HeldItems,
    LedgerCounts,
    NoLedger,
    Ops,
    OpsError,
    RequeueResult,
    RunSummary,
    UnknownWorkload,
)
from claude_batch.ui import PAGE_NAME, auth, chart
from claude_batch.warehouse import LEDGER_STATUSES, WarehouseError

log = logging.getLogger(__name__)

CONN_IDS_ENV = "CLAUDE_BATCH_UI_CONN_IDS"
LOCK_TIMEOUT_ENV = "CLAUDE_BATCH_UI_LOCK_TIMEOUT"
RUNS_SHOWN = 20
DEAD_PAGE_SIZE = 50
CHART_DAYS = 30
# The pipeline's tasks a view links to (a TaskGroup's tasks carry its id as a prefix).
RUN_TASK, REJECT_TASK, ANSWER_TASK, WAIT_TASK = "report", "stage", "collect", "wait"
# Every route's user: authenticated by Airflow, allowed to read some DAG.
Reader = Annotated[Any, Depends(auth.reader)]
TEMPLATES = Jinja2Templates(directory=Path(__file__).resolve().parent / "templates")


def conn_ids() -> list[str]:
    """The warehouse connections the page shows: ``CLAUDE_BATCH_UI_CONN_IDS``, else the pipeline's default."""
    listed = [part.strip() for part in os.environ.get(CONN_IDS_ENV, "").split(",") if part.strip()]
    return list(dict.fromkeys(listed)) or [DEFAULT_WAREHOUSE_CONN_ID]


def lock_timeout() -> float:
    return float(os.environ.get(LOCK_TIMEOUT_ENV, "10"))


class PageError(HTTPException):
    """A page that cannot be shown as asked, with what to tell the user (never a secret)."""


# -- what the views show --------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadSummary:
    """A workload's line on the front page."""

    conn_id: str
    name: str
    dag_ids: list[str]
    ledger: LedgerCounts | None
    last_run: RunSummary | None
    in_flight: int
    dead_or_invalid: int


@dataclass(frozen=True)
class ConnectionSection:
    """One warehouse connection on the front page: its workloads the user may read, or why there are none."""

    conn_id: str
    workloads: list[WorkloadSummary] = field(default_factory=list)
    problem: str | None = None


@dataclass(frozen=True)
class WorkloadView:
    """Everything the workload page shows."""

    conn_id: str
    workload: str
    dag_ids: list[str]
    can_requeue: bool
    form_token: str
    runs: list[RunSummary]
    chart_svg: Markup
    chart_total: chart.DayBar
    in_flight: list[BatchInFlight]
    holders: list[HeldItems]
    ledger: list[LedgerCounts]
    dead: DeadItems
    search: str
    status: str
    offset: int
    prompt_version: str  # as asked for the dead items ("": the current one)
    task_ids: dict[tuple[str, str], set[str]]
    result: RequeueResult | None = None
    notice: str | None = None


# -- the app ----------------------------------------------------------------------------------


def create_app() -> FastAPI:
    """The page's FastAPI app (no OpenAPI or docs routes: every route it has is a page behind auth)."""
    app = FastAPI(title=PAGE_NAME, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(HTTPException, _error_page)
    app.add_exception_handler(RequestValidationError, _bad_request_page)

    @app.get("/", response_class=HTMLResponse, name="index")
    def index(request: Request, user: Reader) -> HTMLResponse:
        sections = [_connection_section(conn_id, user) for conn_id in conn_ids()]
        return _render(request, "index.html", user=user, sections=sections, statuses=LEDGER_STATUSES)

    @app.get("/{conn_id}/{workload}", response_class=HTMLResponse, name="workload")
    def workload_page(
        request: Request,
        conn_id: str,
        workload: str,
        user: Reader,
        q: Annotated[str, Query(max_length=200)] = "",
        status_filter: Annotated[str, Query(alias="status", pattern="^(all|dead|invalid)$")] = "all",
        offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
        pv: Annotated[str, Query(max_length=200)] = "",
    ) -> HTMLResponse:
        _check_conn_id(conn_id)
        with _ops(conn_id) as ops:
            view = _workload_view(ops, user, conn_id, workload, q, status_filter, offset, prompt_version=pv)
        return _render(request, "workload.html", user=user, view=view)

    @app.post("/{conn_id}/{workload}/requeue", response_class=HTMLResponse, name="requeue")
    def requeue(
        request: Request,
        conn_id: str,
        workload: str,
        user: Reader,
        token: Annotated[str, Form(max_length=200)] = "",
        prompt_version: Annotated[str, Form(max_length=200)] = "",
        key: Annotated[list[str], Form()] = [],  # noqa: B006 - FastAPI copies the default per request
    ) -> HTMLResponse:
        _check_conn_id(conn_id)
        auth.check_form_token(user, conn_id, workload, token)
        with _ops(conn_id) as ops:
            dag_ids = _readable_workload(ops, user, workload)
            if not auth.may_access_dags(user, dag_ids, "PUT"):
                raise PageError(
                    status.HTTP_403_FORBIDDEN, _needs(dag_ids, "edit", workload, "requeue its items")
                )
            result, notice = None, None
            if key:
                result = ops.requeue(
                    workload, keys=key, prompt_version=prompt_version or None, by=auth.user_name(user)
                )
                log.info(
                    "Claude Batches page: %s requeued %d of %d item(s) of %s on %s",
                    auth.user_name(user), result.requeued, len(key), workload, conn_id,
                )  # fmt: skip
            else:
                notice = "Tick the items to requeue first."
            view = _workload_view(
                ops,
                user,
                conn_id,
                workload,
                "",
                "all",
                0,
                prompt_version=prompt_version,
                result=result,
                notice=notice,
            )
        return _render(request, "workload.html", user=user, view=view)

    return app


# -- views ------------------------------------------------------------------------------------


def _connection_section(conn_id: str, user: Any) -> ConnectionSection:
    try:
        with _ops(conn_id) as ops:
            status_now = ops.status()
            last_runs = {run.workload: run for run in status_now.last_runs}
            workloads = []
            for name in status_now.workloads:
                dag_ids = ops.dag_ids(name)
                if not auth.may_access_dags(user, dag_ids, "GET"):
                    continue
                current = next((c for c in status_now.ledger if c.workload == name and c.current), None)
                workloads.append(
                    WorkloadSummary(
                        conn_id=conn_id, name=name, dag_ids=dag_ids, ledger=current,
                        last_run=last_runs.get(name),
                        in_flight=sum(1 for b in status_now.in_flight if b.workload == name),
                        dead_or_invalid=sum(current.counts.get(s, 0) for s in REQUEUEABLE) if current else 0,
                    )
                )  # fmt: skip
    except PageError as exc:
        return ConnectionSection(conn_id, problem=str(exc.detail))
    return ConnectionSection(conn_id, workloads)


def _readable_workload(ops: Ops, user: Any, workload: str) -> list[str]:
    """The workload's DAGs, once the user is known to may read them all (else 403; unknown: 404)."""
    try:
        dag_ids = ops.dag_ids(workload)
    except UnknownWorkload:
        raise PageError(status.HTTP_404_NOT_FOUND, f"No workload {workload!r} in this warehouse.") from None
    if not auth.may_access_dags(user, dag_ids, "GET"):
        raise PageError(status.HTTP_403_FORBIDDEN, _needs(dag_ids, "read", workload, "see it"))
    return dag_ids


def _workload_view(
    ops: Ops,
    user: Any,
    conn_id: str,
    workload: str,
    search: str,
    status_filter: str,
    offset: int,
    *,
    prompt_version: str = "",
    result: RequeueResult | None = None,
    notice: str | None = None,
) -> WorkloadView:
    """The workload page's contents.

    :param prompt_version: whose dead and invalid items to list (a unique prefix will do; default:
        the current one, which the DAG's next run sends).
    """
    dag_ids = _readable_workload(ops, user, workload)
    statuses = REQUEUEABLE if status_filter == "all" else (status_filter,)
    runs = ops.runs(workload, limit=RUNS_SHOWN)
    today = ops.now.date()
    bars = chart.day_bars(ops.cost_by_day(workload, days=CHART_DAYS), end=today, span=CHART_DAYS)
    total = chart.DayBar(
        today, sum(b.runs for b in bars), round(sum(b.cost_usd for b in bars), 6),
        round(sum(b.realtime_cost_usd for b in bars), 6),
    )  # fmt: skip
    dead = ops.dead_items(
        workload, prompt_version=prompt_version or None, search=search or None, statuses=statuses,
        limit=DEAD_PAGE_SIZE, offset=offset,
    )  # fmt: skip
    in_flight = ops.batches_in_flight(workload)
    holders = ops.holders(workload)
    linked = {(r.dag_id, r.run_id) for r in runs} | {(i.dag_id, i.run_id) for i in dead.items}
    linked |= {(b.dag_id, b.run_id) for b in in_flight}
    return WorkloadView(
        conn_id=conn_id,
        workload=workload,
        dag_ids=dag_ids,
        can_requeue=auth.may_access_dags(user, dag_ids, "PUT"),
        form_token=auth.form_token(user, conn_id, workload),
        runs=runs,
        chart_svg=Markup(
            chart.cost_chart_svg(bars, title=f"Cost per day of {workload}, last {CHART_DAYS} days")
        ),  # escaped parts
        chart_total=total,
        in_flight=in_flight,
        holders=holders,
        ledger=ops.ledger_counts(workload),
        dead=dead,
        search=search,
        status=status_filter,
        offset=offset,
        prompt_version=prompt_version,
        task_ids=_task_ids({(d, r) for d, r in linked if d and r}),
        result=result,
        notice=notice,
    )


def _needs(dag_ids: Sequence[str], access: str, workload: str, to: str) -> str:
    dags = ", ".join(dag_ids) if dag_ids else "DAGs in general"
    return f"You need {access} access to {'DAG ' if dag_ids else ''}{dags} to {to} (workload {workload})."


def _task_ids(runs: set[tuple[str, str]]) -> dict[tuple[str, str], set[str]]:
    """The task ids each (DAG, run) has in Airflow's metadata database, to link to tasks that exist.

    Runs Airflow does not know (a warehouse filled outside it) get no task links, only run links.
    """
    if not runs:
        return {}
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select, tuple_
    from sqlalchemy.exc import SQLAlchemyError

    out: dict[tuple[str, str], set[str]] = {}
    try:
        with create_session() as session:
            rows = session.execute(
                select(TaskInstance.dag_id, TaskInstance.run_id, TaskInstance.task_id)
                .where(tuple_(TaskInstance.dag_id, TaskInstance.run_id).in_(sorted(runs)))
                .distinct()
            )
            for dag_id, run_id, task_id in rows:
                out.setdefault((dag_id, run_id), set()).add(task_id)
    except SQLAlchemyError as exc:  # no metadata database here: the links to runs remain
        log.debug("Claude Batches page: no task ids (%s)", type(exc).__name__)
    return out


def task_for(view: WorkloadView, dag_id: str | None, run_id: str | None, name: str) -> str | None:
    """The run's task called ``name`` (at the DAG's top level, else in the workload's TaskGroup, else
    in the only group that has one), or None when Airflow has no such task for the run."""
    if not dag_id or not run_id:
        return None
    ids = view.task_ids.get((dag_id, run_id), set())
    for candidate in (name, f"{view.workload}.{name}"):
        if candidate in ids:
            return candidate
    grouped = sorted(task_id for task_id in ids if task_id.rsplit(".", 1)[-1] == name)
    return grouped[0] if len(grouped) == 1 else None


# -- the warehouse ----------------------------------------------------------------------------


def _check_conn_id(conn_id: str) -> None:
    if conn_id not in conn_ids():
        raise PageError(
            status.HTTP_404_NOT_FOUND,
            f"{conn_id!r} is not a warehouse connection this page shows (it shows {', '.join(conn_ids())}; "
            f"set {CONN_IDS_ENV} to list others).",
        )


@contextlib.contextmanager
def _ops(conn_id: str) -> Iterator[Ops]:
    """The query layer over the connection's warehouse; its failures as :class:`PageError` (no secrets)."""
    from airflow.sdk.exceptions import AirflowNotFoundException

    from claude_batch.connections import open_warehouse

    try:
        with open_warehouse(conn_id, timeout=lock_timeout()) as warehouse:
            yield Ops(warehouse)
    except (PageError, HTTPException):
        raise
    except AirflowNotFoundException:
        raise PageError(
            status.HTTP_404_NOT_FOUND,
            f"There is no Airflow connection {conn_id!r}: create it, or set {CONN_IDS_ENV}.",
        ) from None
    except NoLedger:
        raise PageError(
            status.HTTP_404_NOT_FOUND,
            f"No claude-batch pipeline has run on {conn_id!r} yet: there is nothing to show.",
        ) from None
    except UnknownWorkload as exc:
        raise PageError(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except OpsError as exc:  # the question as asked has no answer (our own words)
        raise PageError(status.HTTP_400_BAD_REQUEST, str(exc)) from None
    except WarehouseError as exc:
        if "lock" in str(exc).lower() or "in use" in str(exc).lower():
            raise PageError(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                f"The warehouse {conn_id!r} is busy (a task is writing to it): reload in a moment.",
            ) from None
        log.warning(
            "Claude Batches page: the warehouse %s could not be opened (%s)", conn_id, type(exc).__name__
        )
        raise PageError(
            status.HTTP_502_BAD_GATEWAY, f"The warehouse {conn_id!r} could not be opened."
        ) from None
    except Exception as exc:  # the driver's own error: its text may hold connection details
        log.warning("Claude Batches page: reading %s failed (%s)", conn_id, type(exc).__name__)
        raise PageError(
            status.HTTP_502_BAD_GATEWAY, f"Reading the warehouse {conn_id!r} failed ({type(exc).__name__})."
        ) from None


# -- rendering ---------------------------------------------------------------------------------


def airflow_url(*parts: str) -> str:
    """A page of Airflow's own UI (under its base URL), the parts URL-quoted."""
    from airflow.api_fastapi.app import API_ROOT_PATH

    return API_ROOT_PATH.rstrip("/") + "/" + "/".join(quote(part, safe="") for part in parts)


def page_url(request: Request, *parts: str, **query: Any) -> str:
    """A page of this app (under wherever Airflow mounted it)."""
    base = str(request.scope.get("root_path", "")).rstrip("/")
    path = base + "/" + "/".join(quote(part, safe="") for part in parts)
    wanted = {k: v for k, v in query.items() if v not in (None, "", 0)}
    return path + ("?" + urlencode(wanted) if wanted else "")


def _render(request: Request, template: str, *, status_code: int = 200, **context: Any) -> HTMLResponse:
    helpers = {
        "page_name": PAGE_NAME,
        "money": money,
        "duration": duration,
        "percent": percent,
        "airflow_url": airflow_url,
        "page_url": lambda *parts, **query: page_url(request, *parts, **query),
        "task_for": task_for,
        "user_name": auth.user_name(context["user"]) if context.get("user") is not None else None,
        "statuses": LEDGER_STATUSES,
        "requeueable": REQUEUEABLE,
        "page_size": DEAD_PAGE_SIZE,
        "run_task": RUN_TASK,
        "reject_task": REJECT_TASK,
        "answer_task": ANSWER_TASK,
        "wait_task": WAIT_TASK,
    }
    return TEMPLATES.TemplateResponse(request, template, {**helpers, **context}, status_code=status_code)


async def _error_page(request: Request, exc: Exception) -> HTMLResponse:
    assert isinstance(exc, HTTPException)
    login = None
    if exc.status_code == status.HTTP_401_UNAUTHORIZED:
        with contextlib.suppress(Exception):  # an auth manager without a login page: no link
            login = auth.login_url(str(request.url))
    response = _render(
        request,
        "error.html",
        status_code=exc.status_code,
        code=exc.status_code,
        detail=str(exc.detail),
        login=login,
    )
    for name, value in (exc.headers or {}).items():
        response.headers[name] = value
    return response


async def _bad_request_page(request: Request, exc: Exception) -> HTMLResponse:
    return _render(
        request, "error.html", status_code=status.HTTP_400_BAD_REQUEST, code=400,
        detail="The request's parameters are not valid for this page.", login=None,
    )  # fmt: skip
