"""The dashboard's studies pages (``#/studies``, ``#/studies/{id}``) in a real headless Chromium against a real API
server and a real worker process that runs a real tiny study (gfl_tiny on six 128x96 images, one epoch; the plain
student and two methods, as ordinary jobs).

The study is submitted when the module starts, so it runs while the other tests use the page. Checked: the list
shows it with its progress and the form renders (no console errors); a bad field gets the server's own 4xx message
beside the form, and nothing is created; a study started through the form opens its page with its jobs, and its
cancel button ends every one of them; the running study's page follows its jobs until the report exists, then shows
the table (mean ± std, the paired gain with its 95% interval and verdict), the chart (SVG bars with error bars),
the recommended model's link (which opens that model's page) and the report files' links. Screenshots go to the test's
``tmp_path`` (``bench/results/ui/studies-*.png`` hold copies).

Skipped, with the reason, where Chromium, chromedriver, Selenium or torch are missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.api_server import coco_zip
from tests.service_fixtures import WorkerProcess
from tests.test_studies import schedule
from tests.ui_browser import Page, browser, live_service  # noqa: F401  (browser: this module's Chromium, a fixture)

SEEDS = 1
METHODS = ["ld", "crosskd"]
TINY_SCHEDULE = schedule(epochs=1)  # the backend's own tests' tiny schedule: 128x96, no loader processes
REPORT_TIMEOUT_S = 300  # the worker runs (1 + len(METHODS)) * SEEDS jobs one after the other on a shared CPU


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, WorkerProcess]]:
    yield from live_service(tmp_path_factory.mktemp("ui_studies"))


@pytest.fixture(scope="module")
def http(live: tuple[Any, WorkerProcess]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live[0].url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def world(live: tuple[Any, WorkerProcess], http: httpx.Client) -> dict[str, Any]:
    """A dataset, an uploaded (untrained) gfl_tiny teacher checkpoint, and a tiny study already queued."""
    from distill.checkpoint import atomic_save, build_detector, detector_state

    srv = live[0]
    zip_path = coco_zip(srv.work / "shapes.zip", n=6, size=(128, 96), classes=("cat", "dog"))
    with open(zip_path, "rb") as f:
        r = http.post("/v1/datasets", files={"file": ("shapes.zip", f, "application/zip")}, data={"name": "shapes"})
    assert r.status_code == 201, r.text
    dataset = r.json()["id"]
    teacher = srv.work / "teacher.pt"
    atomic_save(detector_state(build_detector("gfl_tiny", 2, ["cat", "dog"])), teacher)
    with open(teacher, "rb") as f:
        r = http.post("/v1/checkpoints", files={"file": ("teacher.pt", f)})
    assert r.status_code == 201, r.text
    checkpoint = r.json()["id"]
    r = http.post("/v1/studies", json={"name": "tiny study", "dataset": dataset, "teacher": {"checkpoint": checkpoint},
                                       "student": {"arch": "gfl_tiny"}, "schedule": TINY_SCHEDULE,
                                       "methods": METHODS, "seeds": SEEDS})  # fmt: skip
    assert r.status_code == 202, r.text
    return {"dataset": dataset, "checkpoint": checkpoint, "study": r.json()["id"]}


@pytest.fixture(scope="module")
def page(browser: Any, live: tuple[Any, WorkerProcess], tmp_path_factory: pytest.TempPathFactory) -> Page:  # noqa: F811
    return Page(browser, live[0].url, tmp_path_factory.mktemp("screenshots_studies"))


def _fill_form(page: Page, world: dict[str, Any], **fields: str) -> None:
    """The form with the test's teacher (a checkpoint id) and ``fields`` typed into the inputs of those ids."""
    page.open("/studies", "#study-form")
    page.find("#study-teacher-checkpoint").send_keys(world["checkpoint"])
    for name, value in fields.items():
        box = page.find(f"#study-{name}")
        box.clear()
        box.send_keys(value)


