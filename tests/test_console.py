"""The web console in a real browser (Debian's headless chromium, driven by Playwright) against
the real stack: Redis, Milvus Lite, the ingestion and search workers, a tiny ColQwen2 worker, and
the API with keys set. Signs in, creates a collection, uploads a three-page PDF and a corrupt one
through the file input, follows their progress to the end, searches and sees thumbnails that
loaded, opens a page, passes axe-core at desktop and phone widths, deletes the document, after
which its images answer 404, and cancels a job (of a model that no worker serves, so that it waits). Screenshots go to EMBEDQ_SCREENSHOTS (docs/ for the README)
or the test's temporary folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from common.launch import procs
from common.store.milvus import MilvusStore
from tests.tiny_models import tiny_models_dir

from .stack import spawn, start_api, start_search_worker, start_worker
from .test_ingestion import make_pdf

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
KEY = "console-key-5f2e9a"
MODEL = "colqwen2"
IDLE_MODEL = "colqwen2-unserved"  # served by no worker: its jobs wait, to be cancelled
# Collection names of this module (Milvus is the session's, shared with the other modules).
REPORTS, WAITING = "console_reports", "console_waiting"
TIMEOUT_MS = 60_000

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists() and not os.environ.get("CI"), reason="needs Debian's chromium (.ci/run installs it)"
)


@pytest.fixture(scope="module")
def console_stack(stack_env, logs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("console")
    config = folder / "models.yaml"
    entry = (
        "  - name: {}\n    backend: colpali\n    model_class: ColQwen2\n"
        f"    path: {tiny_models_dir() / 'colqwen2'}\n    device: cpu\n    modalities: [text, image]\n"
        "    max_input_tokens: 64\n"
    )
    config.write_text("models:\n" + entry.format(MODEL) + entry.format(IDLE_MODEL))
    env = {
        **stack_env,
        "EMBEDQ_MODELS_FILE": str(config),
        "EMBEDQ_API_KEYS": KEY,
        "EMBEDQ_BLOB_URI": str(folder / "blobs"),
        "EMBEDQ_INGEST_PAGES_PER_TASK": "2",
    }
    children = [
        start_worker(env, MODEL, logs / "worker-console.log"),
        spawn(["ingest-worker"], env, logs / "ingest-worker-console.log"),
        start_search_worker(env, logs / "search-worker-console.log"),
    ]
    api, base = start_api(env, logs / "api-console.log")
    yield base, logs / "api-console.log", env["EMBEDQ_MILVUS_URI"]
    procs.stop([api, *children])
    store = MilvusStore(env["EMBEDQ_MILVUS_URI"])
    for name in (REPORTS, WAITING):
        store.drop_collection(name)
    store.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("EMBEDQ_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def serious_violations(page) -> list[str]:
    from axe_playwright_python.sync_playwright import Axe

    found = Axe().run(page).response["violations"]
    return [f"{v['id']}: {v['help']}" for v in found if v["impact"] in ("serious", "critical")]


def test_the_console_from_upload_to_search(console_stack, browser, shots):
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    base, api_log, milvus_uri = console_stack
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("dialog", lambda dialog: dialog.accept())  # the confirm() before a delete
    page.goto(f"{base}/console")

    # Keys are set: the console asks for one, once.
    expect(page.locator("#signin")).to_be_visible()
    page.fill("#api-key", KEY)
    page.click("#signin-form button[type=submit]")
    expect(page.locator("#signin")).to_be_hidden()
    expect(page.locator("#new-model option")).to_have_text([MODEL, IDLE_MODEL])

    page.fill("#new-name", REPORTS)
    page.select_option("#new-model", MODEL)
    page.click("#create-form button[type=submit]")
    expect(page.locator(f"#collection-table tr[data-name={REPORTS}]")).to_be_visible()
    expect(page.locator("#file-input")).to_be_enabled()

    page.set_input_files(
        "#file-input",
        [
            {"name": "quarterly.pdf", "mimeType": "application/pdf", "buffer": make_pdf(3)},
            {"name": "broken.pdf", "mimeType": "application/pdf", "buffer": b"%PDF-1.7\n% cut short"},
        ],
    )
    job = page.locator("#jobs .job").first
    expect(job).to_be_visible()
    page.screenshot(path=str(shots / "console-upload.png"))
    expect(job).to_have_attribute("data-status", "completed")
    assert job.locator("progress").first.evaluate("bar => bar.value") == 100
    files = job.locator(".file")
    expect(files.nth(0).locator(".error")).to_be_hidden()
    assert files.nth(0).locator("progress").evaluate("bar => bar.value") == 100
    expect(files.nth(1).locator(".error")).to_be_visible()
    expect(files.nth(1).locator(".error")).not_to_be_empty()
    expect(page.locator("#document-table tbody tr")).to_have_count(1)
    expect(page.locator("#document-table tbody tr td").nth(1)).to_have_text("3")
    page.screenshot(path=str(shots / "console-collections.png"))

    page.fill("#query", "page 2")
    page.click("#search-button")
    thumbs = page.locator("#results img")
    expect(thumbs).to_have_count(3)
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results img')].every(img => img.complete && img.naturalWidth > 0)"
    )
    assert thumbs.first.evaluate("img => img.naturalWidth") == 256
    page.screenshot(path=str(shots / "console-search.png"), full_page=True)
    assert serious_violations(page) == []

    page.locator("#results button").first.click()
    full = page.locator("#viewer-image")
    expect(page.locator("#viewer")).to_be_visible()
    page.wait_for_function("() => document.querySelector('#viewer-image').naturalWidth > 256")
    src = full.get_attribute("src")
    assert serious_violations(page) == []
    page.click("#viewer-close")

    page.set_viewport_size({"width": 390, "height": 844})
    assert serious_violations(page) == []
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than a phone

    assert page.request.get(base + src).status == 200  # the session cookie, as the browser sends it
    page.locator("#document-table tbody tr button").click()
    expect(page.locator("#document-table tbody tr")).to_have_count(0)
    assert page.request.get(base + src).status == 404
    assert page.request.get(f"{base}{src}?size=thumb").status == 404
    assert httpx.get(base + src).status_code == 401  # without the cookie or a key

    # The API cannot create a collection for a model without a worker (it asks the model its width).
    store = MilvusStore(milvus_uri)
    info = store.describe(REPORTS)
    store.create_collection(WAITING, info.kind, info.dim, IDLE_MODEL)
    store.close()
    page.reload()
    page.click(f"#collection-table tr[data-name={WAITING}] button:text('Open')")
    page.set_input_files("#file-input", [{"name": "later.pdf", "mimeType": "application/pdf", "buffer": make_pdf(2)}])
    waiting = page.locator("#jobs .job").first
    expect(waiting.locator(".file label")).to_have_text("later.pdf: running")  # its pages wait in the queue
    waiting.locator("button", has_text="Cancel").click()
    expect(waiting.locator(".job-head label")).to_have_text("Job of 1 file(s): cancelled")
    job_id = waiting.get_attribute("data-job")
    assert page.request.get(f"{base}/v1/jobs/{job_id}").json()["status"] == "cancelled"

    assert errors == []
    assert KEY not in api_log.read_text()  # the key never reaches the logs, nor a URL
    context.close()
