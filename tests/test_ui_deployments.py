"""The dashboard's deployments page and delete actions in Chromium, on a real API server: name a model, see a
switch to a model of other classes refused with the reason, switch, roll back from the history, see a model's
deletion refused while a deployment serves it (the holder named and linked), delete the deployment, then the
model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests import ui_browser
from tests.api_server import publish_test_model, serve_api
from tests.ui_browser import Page

browser = ui_browser.browser  # this module's Chromium (a module-scoped fixture)
MODELS = {"mdl_uideploy0001": ["a", "b"], "mdl_uideploy0002": ["a", "b"], "mdl_uideploy0003": ["a", "b", "c"]}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    srv = serve_api(tmp_path_factory.mktemp("ui_deployments"))
    for model_id, classes in MODELS.items():
        publish_test_model(srv.data_dir, srv.store_url, classes, model_id)  # type: ignore[attr-defined]
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def page(browser: Any, server: Any, tmp_path_factory: pytest.TempPathFactory) -> Page:
    return Page(browser, server.url, tmp_path_factory.mktemp("screenshots_deployments"))


def text_of(page: Page, css: str) -> str:
    """The element's text, or "" while the page re-renders it (an element found just before is then stale)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        return page.find(css).text
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def choose(page: Page, css: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(page.find(css)).select_by_value(value)


def test_deployments_page_switch_rollback_and_delete(server: Any, page: Page) -> None:
    page.open("/deployments", "#deployment-form")
    assert "No deployment yet" in page.text()
    page.find("#deployment-name").send_keys("blood-cells")
    choose(page, "#deployment-model", "mdl_uideploy0001")
    page.find("#deployment-form button[type=submit]").click()
    page.until(lambda: text_of(page, "#current-model") == "mdl_uideploy0001", "the new deployment's page")
    assert not page.find("#rollback").is_enabled()  # version 1: nothing to return to

    choose(page, "#switch-model", "mdl_uideploy0003")  # classes a, b, c: refused, with the reason
    page.find("#switch").click()
    error = page.wait("#deployment-result .error")
    assert "classes differ" in error.text and "409 incompatible_model" in error.text
    assert page.find("#current-model").text == "mdl_uideploy0001"

    choose(page, "#switch-model", "mdl_uideploy0002")
    page.find("#switch").click()
    page.until(lambda: text_of(page, "#current-model") == "mdl_uideploy0002", "the switch")
    rows = [r.text for r in page.all("#history-table tbody tr")]
    assert rows[0].startswith("v2 (current) mdl_uideploy0002") and rows[1].startswith("v1 mdl_uideploy0001"), rows
    page.shot("deployment_history", whole_page=True)
    page.find("#rollback").click()
    page.until(lambda: text_of(page, "#current-model") == "mdl_uideploy0001", "the rollback")
    assert page.find("#history-table tr.current").text.startswith("v1 (current)")
    assert httpx.get(server.url + "/v1/deployments/blood-cells").json()["model_id"] == "mdl_uideploy0001"

    # The model it serves cannot go: the refusal names the deployment, linked to its page.
    page.open("/models/mdl_uideploy0001", "#delete-button")
    page.find("#delete-button").click()  # arms it
    assert "Really delete" in page.find("#delete-button").text
    page.find("#delete-button").click()
    holders = page.wait("#delete-holders")
    assert "default/blood-cells" in holders.text and "409 in_use" in page.find(".delete-result .error").text
    assert holders.find_element("css selector", "a").get_attribute("href").endswith("#/deployments/blood-cells")

    page.open("/deployments/blood-cells", "#delete-button")
    page.find("#delete-button").click()
    page.find("#delete-button").click()
    page.wait("#deployment-form")  # back on the list
    assert "No deployment yet" in page.text()
    page.open("/models/mdl_uideploy0001", "#delete-button")
    page.find("#delete-button").click()
    page.find("#delete-button").click()
    page.wait("#models-table")
    assert "mdl_uideploy0001" not in page.find("#models-table").text
    assert httpx.get(server.url + "/v1/models/mdl_uideploy0001").status_code == 404
    page.assert_no_console_errors(allowed=("409", "Conflict"))
