"""The web dashboard (``GET /ui``) in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``,
driven by Selenium) against a real API server (uvicorn, SQLite, Redis, ONNX Runtime; no torch in its process).

One browser for the module. The data: a dataset uploaded through the page, jobs submitted through the REST API
(the distillation straight into the store: its teacher would need kept PyTorch weights) whose run is written into
the store as a worker writes it (lease, progress, history rows; no worker process
runs, so a job stays where the test puts it), a published model (``publish_test_model``). Checked: every page
renders that data; the job page's curves gain points live while records arrive (server-sent events); cancel
works; the distillation page draws figure 4; "Try it" draws boxes for an uploaded image; the key prompt, a
wrong key and a right key when ``LDD_API_KEYS`` is set; no console errors anywhere; each page loads in under
1 s with 200 jobs in the store. Screenshots of every page go to the test's ``tmp_path``
(``bench/results/ui`` holds copies).

Skipped, with the reason, where Chromium, chromedriver or Selenium are missing (``scripts/test.sh`` installs
them with apt when it can).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from core import history
from core.store import Store
from tests import ui_browser
from tests.api_server import coco_zip, png_bytes, publish_test_model, serve_api
from tests.service_fixtures import WorkerProcess
from tests.ui_browser import Page, live_service

browser = ui_browser.browser  # this module's Chromium (a module-scoped fixture)

PAGE_LOAD_LIMIT_S = 1.0  # the budget for a page with 200 jobs in the store
KEYS = {"a": "key-of-team-a", "b": "key-of-team-b"}

# --------------------------------------------------------------------------------------------------
# The open service


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    srv = serve_api(tmp_path_factory.mktemp("ui"), LDD_MAX_UPLOAD_BYTES=str(5_000_000))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def store(server: Any) -> Iterator[Store]:
    s = Store(server.store_url)
    yield s
    s.close()


@pytest.fixture(scope="module")
def page(browser: Any, server: Any, tmp_path_factory: pytest.TempPathFactory) -> Page:
    return Page(browser, server.url, tmp_path_factory.mktemp("screenshots"))


def _spec(dataset: str, kind: str = "train", **over: Any) -> dict[str, Any]:
    spec = {"kind": kind, "dataset": dataset, "student": {"arch": "gfl_tiny"},
            "schedule": {"epochs": 2, "batch_size": 2, "image_size": [128, 96]}, **over}  # fmt: skip
    return spec


def _record(it: int, total: int = 40, phase: str = "train", **losses: float) -> dict[str, Any]:
    """A progress record as ``distill.train`` writes it."""
    return {"phase": phase, "epoch": 1 + it * 2 // (total + 1), "epochs": 2, "iter": it, "total_iters": total,
            "losses": losses or {"loss_cls": 1.2 / (1 + it / 8), "loss_bbox": 0.8 / (1 + it / 16),
                                 "loss_dfl": 0.5 / (1 + it / 20)},
            "lr": 0.01 * min(1.0, (it + 1) / 5), "images_per_s": 12.5, "eta_s": (total - it) * 0.4,
            "resumed_from_iter": None, "time": time.time()}  # fmt: skip


def _relay(store: Store, job_id: str, owner: str, record: dict[str, Any]) -> None:
    """What the worker's progress relay does with one record: the job's progress, and its history row."""
    assert store.heartbeat(job_id, owner, record)
    history.append(store, job_id, 1, record)


def _finish(store: Store, job_id: str, metrics: dict[str, Any], records: int = 10) -> None:
    owner = f"test-worker:{job_id}"
    assert store.claim(job_id, owner, 600) is not None
    for i in range(records):
        _relay(store, job_id, owner, _record(4 * i))
    done = _record(40, phase="done", **metrics["bbox"])
    _relay(store, job_id, owner, done)
    assert store.finish(job_id, owner, "succeeded", metrics=metrics, progress=done) is not None


DIAGNOSTICS = {
    "before": {"strides": [8, 16, 32, 64, 128], "cls_l1": [0.21, 0.18, 0.16, 0.15, 0.14],
               "box_l1": [0.92, 0.88, 0.81, 0.77, 0.74], "cls_l1_mean": 0.2, "box_l1_mean": 0.9, "images": 4},
    "after": {"strides": [8, 16, 32, 64, 128], "cls_l1": [0.09, 0.08, 0.07, 0.07, 0.06],
              "box_l1": [0.41, 0.37, 0.35, 0.33, 0.31], "cls_l1_mean": 0.085, "box_l1_mean": 0.39, "images": 4},
}  # fmt: skip


@pytest.fixture(scope="module")
def world(server: Any, store: Store, page: Page) -> dict[str, Any]:
    """A dataset uploaded through the page; a plain and a distilled student that succeeded, a running job, a
    queued one and a published model."""
    zip_path = coco_zip(server.work / "shapes.zip", n=6, size=(160, 120), classes=("cat", "dog"))
    page.open("/datasets", "#upload-button")
    page.find("#dataset-file").send_keys(str(zip_path))
    page.find("#dataset-name").send_keys("shapes")
    page.find("#upload-button").click()
    page.until(lambda: "/datasets/ds_" in page.driver.current_url, "the uploaded dataset's page")
    ds = page.driver.current_url.rsplit("/", 1)[1]
    http = httpx.Client(base_url=server.url, timeout=30)

    def submit(spec: dict[str, Any]) -> str:
        r = http.post("/v1/jobs", json=spec)
        assert r.status_code == 202, r.text
        return r.json()["id"]

    model = publish_test_model(server.data_dir, server.store_url, ["cat", "dog"], "mdl_uitestmodel0")
    plain = submit(_spec(ds, name="r18-plain"))
    _finish(store, plain, {"bbox": {"AP": 0.301, "AP50": 0.52, "AP75": 0.29}})
    # A distillation needs a teacher whose PyTorch weights the service keeps (a trained job's): the job goes
    # into the store as the API would have put it, teacher named, and ends as a worker would end it.
    distilled = store.create_job(_spec(ds, "distill", name="r18-from-r50", teacher={"model": "mdl_teacher01"}))[0]["id"]
    _finish(store, distilled, {"bbox": {"AP": 0.334, "AP50": 0.55, "AP75": 0.33},
                               "teacher_bbox": {"AP": 0.402, "AP50": 0.63, "AP75": 0.42},
                               "diagnostics": DIAGNOSTICS})  # fmt: skip
    running = submit(_spec(ds, name="live"))
    owner = "test-worker:live"
    assert store.claim(running, owner, 600) is not None
    for i in range(5):
        _relay(store, running, owner, _record(2 * i))
    queued = submit(_spec(ds, name="waiting"))
    http.close()
    return {"dataset": ds, "plain": plain, "distilled": distilled, "running": running, "owner": owner,
            "queued": queued, "model": model["id"]}  # fmt: skip


def test_dataset_pages(page: Page, world: dict[str, Any]) -> None:
    page.open(f"/datasets/{world['dataset']}", "#samples img[src^='blob:']")
    page.until(
        lambda: (
            len(
                [
                    i
                    for i in page.all("#samples img")
                    if page.driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)
                ]
            )
            == 6
        ),
        "six sample images drawn",
    )
    text = page.text()
    assert "shapes" in text and "cat, dog" in text and "train 5 · val 1" in text
    assert "Problems found at upload (0)" in text
    page.shot("dataset")
    page.open("/datasets", "#datasets-table")
    assert "shapes" in page.find("#datasets-table").text
    page.shot("datasets")
    page.assert_no_console_errors()


def test_job_list_and_live_job_page(page: Page, store: Store, world: dict[str, Any]) -> None:
    page.open("/jobs", "#jobs-table")
    rows = page.all("#jobs-table tbody tr")
    assert len(rows) == 4
    live = page.find(f"tr[data-job='{world['running']}']").text
    assert "running" in live and "iteration 8/40" in live and "ETA" in live
    page.shot("jobs")

    page.open(f"/jobs/{world['running']}", "#loss-chart canvas")
    assert "iteration 8/40" in page.find("#job-progress").text
    assert "5 points" in page.find("#job-progress").text
    # New records arrive while the page is open: the curve gains them over server-sent events.
    for it in (10, 12, 14):
        _relay(store, world["running"], world["owner"], _record(it))
        page.until(lambda it=it: f"iteration {it}/40" in page.find("#job-progress").text, f"iteration {it}")
    page.until(lambda: "8 points" in page.find("#job-progress").text, "8 points on the curve")
    legend = page.find("#loss-chart").text
    assert "loss_cls" in legend and "loss_bbox" in legend
    assert page.all("#lr-chart canvas") and "Learning rate" in page.find("#lr-chart").text
    page.shot("job-running")

    # Cancel: the job has a worker (the test holds its lease), so the cancel is requested and shown.
    page.find("#cancel-job").click()
    page.until(lambda: page.find("#cancel-job").text == "Cancelling…", "the cancel to be requested")
    assert store.get_job(world["running"])["cancel_requested"] is True
    # The worker sees it and stops the job: the page follows to the end.
    assert store.finish(world["running"], world["owner"], "cancelled", error="cancelled by request")
    page.until(lambda: "cancelled" in page.find("#job-state").text, "the cancelled state")
    assert "cancelled by request" in page.find("#job-error").text and not page.find("#cancel-job").is_displayed()

    # A queued job is cancelled at once.
    page.open(f"/jobs/{world['queued']}", "#cancel-job")
    page.find("#cancel-job").click()
    page.until(lambda: "cancelled" in page.find("#job-state").text, "the queued job cancelled")
    assert store.get_job(world["queued"])["state"] == "cancelled"

    page.open(f"/jobs/{world['distilled']}", "#evaluations-table")
    evaluations = page.find("#evaluations-table").text
    assert "33.4 %" in evaluations and "55.0 %" in evaluations
    assert "10 points" in page.find("#job-progress").text
    page.shot("job-succeeded")
    page.assert_no_console_errors()


def test_distillation_page(page: Page, world: dict[str, Any]) -> None:
    page.open("/distill", "#ap-table")
    table = page.find("#ap-table").text
    assert "40.2 %" in table and "30.1 %" in table and "33.4 %" in table and "(+3.3)" in table
    assert page.find("#pick-plain").get_attribute("value") == world["plain"]  # the same dataset and student
    for metric in ("cls_l1", "box_l1"):
        bars = page.all(f".fig4[data-metric='{metric}'] rect.bar-rect")
        assert len(bars) == 10, metric  # 5 levels, before and after
    page.shot("distillation")
    page.assert_no_console_errors()


def test_models_page_and_try_it(page: Page, server: Any, world: dict[str, Any]) -> None:
    page.open("/models", "#models-table")
    assert world["model"] in page.find("#models-table").text
    page.shot("models")
    page.open(f"/models/{world['model']}", "#drop-zone")
    sha = json.loads((server.data_dir / "models" / world["model"] / "model.json").read_text())["sha256"]
    assert page.find("#model-sha").text == sha
    assert page.find("#onnx-download").get_attribute("href").endswith(f"/v1/models/{world['model']}/onnx")
    image = server.work / "photo.png"
    image.write_bytes(png_bytes((320, 240)))
    page.find("#try-file").send_keys(str(image))
    page.until(lambda: int(page.find("#try-canvas").get_attribute("data-boxes") or 0) > 0, "boxes drawn")
    status = page.find("#try-status").text
    assert "ms in the server" in status and "320 × 240 px" in status
    assert page.all("#try-detections tbody tr")
    page.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", page.find("#try-canvas"))
    page.shot("model-try-it")
    page.assert_no_console_errors()


def test_phone_width(page: Page, world: dict[str, Any]) -> None:
    page.driver.set_window_size(390, 844)
    try:
        page.open(f"/jobs/{world['distilled']}", "#loss-chart canvas")
        # Nothing wider than the screen: the page does not scroll sideways.
        assert page.driver.execute_script("return document.documentElement.scrollWidth") <= 390
        page.shot("phone-job")
    finally:
        page.driver.set_window_size(1280, 900)
    page.assert_no_console_errors()


def test_pages_load_in_under_a_second_with_200_jobs(page: Page, store: Store, world: dict[str, Any]) -> None:
    """A benchmark-like check with a generous margin: on this 2-core machine shared with other test runs the
    pages measure well under the 1 s budget (see the report); the assertion is the issue's budget itself."""
    have = len(store.list_jobs(limit=1000))
    for i in range(200 - have):
        job, _ = store.create_job({**_spec(world["dataset"]), "seed": 1000 + i})
        if i % 3 == 0:
            owner = f"bulk:{i}"
            store.claim(job["id"], owner, 600)
            store.heartbeat(job["id"], owner, _record(i % 40))
    assert len(store.list_jobs(limit=1000)) == 200
    timings = {}
    for name, route, ready in [
        ("datasets", "/datasets", "#datasets-table"),
        ("jobs", "/jobs", "#jobs-table tbody tr:nth-child(200)"),
        ("job", f"/jobs/{world['distilled']}", "#evaluations-table"),
        ("distillation", "/distill", ".fig4 rect.bar-rect"),
        ("models", "/models", "#models-table"),
        ("model", f"/models/{world['model']}", "#drop-zone"),
    ]:
        page.open(route, ready)  # warm: the first load of a page also compiles its script
        timings[name] = min(page.open(route, ready) for _ in range(3))
    print("page load seconds with 200 jobs:", {k: round(v, 3) for k, v in timings.items()})
    (page.shots / "timings.json").write_text(json.dumps(timings, indent=2))
    assert max(timings.values()) < PAGE_LOAD_LIMIT_S, timings
    page.shot("jobs-200")
    page.assert_no_console_errors()


