"""A person's path through the Airflow UI in real Chromium: log in, trigger with Params, see it succeed;
then the Claude Batches page: a run's cost and outcomes, a dead item found by its reason and requeued
by the admin, the viewer refused.

Debian's chromium and chromium-driver are installed by the set-up when missing (apt; nothing
downloads a browser). chromedriver is driven through its W3C WebDriver HTTP API. The stack is the
full-stack tests' (started once per session); the screenshots stay in test-artifacts/fullstack/.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from urllib.parse import unquote

import pytest

from tests.fullstack.chromium import Chromium, ChromiumUnavailable, ensure_chromium
from tests.fullstack.conftest import BROWSER_DAG, BROWSER_DAY, support_ticket_key
from tests.fullstack.stack import (
    ADMIN_USER,
    ARTIFACTS,
    VIEWER_USER,
    AirflowStack,
    StackError,
    model_family,
    wait_for,
)
from tests.fullstack.webdriver import CONTROL, ELEMENT_KEY, ENTER, ChromeDriver, WebDriverError

pytestmark = [pytest.mark.services, pytest.mark.airflow]

CHOSEN_MODEL = "claude-sonnet-4-6"  # not the DAG's default: the form's choice must reach the batch
ROW_LIMIT = 7  # of the day's 12 tickets
RUN_TIMEOUT = 240.0


@pytest.fixture(scope="session")
def chromium() -> Chromium:
    """Chromium and chromedriver from Debian's packages, installed with apt-get on first use."""
    try:
        return ensure_chromium(log_path=ARTIFACTS.parent / "apt-chromium.log")
    except ChromiumUnavailable as exc:
        if os.environ.get("REQUIRE_SERVICES") == "1":
            pytest.fail(f"{exc}, and REQUIRE_SERVICES=1 requires the browser test to run")
        pytest.skip(
            f"{exc}; install chromium and chromium-driver, or set REQUIRE_SERVICES=1 to make this a failure"
        )


# chromium comes first: without a browser the stack is not started for nothing.
def test_trigger_form_in_the_ui_runs_the_workload(chromium: Chromium, fullstack: AirflowStack):
    stack = fullstack
    with ChromeDriver(chromium, ARTIFACTS) as driver:
        try:
            with stack.phase("browser: log in and trigger with Params"):
                run_id = _log_in_and_trigger(driver, stack)
            with stack.phase("browser: watch the run until it succeeds"):
                state = _watch_run_page(driver)
            driver.save_screenshot(ARTIFACTS / "browser-run-success.png")
        finally:
            # Whatever the page shows at the end (the success, or where it got stuck).
            driver.save_screenshot(ARTIFACTS / "browser-last-page.png")
    assert state == "Success", f"the run page shows {state}: {stack.describe_run(BROWSER_DAG, run_id)}"

    # What the form sent is what ran: the run's conf, the batch's model, the row limit.
    run = stack.api.dag_run(BROWSER_DAG, run_id)
    assert run["state"] == "success" and run["run_type"] == "manual"
    assert run["triggering_user_name"] == ADMIN_USER
    conf = run["conf"]
    assert (conf["model"], conf["row_limit"]) == (CHOSEN_MODEL, ROW_LIMIT), conf
    assert (conf["window_start"], conf["window_end"]) == ("2026-11-14", "2026-11-15"), conf
    prefix = support_ticket_key(0).split("-")[0] + "-%"
    rows = stack.warehouse_query(
        "SELECT record_key, model, category FROM support_ticket_triage_results WHERE record_key LIKE %s",
        (prefix,),
    )
    assert len(rows) == ROW_LIMIT, rows
    assert {model_family(model) for _, model, _ in rows} == {CHOSEN_MODEL}
    ledger = stack.warehouse_query(
        "SELECT status, count(*) FROM claude_batch_ledger WHERE workload = %s GROUP BY status", (BROWSER_DAG,)
    )
    assert dict(ledger) == {"succeeded": ROW_LIMIT}


