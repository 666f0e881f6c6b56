"""A person's path through the Airflow UI in real Chromium: log in, trigger with Params, see it succeed.

Debian's chromium and chromium-driver are installed by the set-up when missing (apt; nothing
downloads a browser). chromedriver is driven through its W3C WebDriver HTTP API. The stack is the
full-stack tests' (started once per session); the screenshots stay in test-artifacts/fullstack/.
"""

from __future__ import annotations

import os
import time
from urllib.parse import unquote

import pytest

from tests.fullstack.chromium import Chromium, ChromiumUnavailable, ensure_chromium
from tests.fullstack.conftest import BROWSER_DAG, BROWSER_DAY, support_ticket_key
from tests.fullstack.stack import ADMIN_USER, ARTIFACTS, AirflowStack, StackError, model_family, wait_for
from tests.fullstack.webdriver import CONTROL, ENTER, ChromeDriver, WebDriverError

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