def test_ui_serves_without_torch_and_is_static(server: Any) -> None:
    """The page and its files come from the api package (the server runs with torch blocked)."""
    with httpx.Client(base_url=server.url, timeout=10) as http:
        r = http.get("/ui")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        for src in ("/ui/static/js/app.js", "/ui/static/app.css", "/ui/static/vendor/uPlot.iife.min.js"):
            assert src in r.text and http.get(src).status_code == 200, src
        assert (
            http.get("/ui/static/js/app.js")
            .headers["content-type"]
            .startswith(("text/javascript", "application/javascript"))
        )
        assert "/ui" not in http.get("/openapi.json").json()["paths"]  # no API of its own


def test_dataset_samples_endpoint(server: Any, world: dict[str, Any]) -> None:
    """A sample image with its boxes is a JPEG no larger than asked; past the last image is a 404."""
    from PIL import Image

    with httpx.Client(base_url=server.url, timeout=10) as http:
        r = http.get(f"/v1/datasets/{world['dataset']}/samples/5", params={"max_side": 100})
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        img = Image.open(io.BytesIO(r.content))
        assert img.format == "JPEG" and max(img.size) == 100 and img.size == (100, 75)
        r = http.get(f"/v1/datasets/{world['dataset']}/samples/6")
        assert r.status_code == 404 and "has 6 images" in r.json()["error"]["message"]
        assert http.get("/v1/datasets/ds_0000000000000000/samples/0").status_code == 404