def _log_in_and_trigger(driver: ChromeDriver, stack: AirflowStack) -> str:
    """The DAG page redirects to the login form; then the Trigger button's form, filled in."""
    driver.get(f"{stack.api_url}/dags/{BROWSER_DAG}")
    driver.find("input[name=username]").send_keys(ADMIN_USER)
    driver.find("input[name=password]").send_keys(stack.password)
    driver.find("button[type=submit]").click()

    driver.find("[data-testid=trigger-dag-button]", timeout=60).click()
    driver.find("input[name=element_model]")  # the Params form is rendered
    driver.save_screenshot(ARTIFACTS / "browser-trigger-form.png")

    # model: a searchable select; type part of the name and take the match.
    model = driver.execute_for_element(
        "return document.querySelector('input[name=element_model]')"
        ".parentElement.querySelector('input[role=combobox]')"
    )
    model.click()
    model.send_keys("sonnet")
    model.send_keys(ENTER)
    # row_limit: a number field; its input is the one its +/- buttons control.
    row_limit = driver.execute_for_element(
        "return document.getElementById(document.getElementById("
        "'number-input:element_row_limit:inc').getAttribute('aria-controls'))"
    )
    row_limit.click()
    row_limit.send_keys(CONTROL + "a")
    row_limit.send_keys(str(ROW_LIMIT))
    # window_start / window_end: date inputs, typed as a person types them (en-US: mm dd yyyy).
    for field, day in (("window_start", BROWSER_DAY), ("window_end", BROWSER_DAY.replace(day=15))):
        date_input = driver.find(f"#element_{field}")
        date_input.click()
        date_input.send_keys(f"{day:%m%d%Y}")

    shown = driver.execute(
        "const rowLimit = document.getElementById(document.getElementById("
        "'number-input:element_row_limit:inc').getAttribute('aria-controls'));"
        "return [document.querySelector('input[name=element_model]').value, rowLimit.value,"
        " document.getElementById('element_window_start').value,"
        " document.getElementById('element_window_end').value];"
    )
    assert shown == [CHOSEN_MODEL, str(ROW_LIMIT), "2026-11-14", "2026-11-15"], f"the form holds {shown}"
    driver.execute("document.querySelector('[data-testid=trigger-dag-submit]').scrollIntoView()")
    driver.save_screenshot(ARTIFACTS / "browser-trigger-form-filled.png")
    driver.find("[data-testid=trigger-dag-submit]").click()

    # The UI opens the new run's page.
    marker = f"/dags/{BROWSER_DAG}/runs/"
    url = wait_for("the new run's page", lambda: marker in (u := driver.current_url) and u, 60)
    return unquote(url.split(marker, 1)[1].split("?")[0].split("/")[0])


def _watch_run_page(driver: ChromeDriver) -> str:
    """The state badge in the run's header until the run ends (reloading now and then, as a person would)."""
    deadline = time.monotonic() + RUN_TIMEOUT
    last_reload = time.monotonic()
    state = ""
    while time.monotonic() < deadline:
        badges = driver.find_all("[data-testid=header-card] [data-testid=state-badge]")
        try:
            state = badges[0].text.strip() if badges else ""
        except WebDriverError:  # the UI re-drew the badge between finding and reading it (stale)
            state = ""
        if state in ("Success", "Failed"):
            return state
        if time.monotonic() - last_reload > 20:
            driver.get(driver.current_url)
            last_reload = time.monotonic()
        time.sleep(1.0)
    raise StackError(f"the run page still shows {state or 'no state'} after {RUN_TIMEOUT:.0f} s")


# -- the Claude Batches page ------------------------------------------------------------------

PAGE_DAY = BROWSER_DAY.replace(day=15)  # a day of its own: one ticket staging refuses
REFUSED_KEY = f"S{PAGE_DAY:%m%d}-000"


