"""The dashboard (/ui) driven in headless Chromium (Debian's package, never a downloaded browser)
against the real service: upload, start a job, watch it reach 100%, open the gallery, correct a
label, start the child job. Screenshots of the main pages go to the test's directory, or to
docs/screenshots with COFT_UPDATE_SCREENSHOTS=1 (`make screenshots`)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import pytest

from coft import load_proxy_task
from tests.service.helpers import TINY_CONFIG, wait_for

# A few epochs, so that the loss curves are curves; seconds on a CPU with the proxy CLIP.
CONFIG = {**TINY_CONFIG, "phase1": {**TINY_CONFIG["phase1"], "epochs": 4}, "phase2": {"epochs": 3, "batch_size": 8}}
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.browser
# Flags for a closed network: no background connections that the machine would refuse.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("COFT_REQUIRE_BROWSER"):
            pytest.fail(f"no Chromium at {CHROMIUM} (CI installs Debian's chromium package)")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def screenshots(tmp_path) -> Path:
    if os.environ.get("COFT_UPDATE_SCREENSHOTS"):
        folder = REPO / "docs" / "screenshots"
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    return tmp_path


def _observe(page, selector: str, until, timeout: float, what: str) -> list[str]:
    """The texts an element showed, polled, until `until(text)` holds."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = page.locator(selector).inner_text()
        if not seen or seen[-1] != text:
            seen.append(text)
        if until(text):
            return seen
        page.wait_for_timeout(100)
    raise AssertionError(f"timed out waiting for {what}; saw {seen}")