# --------------------------------------------------------------------------------------------------
# With API keys


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    srv = serve_api(tmp_path_factory.mktemp("ui_keys"), LDD_API_KEYS=f"team-a:{KEYS['a']},team-b:{KEYS['b']}")
    yield srv
    srv.stop()


def test_with_api_keys(browser: Any, keyed: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    for team in ("a", "b"):
        path = coco_zip(keyed.work / f"{team}.zip", n=3, size=(120, 90))
        with open(path, "rb") as f, httpx.Client(base_url=keyed.url, timeout=30) as http:
            r = http.post(
                "/v1/datasets",
                files={"file": (path.name, f, "application/zip")},
                data={"name": f"team-{team}-data"},
                headers={"Authorization": f"Bearer {KEYS[team]}"},
            )
        assert r.status_code == 201, r.text
        if team == "a":
            ds_a = r.json()["id"]
    page = Page(browser, keyed.url, tmp_path_factory.mktemp("screenshots_keys"))
    page.driver.get(f"{keyed.url}/ui")
    page.driver.execute_script("sessionStorage.clear()")
    page.open("/datasets", "#api-key")
    page.shot("key-prompt")
    page.assert_no_console_errors()  # asking for the key costs no 401

    page.find("#api-key").send_keys("not-a-key")
    page.find("#use-key").click()
    page.wait("#key-error")
    assert "refused" in page.find("#key-error").text
    page.shot("key-refused")
    page.assert_no_console_errors(allowed=("401",))  # the browser reports the refused call itself

    page.find("#api-key").send_keys(KEYS["a"])
    page.find("#use-key").click()
    page.wait("#datasets-table")
    table = page.find("#datasets-table").text
    assert "team-a-data" in table and "team-b-data" not in table  # only the caller's tenant's
    assert page.driver.execute_script("return sessionStorage.getItem('ldd.apiKey')") == KEYS["a"]
    page.open(f"/datasets/{ds_a}", "#samples img[src^='blob:']")  # images fetched with the key
    page.shot("datasets-with-key")
    page.open("/jobs", "#jobs-card .empty")
    assert "ldd jobs submit" in page.text()
    page.shot("jobs-empty")
    page.assert_no_console_errors()


# --------------------------------------------------------------------------------------------------
# With a real worker: tiny models trained and distilled while the page watches


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, WorkerProcess]]:
    yield from live_service(tmp_path_factory.mktemp("ui_live"))