def test_list_and_form(page: Page, world: dict[str, Any]) -> None:
    page.open("/studies", f"#studies-table tr[data-study='{world['study']}']")
    row = page.find(f"tr[data-study='{world['study']}']").text
    total = (1 + len(METHODS)) * SEEDS
    assert "tiny study" in row and f"of {total} jobs ended" in row, row
    assert "student alone" in row and all(m in row for m in METHODS), row
    assert page.find("#study-dataset").get_attribute("value") == world["dataset"]
    checked = [c.get_attribute("value") for c in page.all("#study-form input[name='method']") if c.is_selected()]
    assert checked and set(checked) <= {"ld", "crosskd", "bckd", "tbr", "fitnets"}
    assert page.find("#study-seeds").get_attribute("value") == "3"
    page.shot("studies-list", whole_page=True)
    page.assert_no_console_errors()


@pytest.mark.parametrize(("field", "value", "body"), [
    ("arch", "gfl_nope", {"student": {"arch": "gfl_nope"}, "seeds": 3}),
    ("seeds", "11", {"seeds": 11}),
])  # fmt: skip
def test_bad_field_shows_the_servers_message(
    page: Page, world: dict[str, Any], http: httpx.Client, field: str, value: str, body: dict[str, Any]
) -> None:
    before = [s["id"] for s in http.get("/v1/studies").json()["studies"]]  # the running study's fields change
    _fill_form(page, world, **{field: value})
    page.find("#study-submit").click()
    shown = page.wait("#study-error .error").text
    # The same study sent by a plain client: the page shows the server's own message and status.
    checked = [c.get_attribute("value") for c in page.all("#study-form input[name='method']") if c.is_selected()]
    r = http.post("/v1/studies", json={"dataset": world["dataset"], "teacher": {"checkpoint": world["checkpoint"]},
                                       "methods": checked, **body})  # fmt: skip
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert error["message"] in shown and str(r.status_code) in shown, (shown, error)
    assert field in shown  # the message names the field that was wrong
    assert page.driver.current_url.endswith("#/studies")  # the form stays, with what the user typed
    assert page.find(f"#study-{field}").get_attribute("value") == value
    assert [s["id"] for s in http.get("/v1/studies").json()["studies"]] == before  # nothing was created
    page.assert_no_console_errors(allowed=(f"{r.status_code}",))  # the browser reports the refused call itself


def test_cancel_from_the_page(page: Page, world: dict[str, Any], http: httpx.Client) -> None:
    _fill_form(page, world, name="to cancel", arch="gfl_tiny", seeds="1", epochs="1", batch="4")
    for box in page.all("#study-form input[name='method']"):
        if box.is_selected() != (box.get_attribute("value") == "ld"):
            box.click()
    page.find("#study-submit").click()
    page.until(lambda: "#/studies/st_" in page.driver.current_url, "the new study's page")
    study = page.driver.current_url.rsplit("/", 1)[1]
    page.wait("#study-jobs-table")
    rows = {r.get_attribute("data-job"): r.text for r in page.all("#study-jobs-table tbody tr")}
    jobs = http.get(f"/v1/studies/{study}").json()["jobs"]
    assert set(rows) == {j["job_id"] for j in jobs} and len(rows) == 2, rows  # the student alone and ld
    assert any(t.startswith("student alone") for t in rows.values()) and any(t.startswith("ld") for t in rows.values())
    assert http.get(f"/v1/jobs/{jobs[0]['job_id']}").json()["study_id"] == study

    page.find("#cancel-study").click()
    page.until(lambda: page.find("#study-state").text == "cancelled", "the study cancelled", timeout=60)
    assert not page.find("#cancel-study").is_displayed()
    states = {j["job_id"]: http.get(f"/v1/jobs/{j['job_id']}").json()["state"] for j in jobs}
    assert set(states.values()) == {"cancelled"}, states
    page.until(
        lambda: all("cancelled" in r.text for r in page.all("#study-jobs-table tbody tr")), "every job shown cancelled"
    )
    page.assert_no_console_errors()