def test_the_claude_batches_page_shows_cost_and_dead_items_and_requeues_for_the_admin_only(
    chromium: Chromium, fullstack: AirflowStack
):
    """After the trigger-form test's run (its cost and outcomes), a run over a day whose only ticket
    staging refuses leaves a dead item; the viewer may see it but is refused the requeue, the admin
    finds it by its reason, requeues it, and the ledger says who and when."""
    import psycopg2

    stack = fullstack
    history = stack.warehouse_query(
        "SELECT run_id, succeeded, cost_usd FROM claude_batch_runs WHERE workload = %s ORDER BY recorded_at",
        (BROWSER_DAG,),
    )
    assert history, "the trigger-form test's run (run first in this module) left no run history"
    first_run, first_succeeded, first_cost = history[0]
    conn = psycopg2.connect(stack.warehouse_dsn)
    with conn, conn.cursor() as cur:  # an ANSI escape in the text: staging refuses the row
        cur.execute(
            "INSERT INTO support_tickets VALUES (%s, 'email', 'Alert', %s, %s)",
            (REFUSED_KEY, "\x1b[31mred alert\x1b[0m about my invoice", PAGE_DAY + timedelta(hours=1)),
        )
    conn.close()
    with stack.phase("page: a run that leaves a dead item"):
        # The first run's model: the same prompt version, so the page lists its items as current.
        window = {
            "window_start": f"{PAGE_DAY:%Y-%m-%d}",
            "window_end": f"{PAGE_DAY + timedelta(days=1):%Y-%m-%d}",
        }
        run = stack.api.trigger(BROWSER_DAG, {"model": CHOSEN_MODEL, **window})
        assert (
            stack.wait_for_run(BROWSER_DAG, run["dag_run_id"], timeout=RUN_TIMEOUT)["state"] == "success"
        ), stack.describe_run(BROWSER_DAG, run["dag_run_id"])
    with ChromeDriver(chromium, ARTIFACTS) as driver:
        try:
            with stack.phase("page: the viewer is refused the requeue"):
                _open_page_as(driver, stack, VIEWER_USER, stack.viewer_password)
                _open_workload(driver)
                assert driver.find(f"tr[data-key='{REFUSED_KEY}']")
                assert driver.find("#requeue-button").attribute("disabled") is True
                assert "needs edit access to DAG support_ticket_triage" in driver.find("#requeue-denied").text
                # The button is only the page's courtesy: the server refuses the form itself.
                driver.execute(
                    "document.querySelector(\"input[name=key][value='" + REFUSED_KEY + "']\").checked = true;"
                    "const b = document.getElementById('requeue-button'); b.disabled = false; b.click();"
                )
                refused = driver.find("[data-error='403']")
                assert "edit access to DAG support_ticket_triage" in refused.text
                driver.save_screenshot(ARTIFACTS / "page-viewer-refused.png")
            with stack.phase("page: the admin finds the dead item and requeues it"):
                driver.command("POST", "/frame/parent", {})
                driver.command("DELETE", "/cookie")
                _open_page_as(driver, stack, ADMIN_USER, stack.password)
                driver.save_screenshot(ARTIFACTS / "page-front.png")
                _open_workload(driver)
                row = driver.find(f"tr[data-run-id='{first_run}']")
                shown = _data(driver, f"tr[data-run-id='{first_run}']")
                assert (
                    shown["succeeded"] == str(first_succeeded) == "7"
                    and shown["dead"] == shown["invalid"] == "0"
                )
                assert float(shown["cost"]) == pytest.approx(float(first_cost)) and first_cost > 0
                assert f"${float(first_cost):,.4f}" in row.text  # the cost as the page shows it
                assert driver.find("svg.chart")
                driver.save_screenshot(ARTIFACTS / "page-workload.png")
                search = driver.find("input[type=search]")
                search.send_keys("CONTROL character")
                search.send_keys(ENTER)
                dead = wait_for("the search's result", lambda: _dead_rows(driver, "control"), 30)
                assert [key for key, _ in dead] == [REFUSED_KEY]
                assert "control character U+001B" in dead[0][1]
                driver.execute("document.getElementById('requeue-form').scrollIntoView()")
                driver.save_screenshot(ARTIFACTS / "page-dead-item.png")
                driver.find(f"input[name=key][value='{REFUSED_KEY}']").click()
                driver.find("#requeue-button").click()
                driver.find("[data-requeued]")
                assert _data(driver, "[data-requeued]") == {"requeued": "1", "requeuedBy": ADMIN_USER}
                driver.save_screenshot(ARTIFACTS / "page-requeued.png")
            status, by, at, reason = stack.warehouse_query(
                "SELECT status, requeued_by, requeued_at, last_error FROM claude_batch_ledger "
                "WHERE workload = %s AND record_key = %s", (BROWSER_DAG, REFUSED_KEY),
            )[0]  # fmt: skip
            assert (status, by) == ("retry", ADMIN_USER) and at is not None and "U+001B" in reason
            # A run's link opens Airflow's own run page (in the top window, not in the frame).
            driver.find(f"tr[data-run-id='{first_run}'] a[data-airflow]").click()
            driver.command("POST", "/frame/parent", {})
            wait_for("Airflow's run page", lambda: f"/dags/{BROWSER_DAG}/runs/" in driver.current_url, 30)
            assert (
                driver.find("[data-testid=header-card] [data-testid=state-badge]").text.strip() == "Success"
            )
            driver.save_screenshot(ARTIFACTS / "page-run-link.png")
        finally:
            driver.save_screenshot(ARTIFACTS / "page-last.png")


def _open_page_as(driver: ChromeDriver, stack: AirflowStack, user: str, password: str) -> None:
    """Log in (the page's URL sends a new session to the login form) and open the page from the navigation."""
    driver.get(f"{stack.api_url}/plugin/claude-batch")
    driver.find("input[name=username]").send_keys(user)
    driver.find("input[name=password]").send_keys(password)
    driver.find("button[type=submit]").click()
    driver.find_by_text("a", "Claude Batches", timeout=60).click()  # the navigation's entry
    frame = driver.find("iframe[title='Claude Batches']", timeout=60)
    driver.command("POST", "/frame", {"id": {ELEMENT_KEY: frame.id}})
    assert driver.find("[data-user]").text == user


def _open_workload(driver: ChromeDriver) -> None:
    driver.find(f"tr[data-workload='{BROWSER_DAG}'] a").click()
    driver.find("[data-workload-name]")


def _data(driver: ChromeDriver, css: str) -> dict[str, str]:
    """The data-* attributes of the element ``css`` finds."""
    return driver.execute("return Object.assign({}, document.querySelector(arguments[0]).dataset);", css)


def _dead_rows(driver: ChromeDriver, searched: str) -> list[tuple[str, str]] | None:
    """The dead-item rows (key, reason) once the page shows the search's results."""
    if searched not in driver.execute("return location.search;").lower():  # the frame's own URL
        return None
    return driver.execute(
        "return [...document.querySelectorAll('tr[data-key]')]"
        ".map(r => [r.dataset.key, r.querySelector('[data-reason]').textContent]);"
    )