def _tiny(dataset: str, kind: str = "train", **over: Any) -> dict[str, Any]:
    return {"kind": kind, "dataset": dataset, "student": {"arch": "gfl_tiny"}, "seed": 0,
            "schedule": {"epochs": 3, "batch_size": 2, "image_size": [128, 96], "num_workers": 0, "warmup_iters": 2,
                         "lr": 0.01}, **over}  # fmt: skip


def test_real_worker_train_then_distill(
    browser: Any, live: tuple[Any, WorkerProcess], tmp_path_factory: pytest.TempPathFactory
) -> None:
    srv, worker = live
    page = Page(browser, srv.url, tmp_path_factory.mktemp("screenshots_live"))
    zip_path = coco_zip(srv.work / "shapes.zip", n=6, size=(160, 120), classes=("cat", "dog"))
    page.open("/datasets", "#upload-button")
    page.find("#dataset-file").send_keys(str(zip_path))
    page.find("#upload-button").click()
    page.until(lambda: "/datasets/ds_" in page.driver.current_url, "the uploaded dataset's page")
    dataset = page.driver.current_url.rsplit("/", 1)[1]

    def follow_to_the_end(job_id: str) -> list[int]:
        """Open the job's page and watch it until it ends; the number of curve points seen along the way."""
        page.open(f"/jobs/{job_id}", "#loss-chart")
        seen: list[int] = []

        def points() -> int:
            text = page.find("#job-progress").text
            if "points on the curve" in text:
                n = int(text.rsplit(" · ", 1)[1].split()[0])
                if not seen or seen[-1] != n:
                    seen.append(n)
            return seen[-1] if seen else 0

        def ended() -> bool:
            points()
            return page.find("#job-state").text in ("succeeded", "failed", "cancelled")

        try:
            page.until(ended, f"job {job_id} to end", timeout=300)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{worker.log_tail()}") from None
        assert page.find("#job-state").text == "succeeded", (page.find("#job-error").text, worker.log_tail())
        # The state can turn "succeeded" between two reads of the curve; its last points still arrive.
        page.until(lambda: points() >= 3, f"job {job_id}'s last curve points", timeout=20)
        return seen

    with httpx.Client(base_url=srv.url, timeout=30) as http:
        r = http.post("/v1/jobs", json=_tiny(dataset, name="teacher-and-plain"))
        assert r.status_code == 202, r.text
        plain = r.json()["id"]
        seen = follow_to_the_end(plain)
        # The curve grew while the page was open (the points arrived over server-sent events).
        assert len(seen) >= 2 and seen[-1] > seen[0] and seen[-1] >= 3, seen
        page.wait("#evaluations-table")
        page.shot("live-train-done")
        teacher = http.get(f"/v1/jobs/{plain}").json()["model_id"]
        r = http.post("/v1/jobs", json=_tiny(dataset, "distill", name="distilled", teacher={"model": teacher}))
        assert r.status_code == 202, r.text
        distilled = r.json()["id"]
        follow_to_the_end(distilled)
    page.open(f"/distill?job={distilled}", ".fig4 rect.bar-rect")
    assert page.find("#pick-plain").get_attribute("value") == plain
    assert len(page.all(".fig4[data-metric='box_l1'] rect.bar-rect")) == 10
    rows = {r.get_attribute("data-row"): r.text for r in page.all("#ap-table tbody tr")}
    assert all("%" in rows[k] for k in ("teacher", "plain student", "distilled student")), rows
    # Figure 5: the error maps at P5 and P6, drawn by the server over the first validation image.
    drawn = "const i = document.getElementById('figure5'); return !!i && i.complete && i.naturalWidth > 0"
    page.until(lambda: page.driver.execute_script(drawn), "figure 5 drawn on the distillation page")
    with httpx.Client(base_url=srv.url, timeout=30) as http:
        png = http.get(f"/v1/jobs/{distilled}/figure5.png")
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert http.get(f"/v1/jobs/{plain}/figure5.png").status_code == 404  # a plain student has no teacher
    page.shot("live-distillation")
    page.open(f"/models/{teacher}", "#model-metrics")  # AP as the serving runtime measured it, and in training
    assert "measured by the runtime" in page.find("#model-metrics").text
    page.assert_no_console_errors()