def test_study_page_follows_its_jobs_to_the_report(
    page: Page, world: dict[str, Any], http: httpx.Client, live: tuple[Any, WorkerProcess]
) -> None:
    study = world["study"]
    page.open(f"/studies/{study}", "#study-jobs-table")
    jobs = http.get(f"/v1/studies/{study}").json()["jobs"]
    shown = [r.get_attribute("data-job") for r in page.all("#study-jobs-table tbody tr")]
    assert shown == [j["job_id"] for j in jobs] and len(shown) == (1 + len(METHODS)) * SEEDS
    for j in jobs:  # each job links to its page
        assert page.find(f"tr[data-job='{j['job_id']}'] a").get_attribute("href").endswith(f"#/jobs/{j['job_id']}")
    was_running = page.find("#study-state").text == "running"
    page.driver.execute_script("window.studyPageMark = 1")  # gone if anything reloaded the page
    seen: set[str] = set()

    def reported() -> bool:
        seen.add(page.find("#study-progress").text)
        return bool(page.all("#study-table"))

    try:
        page.until(reported, "the study's report", timeout=REPORT_TIMEOUT_S)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{live[1].log_tail()}") from None
    assert page.driver.execute_script("return window.studyPageMark") == 1
    if was_running:  # the page followed the jobs: its progress line changed while it was open
        assert len(seen) >= 2, seen
    s = http.get(f"/v1/studies/{study}").json()
    report = s["report"]
    assert s["state"] in ("succeeded", "failed") and page.find("#study-state").text == s["state"]
    assert f"{len(jobs)} of {len(jobs)} jobs ended" in page.find("#study-progress").text

    # The table: one row per report row, mean ± std in percent, the gain's verdict as the server judged it.
    rows = {r.get_attribute("data-row"): r.text for r in page.all("#study-table tbody tr")}
    assert list(rows) == [r["row"] for r in report["rows"]] == ["student alone", *METHODS], rows
    for r in report["rows"]:
        text = rows[r["row"]]
        if r["AP"] and r["AP"]["mean"] is not None:
            assert f"{100 * r['AP']['mean']:.1f} ± {100 * r['AP']['std']:.1f} %" in text, (text, r["AP"])
        want = {True: "significant (interval excludes 0)", False: "inside noise (interval includes 0)", None: None}
        if want[r["significant"]]:
            assert want[r["significant"]] in text, (text, r)
            g = r["gain"]  # the page shows the interval it judges by
            assert f"± {100 * g['half_width']:.1f}" in text and f"{abs(100 * g['high']):.1f}]" in text, (text, g)
        elif r["gain"]:  # one seed: a gain, but no interval to judge it by
            assert "no interval to judge by" in text, (text, r)
    assert "baseline" in rows["student alone"]

    # The chart: a bar and an error bar per row with a result, drawn in SVG.
    measured = [r for r in report["rows"] if r["AP"] and r["AP"]["mean"] is not None]
    assert len(page.all("#study-chart svg rect.bar-rect")) == len(measured) >= 1
    assert len(page.all("#study-chart svg g.error-bar line")) == 3 * len(measured)

    # Files, and the recommended model: highlighted, linked, and its page opens.
    assert page.find("#report-md").get_attribute("href").endswith(report["report_md"])
    assert page.find("#report-png").get_attribute("href").endswith(report["report_png"])
    assert http.get(report["report_md"]).headers["content-type"].startswith("text/markdown")
    assert http.get(report["report_png"]).content[:8] == b"\x89PNG\r\n\x1a\n"
    rec = report["recommended"]
    assert rec is not None, report
    assert page.find("#recommended-model").get_attribute("href").endswith(f"#/models/{rec['model_id']}")
    assert "recommended" in page.find(f"#study-table tr[data-row='{rec['row']}']").get_attribute("class")
    assert not page.all("#study-failures") if not report["failures"] else page.all("#study-failures")
    page.shot("studies-report", whole_page=True)
    page.assert_no_console_errors()

    page.driver.set_window_size(390, 844)  # a phone: the wide table scrolls inside its card, the page does not
    try:
        assert page.driver.execute_script("return document.documentElement.scrollWidth") <= 390
    finally:
        page.driver.set_window_size(1280, 900)

    page.find("#recommended-model").click()
    page.wait("#drop-zone")  # the model's page, with its "Try it"
    assert rec["model_id"] in page.text()
    page.open(f"/jobs/{rec['job_id']}", "#job-study")  # a job of a study links back to it
    assert page.find("#job-study").get_attribute("href").endswith(f"#/studies/{study}")
    page.assert_no_console_errors()