def _task_archive(path: Path, images, folders=None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for i, image in enumerate(images):
            data = io.BytesIO()
            image.save(data, format="PNG")
            archive.writestr(f"{folders[i] + '/' if folders else ''}{i:03d}.png", data.getvalue())
    return path


def _set_number(page, selector: str, value: str) -> None:
    page.fill(selector, value)
    page.dispatch_event(selector, "change")


def test_a_user_adapts_reviews_corrects_and_retrains_in_the_browser(browser, worker_stack, tmp_path, screenshots):
    stack = worker_stack
    key = stack.new_key()
    api = stack.client(key)
    # Shapes on wood, rendered (the shipped proxy CLIP knows shapes): pictures worth looking at.
    task = load_proxy_task("dev-shapes-occluded-wood", num_train=30, num_test=16)
    classes = task.class_names
    archive = _task_archive(tmp_path / "shapes.zip", task.train_images)
    holdout = _task_archive(tmp_path / "shapes-labelled.zip", task.test_images,
                            [classes[label] for label in task.test_labels])
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("console", lambda message: problems.append(message.text) if "Content Security Policy" in message.text
            else None)  # the page's own headers must not block what it does

    # The key, entered once, is kept for the tab: a reload does not ask again.
    page.goto(f"{stack.base_url}/ui/")
    page.fill("input[name=api-key]", key)
    page.click("#key-form button")
    page.reload()
    page.locator("#datasets").wait_for()
    assert page.locator("#key-form").is_hidden()

    # Upload, with a progress bar that ends full; then the labelled holdout.
    for upload, count in ((holdout, 16), (archive, 30)):
        page.set_input_files("input[name=archive]", str(upload))
        page.click("#upload-form button")
        page.locator(".notice").filter(has_text=f"{upload.name}: {count} images").wait_for()
        assert float(page.locator("#upload-progress").evaluate("bar => bar.value")) == 1.0
    dataset, evaluation = api.get("/v1/datasets").json()["items"][:2]
    assert dataset["num_images"] == 30 and evaluation["num_images"] == 16
    page.locator("#dataset-table", has_text=dataset["id"]).wait_for()
    page.screenshot(path=str(screenshots / "datasets.png"), full_page=True)

    # Start a job; its page shows the stage and progress live, up to 100%.
    page.fill("textarea[name=class-names]", ", ".join(classes))
    page.select_option("select[name=dataset]", dataset["id"])
    page.select_option("select[name=eval-dataset]", evaluation["id"])
    page.select_option("select[name=backbone]", "proxy")
    page.click("#job-form details summary")
    page.fill("textarea[name=config]", json.dumps(CONFIG))
    page.click("#job-form button[type=submit]")
    page.wait_for_url("**/ui/#/jobs/job_*")
    job_id = page.url.rsplit("/", 1)[1]
    percents = _observe(page, "#job-percent", lambda text: text == "100%", 300, "the job to reach 100%")
    assert len(percents) >= 3, percents  # seen moving, not only at its ends
    page.locator("#job-status", has_text="succeeded").wait_for()
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["method"] == "coft" and job["backbone"]["model"] == "proxy"
    assert job["eval_dataset_id"] == evaluation["id"] and "final" in job["metrics"]["accuracy"]

    # Each stage's fit to its own training labels, as the job's metrics say.
    rows = page.locator("#fit-table tbody tr")
    assert rows.count() == len(job["metrics"]["fit"]) == 4  # Phase I and Phase II, two models each
    for row, (stage, fit) in zip(rows.all(), job["metrics"]["fit"].items()):
        cells = row.locator("td").all_inner_texts()
        assert cells[0] == stage and cells[1].startswith(f"{100 * fit['agreement']:.1f}%"), cells
        name, last = next((k, v) for k, v in fit["final_loss"].items() if v is not None)
        assert f"{name} {fit['first_loss'][name]:.3f} → {last:.3f}" in cells[3], cells
        assert cells[4] == ("✓" if fit["agreement"] >= fit["threshold"] else "✗")

    # The gallery pages through S*, with every thumbnail loaded from the tenant-checked endpoint.
    thumbs = page.locator("#gallery .thumb")
    thumbs.first.wait_for()
    expected = api.get(f"/v1/jobs/{job_id}/predictions", params={"set": "s_star", "limit": 1}).json()["total"]
    page.locator("#gallery-count", has_text=f"{expected} images").wait_for()
    assert thumbs.count() == expected
    wait_for(lambda: page.evaluate("[...document.querySelectorAll('#gallery img')].every(i => i.naturalWidth > 0)"),
             10, 0.1, "the thumbnails to load")
    page.select_option("select[name=set]", "rejected_model1")
    rejected = api.get(f"/v1/jobs/{job_id}/predictions", params={"set": "rejected_model1", "label": classes[1]}).json()
    page.select_option("select[name=class]", classes[1])
    page.locator("#gallery-count", has_text=f"{rejected['total']} images").wait_for()
    page.select_option("select[name=set]", "all")
    page.select_option("select[name=class]", "")
    page.locator("#gallery-count", has_text="30 images").wait_for()
    assert thumbs.count() == 24  # a page; the rest on the next
    page.click("#gallery-filters button:has-text('Next')")
    page.locator("#gallery-filters", has_text="25–30").wait_for()
    assert thumbs.count() == 6
    page.click("#gallery-filters button:has-text('Previous')")
    page.locator("#gallery-filters", has_text="1–24").wait_for()
    for figure in ("counts", "filter", "losses", "accuracy"):  # drawn by Chart.js
        assert page.evaluate(f"!!Chart.getChart(document.querySelector('canvas[x-ref={figure}]'))"), figure
    page.screenshot(path=str(screenshots / "job.png"), full_page=True)

    # Predictions: filtered by class and confidence, exported as CSV with the same filters.
    page.select_option("select[name=prediction-class]", classes[0])
    cats = api.get(f"/v1/jobs/{job_id}/predictions", params={"label": classes[0]}).json()["total"]
    page.locator("#prediction-count", has_text=f"{cats} predictions").wait_for()
    _set_number(page, "input[name=min-confidence]", "1")
    page.locator("#prediction-count", has_text="0 predictions").wait_for()
    _set_number(page, "input[name=min-confidence]", "0")
    page.locator("#prediction-count", has_text=f"{cats} predictions").wait_for()
    with page.expect_download() as download:
        page.click("#export-csv")
    rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    assert len(rows) == cats and {row["label"] for row in rows} <= {classes[0]}

    # Correct two labels and start the child job from them; its page links its parent.
    first, second = thumbs.nth(0), thumbs.nth(1)
    corrected = {first.get_attribute("data-name"): classes[1], second.get_attribute("data-name"): classes[0]}
    first.locator("select.correction").select_option(classes[1])
    second.locator("select.correction").select_option(classes[0])
    assert page.locator("#correction-count").inner_text() == "2 corrected labels"
    page.click("#start-child")
    page.wait_for_url(lambda url: job_id not in url)
    child_id = page.url.rsplit("/", 1)[1]
    page.locator("#parent-link", has_text=job_id).wait_for()
    _observe(page, "#job-percent", lambda text: text == "100%", 300, "the child job to reach 100%")
    page.locator("#job-status", has_text="succeeded").wait_for()
    child = api.get(f"/v1/jobs/{child_id}").json()
    assert child["parent_job_id"] == job_id and child["labels"] == corrected
    assert child["metrics"]["labelled_shots"] == 2
    page.select_option("select[name=set]", "labelled")
    page.locator("#gallery-count", has_text="2 images").wait_for()
    page.click("#parent-link")
    page.locator("#job h2", has_text=job_id).wait_for()

    # A long job, cancelled from its page while it runs.
    page.goto(f"{stack.base_url}/ui/#/datasets")
    page.fill("textarea[name=class-names]", ", ".join(classes))
    page.select_option("select[name=dataset]", dataset["id"])
    page.locator("#job-form details").evaluate("details => { details.open = true; }")
    page.fill("textarea[name=config]", json.dumps({**CONFIG, "phase1": {**CONFIG["phase1"], "epochs": 500}}))
    page.click("#job-form button[type=submit]")
    page.wait_for_url(lambda url: "/jobs/job_" in url and child_id not in url)
    page.locator("#job-status", has_text="running").wait_for()
    page.click("#cancel-job")
    page.locator("#job-status", has_text="cancelled").wait_for(timeout=30_000)
    assert page.locator("#cancel-job").is_hidden()

    # The jobs list shows all three, finished.
    page.goto(f"{stack.base_url}/ui/#/jobs")
    page.locator("#job-table tbody tr").nth(2).wait_for()
    table = page.locator("#job-table").inner_text()
    assert table.count("succeeded") == 2 and table.count("cancelled") == 1
    page.screenshot(path=str(screenshots / "jobs.png"), full_page=True)
    assert problems == []


def test_the_dashboard_asks_for_a_key_again_when_it_is_wrong(browser, stack):
    page = browser.new_page()
    answer = page.goto(f"{stack.base_url}/ui/")
    assert "script-src 'self' 'unsafe-eval'" in answer.headers["content-security-policy"]
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert page.locator("#datasets").is_hidden()
    page.fill("input[name=api-key]", "not-a-key")
    page.click("#key-form button")
    page.locator(".error", has_text="API key").wait_for()
    assert page.locator("#key-form").is_visible()
