"""The editor in a real browser: Chromium -> live Django server -> Redis -> real Celery worker.

Runs only where Debian's Chromium is installed at /usr/bin/chromium (``make browser``); the
browser is never downloaded. Screenshots go to var/screenshots/, or to the folder in
EDITOR_SCREENSHOT_DIR (``make screenshots`` writes the README's images to docs/screenshots/).
"""

from __future__ import annotations

import io
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from editing import imaging
from tests.conftest import PHOTOS, ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SCREENSHOTS = ROOT / os.environ.get("EDITOR_SCREENSHOT_DIR", "var/screenshots")
# Layout checks that the README does not show always go to var/.
LAYOUT_SCREENSHOTS = ROOT / "var" / "screenshots"
JOB_TIMEOUT_MS = 300_000
UI_TIMEOUT_MS = 30_000
# Pixels this far from the painted mask must come back unchanged: the worker regenerates whole
# 16 px latent tokens around the mask and feathers the seam.
UNCHANGED_MARGIN_PX = 16
COFFEE = PHOTOS / "coffee.png"
COFFEE_SIZE = (600, 400)
# Strokes in image pixels (x, y), painted with the default 48 px brush.
STROKES = [[(170, 150), (260, 190), (330, 230)], [(420, 120), (430, 200)]]

# Latin-script words allowed on Japanese pages: file formats, units, key names, language names in
# their own language, and names the test itself types (user, template).
ALLOWED_LATIN = {
    "PNG", "JPEG", "WebP", "TIFF", "BMP", "GIF", "API", "HTTP", "FLOPs", "MB", "KB", "px", "Ctrl", "English",
    "alice", "coffee",
}

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Chromium is not installed at /usr/bin/chromium; run `make browser`"),
]


@dataclass(frozen=True)
class Language:
    code: str
    locale: str
    prompt: str
    succeeded: str  # status label shown when the job has succeeded


ENGLISH = Language("en", "en-US", "a ceramic cup with a blue glaze", "succeeded")
JAPANESE = Language("ja", "ja-JP", "青い釉薬の陶器のカップ", "完了")


@pytest.fixture
def browser(monkeypatch):
    from playwright.sync_api import sync_playwright

    # Playwright's sync API runs an event loop in this thread. Django rejects ORM calls from a thread
    # with a running loop unless this variable marks them as safe, which they are: nothing awaits them.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield instance
        instance.close()


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user(username="alice", password="pw-alice")


@pytest.fixture
def no_warmups(settings):
    # Template uploads would otherwise queue a cache warm-up ahead of the edit on the single worker.
    settings.EDITOR_WARMUP_ON_CREATE = False


def new_page(browser, language: Language):
    context = browser.new_context(
        locale=language.locale,
        extra_http_headers={"Accept-Language": language.code},
        viewport={"width": 1400, "height": 1000},
        accept_downloads=True,
    )
    context.set_default_timeout(UI_TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    return page, errors


def log_in(page, base_url: str, username: str, password: str) -> None:
    page.goto(base_url + "/")
    assert "/accounts/login/" in page.url
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.locator("main button[type=submit]").click()
    page.wait_for_selector("body[data-editor-ready=true]")


def upload_template(page, path: Path) -> None:
    page.set_input_files("#upload-image", str(path))
    page.click("#upload-submit")
    page.wait_for_selector("#stage:not([hidden])")
    page.wait_for_function("document.getElementById('stage-image').complete")


def paint_strokes(page, strokes: list[list[tuple[int, int]]], image_size: tuple[int, int]) -> None:
    """Drag the mouse along each stroke, given in image pixels, over the mask canvas."""
    box = page.locator("#mask-canvas").bounding_box()
    scale_x = box["width"] / image_size[0]
    scale_y = box["height"] / image_size[1]
    for stroke in strokes:
        points = [(box["x"] + x * scale_x, box["y"] + y * scale_y) for x, y in stroke]
        page.mouse.move(*points[0])
        page.mouse.down()
        for point in points[1:]:
            page.mouse.move(*point, steps=8)
        page.mouse.up()


def record_progress(page) -> None:
    """Collect every value the progress text shows, so the test can check that it reached 100%."""
    page.evaluate(
        """() => {
            window.progressSeen = [];
            const target = document.getElementById("job-progress-text");
            new MutationObserver(() => window.progressSeen.push(target.textContent))
                .observe(target, {childList: true, characterData: true, subtree: true});
        }"""
    )


def submit_and_wait(page, language: Language, steps: int) -> str:
    page.fill("#prompt", language.prompt)
    page.fill("#steps", str(steps))
    page.fill("#seed", "3")
    record_progress(page)
    page.click("#job-submit")
    page.wait_for_selector("#job-panel:not([hidden])")
    page.wait_for_selector("#result-panel:not([hidden])", timeout=JOB_TIMEOUT_MS)
    page.wait_for_function(
        "document.getElementById('compare-after-image').complete"
        " && document.getElementById('compare-after-image').naturalWidth > 0"
    )
    assert page.inner_text("#job-status") == language.succeeded
    return page.get_attribute("#result-panel", "data-job-id")


def percentages(values: list[str]) -> list[int]:
    return [int(value.rstrip("%")) for value in values if re.fullmatch(r"\d+%", value)]


def download_result(page, tmp_path: Path) -> np.ndarray:
    with page.expect_download() as download_info:
        page.click("#result-download")
    path = tmp_path / download_info.value.suggested_filename
    download_info.value.save_as(path)
    return np.asarray(Image.open(path).convert("RGB"))


def fetch_mask(page, base_url: str, job_id: str) -> np.ndarray:
    response = page.context.request.get(f"{base_url}/jobs/{job_id}/mask.png")
    assert response.status == 200
    return np.asarray(Image.open(io.BytesIO(response.body())).convert("L"))


def visible_text(page) -> str:
    """Text a user sees or hears: rendered text, the title and the labels of visible elements."""
    return page.evaluate(
        """() => {
            const texts = [document.title, document.body.innerText];
            for (const element of document.querySelectorAll("[placeholder], [aria-label], [title], [alt]")) {
                if (!element.checkVisibility()) continue;
                for (const name of ["placeholder", "aria-label", "title", "alt"]) {
                    const value = element.getAttribute(name);
                    if (value) texts.push(value);
                }
            }
            return texts.join("\\n");
        }"""
    )


def mask_coverage_percent(page) -> float:
    """The mask's share of the image as the page reports it, in percent."""
    match = re.search(r"(\d+(?:\.\d+)?)%", page.inner_text("#mask-coverage"))
    assert match, page.inner_text("#mask-coverage")
    return float(match.group(1))


def english_words(text: str) -> set[str]:
    return {word for word in re.findall(r"[A-Za-z]{2,}", text) if word not in ALLOWED_LATIN}


def assert_edit_kept_outside_of_mask(result: np.ndarray, mask: np.ndarray) -> None:
    original = imaging.read_template(COFFEE.read_bytes(), max_pixels=10**8, max_bytes=10**8)
    outside = ~imaging.dilate(mask > 127, UNCHANGED_MARGIN_PX)
    assert result.shape == original.shape
    assert outside.mean() > 0.5, "the mask should leave most of the image untouched"
    assert np.array_equal(result[outside], original[outside])
    assert not np.array_equal(result[mask > 127], original[mask > 127])


def assert_mask_follows_strokes(mask: np.ndarray) -> None:
    """The exported mask has the image's full size and is white under the strokes only."""
    assert mask.shape == (COFFEE_SIZE[1], COFFEE_SIZE[0])
    for stroke in STROKES:
        for x, y in stroke:
            assert mask[y, x] == 255, f"stroke point {(x, y)} is not in the mask"
    assert mask[20, 20] == 0
    assert mask[380, 580] == 0


def test_edit_flow_in_english(browser, live_server, celery_worker_process, alice, no_warmups, django_user_model, tmp_path):
    page, errors = new_page(browser, ENGLISH)
    log_in(page, live_server.url, "alice", "pw-alice")
    upload_template(page, COFFEE)
    paint_strokes(page, STROKES, COFFEE_SIZE)
    assert "The mask covers" in page.inner_text("#mask-coverage")
    page.fill("#prompt", ENGLISH.prompt)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "editor.png"), full_page=True)

    job_id = submit_and_wait(page, ENGLISH, steps=4)

    seen = percentages(page.evaluate("window.progressSeen"))
    assert seen[-1] == 100
    assert seen == sorted(seen), f"progress went backwards: {seen}"
    assert page.inner_text("#job-step") == "Step 4 of 4"
    page.locator("#result-panel").screenshot(path=str(SCREENSHOTS / "result.png"))
    result = download_result(page, tmp_path)
    mask = fetch_mask(page, live_server.url, job_id)
    assert_mask_follows_strokes(mask)
    assert_edit_kept_outside_of_mask(result, mask)
    assert result.shape[:2] == (COFFEE_SIZE[1], COFFEE_SIZE[0])

    page.goto(live_server.url + "/history/")
    row = page.locator(f"#job-{job_id}")
    assert row.get_attribute("data-status") == "succeeded"
    assert "denoise:" in row.inner_text()
    page.wait_for_function("[...document.images].every((image) => image.complete)")
    page.screenshot(path=str(SCREENSHOTS / "history.png"), full_page=True)
    assert errors == []

    django_user_model.objects.create_superuser(username="admin", password="pw-admin")
    admin_page, _ = new_page(browser, ENGLISH)
    admin_page.goto(live_server.url + "/admin/login/")
    admin_page.fill("#id_username", "admin")
    admin_page.fill("#id_password", "pw-admin")
    admin_page.click("input[type=submit]")
    admin_page.goto(live_server.url + "/admin/editing/template/")
    admin_page.wait_for_function("[...document.images].every((image) => image.complete)")
    assert "coffee" in admin_page.inner_text("#result_list")
    admin_page.screenshot(path=str(SCREENSHOTS / "admin-templates.png"), full_page=True)


def test_edit_flow_in_japanese(browser, live_server, celery_worker_process, alice, no_warmups, tmp_path):
    page, errors = new_page(browser, JAPANESE)
    page.goto(live_server.url + "/accounts/login/")
    assert english_words(visible_text(page)) == set()
    log_in(page, live_server.url, "alice", "pw-alice")
    assert english_words(visible_text(page)) == set()

    upload_template(page, COFFEE)
    paint_strokes(page, STROKES, COFFEE_SIZE)
    assert english_words(visible_text(page)) == set()
    page.fill("#prompt", JAPANESE.prompt)
    page.screenshot(path=str(SCREENSHOTS / "editor-ja.png"), full_page=True)

    job_id = submit_and_wait(page, JAPANESE, steps=4)

    assert percentages(page.evaluate("window.progressSeen"))[-1] == 100
    assert english_words(visible_text(page)) == set()
    page.locator("#result-panel").screenshot(path=str(SCREENSHOTS / "result-ja.png"))
    result = download_result(page, tmp_path)
    assert_edit_kept_outside_of_mask(result, fetch_mask(page, live_server.url, job_id))

    page.goto(live_server.url + "/history/")
    history_text = visible_text(page)
    assert JAPANESE.prompt in history_text
    assert english_words(history_text) == set()

    # Re-run: the editor reloads template, mask, prompt and settings of the job.
    page.click(f"#job-{job_id} >> text=もう一度編集")
    page.wait_for_selector("body[data-editor-ready=true]")
    assert page.input_value("#prompt") == JAPANESE.prompt
    assert page.input_value("#steps") == "4"
    assert page.input_value("#seed") == "3"
    assert page.get_attribute(".gallery-item[aria-pressed=true]", "data-template-id") is not None
    assert mask_coverage_percent(page) > 0
    # The notice about the loaded mask shows under the mask, not under the upload form.
    assert page.inner_text("#mask-status") != ""
    assert page.inner_text("#upload-status") == ""
    assert errors == []


def test_api_errors_shown_next_to_fields(browser, live_server, alice, no_warmups, media_root):
    """Errors come from the API: no worker is needed because the job is rejected before queueing."""
    page, errors = new_page(browser, JAPANESE)
    log_in(page, live_server.url, "alice", "pw-alice")

    page.set_input_files("#upload-image", {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"})
    page.click("#upload-submit")
    page.wait_for_selector("#image-error:not([hidden])")
    assert page.get_attribute("#upload-image", "aria-invalid") == "true"
    image_error = page.inner_text("#image-error")
    # API errors name the request field ("image", "steps") as clients send it.
    assert english_words(image_error) <= {"image"}, image_error

    upload_template(page, COFFEE)
    paint_strokes(page, STROKES, COFFEE_SIZE)
    page.fill("#prompt", JAPANESE.prompt)
    page.fill("#steps", "1000")
    page.click("#job-submit")
    page.wait_for_selector("#steps-error:not([hidden])")
    steps_error = page.inner_text("#steps-error")
    assert "1000" in steps_error
    assert english_words(steps_error) <= {"steps"}, steps_error
    assert page.is_hidden("#job-panel")
    assert [error for error in errors if "400" not in error] == []


def test_submit_guards_and_queued_cancel(browser, live_server, alice, no_warmups, media_root, monkeypatch):
    """The checks happen before and at submission. Jobs are not sent to the broker, so they stay queued even
    where another test's worker still runs."""
    from editing import services
    from editing.models import EditJob

    monkeypatch.setattr(services, "enqueue", lambda job, chosen=None, takeover=False: None)

    page, errors = new_page(browser, ENGLISH)
    log_in(page, live_server.url, "alice", "pw-alice")
    upload_template(page, COFFEE)
    paint_strokes(page, STROKES, COFFEE_SIZE)
    page.fill("#prompt", ENGLISH.prompt)
    page.click("#guidance")
    page.keyboard.type("--3")  # a number input cannot parse this, so its value reads as ""
    page.click("#job-submit")
    page.wait_for_selector("#guidance-error:not([hidden])")
    guidance_error = page.inner_text("#guidance-error")
    jobs_after_bad_number = EditJob.objects.count()

    page.fill("#guidance", "")
    page.dblclick("#job-submit")
    page.wait_for_selector("#job-panel:not([hidden])")
    page.wait_for_timeout(1000)  # lets a second request, if one was sent, reach the server

    jobs_after_double_click = EditJob.objects.count()
    page.click("#job-cancel")  # the job is queued, so it is cancelled at once
    page.wait_for_function("document.getElementById('job-status').textContent === 'cancelled'")

    assert guidance_error == "Guidance: this is not a number. Enter a number from 0 to 100."
    assert jobs_after_bad_number == 0
    assert jobs_after_double_click == 1
    assert page.inner_text("#job-message") == "The job was cancelled."
    assert errors == []


def test_mask_tools(browser, live_server, alice, no_warmups, media_root):
    """Brush, eraser, rectangle, undo, redo, invert and clear, driven by mouse and keyboard."""
    page, errors = new_page(browser, ENGLISH)
    log_in(page, live_server.url, "alice", "pw-alice")
    upload_template(page, COFFEE)
    assert mask_coverage_percent(page) == 0

    paint_strokes(page, STROKES, COFFEE_SIZE)
    painted = mask_coverage_percent(page)
    # Each stroke is one undo step.
    page.click("#mask-undo")
    first_stroke = mask_coverage_percent(page)
    assert 0 < first_stroke < painted
    page.click("#mask-undo")
    assert mask_coverage_percent(page) == 0
    assert page.is_disabled("#mask-undo")
    page.click("#mask-redo")
    assert mask_coverage_percent(page) == first_stroke
    page.click("#mask-redo")
    assert mask_coverage_percent(page) == painted
    assert page.is_disabled("#mask-redo")

    page.click("#mask-invert")
    assert mask_coverage_percent(page) == pytest.approx(100 - painted, abs=0.2)
    page.click("#mask-clear")
    assert mask_coverage_percent(page) == 0

    # The size box: a value sets the slider, a cleared box keeps the current size.
    page.fill("#brush-size-number", "120")
    page.press("#brush-size-number", "Enter")
    assert page.input_value("#brush-size") == "120"
    page.fill("#brush-size-number", "")
    page.press("#brush-size-number", "Tab")
    assert page.input_value("#brush-size-number") == "120"
    assert page.input_value("#brush-size") == "120"

    # Keyboard: R selects the rectangle tool; a 200 x 100 px box at half zoom covers 1/12 of the image.
    page.focus("#stage-scroller")
    page.keyboard.press("r")
    assert page.is_checked("input[name=mask-tool][value=rectangle]")
    page.click("#zoom-actual")
    page.click("#zoom-out")
    page.click("#zoom-out")
    zoomed_out = page.inner_text("#zoom-level")
    page.hover("#mask-canvas")
    page.keyboard.down("Control")
    page.mouse.wheel(0, -100)
    page.keyboard.up("Control")
    assert page.inner_text("#zoom-level") != zoomed_out
    box = page.locator("#mask-canvas").bounding_box()
    scale = box["width"] / COFFEE_SIZE[0]
    assert scale < 1
    page.mouse.move(box["x"] + 100 * scale, box["y"] + 100 * scale)
    page.mouse.down()
    page.mouse.move(box["x"] + 300 * scale, box["y"] + 200 * scale, steps=5)
    page.mouse.up()
    assert mask_coverage_percent(page) == pytest.approx(100 * 200 * 100 / (600 * 400), abs=0.5)

    # The eraser removes part of the rectangle; Ctrl+Z brings it back.
    page.keyboard.press("e")
    page.mouse.move(box["x"] + 100 * scale, box["y"] + 150 * scale)
    page.mouse.down()
    page.mouse.move(box["x"] + 300 * scale, box["y"] + 150 * scale, steps=5)
    page.mouse.up()
    assert mask_coverage_percent(page) < 100 * 200 * 100 / (600 * 400) - 1
    page.keyboard.press("Control+z")
    assert mask_coverage_percent(page) == pytest.approx(100 * 200 * 100 / (600 * 400), abs=0.5)
    assert errors == []


def test_time_left_estimate(browser, live_server, alice):
    """The estimate waits for two step reports, so model loading before the first step does not skew it."""
    page, errors = new_page(browser, ENGLISH)
    log_in(page, live_server.url, "alice", "pw-alice")
    estimates = page.evaluate(
        """async () => {
            const { TimeLeftEstimator } = await import("/static/editing/js/job_monitor.js");
            let now = 0;
            const estimator = new TimeLeftEstimator(() => now);
            const sample = (time, progress) => { now = time; return estimator.update(progress); };
            return [
                sample(0, 0),          // running, loading the model
                sample(5000, 0),       // still loading
                sample(20000, 0.05),   // first step report, after 20 s of loading
                sample(20250, 0.05),   // no new step yet
                sample(20500, 0.10),   // second step report: 0.05 in 0.5 s
                sample(21000, 0.20),
                sample(21500, 0.10),   // a restarted attempt
                sample(22000, 0.20),
                sample(22500, 0.30),
            ];
        }"""
    )
    assert estimates[:4] == [None, None, None, None]
    # 0.05 of the job in 0.5 s leaves 0.9 at 10 s per unit: 9 s.
    assert estimates[4] == pytest.approx(9.0)
    # 0.15 since the first report in 1 s leaves 0.8: 5.33 s.
    assert estimates[5] == pytest.approx(0.8 / 0.15)
    assert estimates[6:8] == [None, None]
    assert estimates[8] == pytest.approx(0.7 * 0.5 / 0.1)
    assert errors == []


def test_cancel_running_job(browser, live_server, celery_worker_process, alice, no_warmups):
    page, errors = new_page(browser, ENGLISH)
    log_in(page, live_server.url, "alice", "pw-alice")
    upload_template(page, COFFEE)
    paint_strokes(page, STROKES, COFFEE_SIZE)
    page.fill("#prompt", ENGLISH.prompt)
    page.fill("#steps", "100")
    page.click("#job-submit")
    page.wait_for_function("document.getElementById('job-status').textContent === 'running'", timeout=JOB_TIMEOUT_MS)

    page.click("#job-cancel")
    page.wait_for_function("document.getElementById('job-status').textContent === 'cancelled'", timeout=JOB_TIMEOUT_MS)

    assert page.inner_text("#job-message") == "The job was cancelled."
    assert page.is_hidden("#result-panel")
    assert page.is_enabled("#job-submit")
    assert errors == []


# --- Editor behavior around jobs, with the worker played by the test through the job state machine.


@pytest.fixture
def jobs_not_sent(monkeypatch):
    """Keep submitted jobs queued: the test moves them through their states itself."""
    from editing import services

    monkeypatch.setattr(services, "enqueue", lambda job, chosen=None, takeover=False: None)


def png_file(name: str, size: tuple[int, int], color: tuple[int, int, int]) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return {"name": name, "mimeType": "image/png", "buffer": buffer.getvalue()}


def upload_file(page, file: dict) -> int:
    """Upload a template from memory, wait until it is selected and return its id."""
    page.set_input_files("#upload-image", file)
    page.click("#upload-submit")
    selected = ".gallery-item[aria-pressed=true]"
    page.wait_for_function(
        f"document.querySelector('{selected} .gallery-name')?.textContent === {Path(file['name']).stem!r}"
        " && document.getElementById('stage-image').complete"
    )
    return int(page.get_attribute(selected, "data-template-id"))


def selected_template_id(page) -> int:
    return int(page.get_attribute(".gallery-item[aria-pressed=true]", "data-template-id"))


def select_template(page, template_id: int) -> None:
    page.click(f".gallery-item[data-template-id='{template_id}']")
    page.wait_for_selector(f".gallery-item[data-template-id='{template_id}'][aria-pressed=true]")
    page.wait_for_function("document.getElementById('stage-image').complete")


def run_job_to_success(job_id: str) -> None:
    """Claim, advance and finish a queued job as a worker would, with a copy of coffee.png as its result."""
    from django.core.files.base import ContentFile
    from django.core.files.storage import default_storage

    from editing import jobstate

    assert jobstate.claim(job_id, worker="test-worker")
    assert jobstate.report_progress(job_id, 0.5)
    name = default_storage.save(f"results/{job_id}.png", ContentFile(COFFEE.read_bytes()))
    assert jobstate.succeed(job_id, result_name=name, timings={"denoise": 120.0})


def newest_job_id() -> str:
    from editing.models import EditJob

    return str(EditJob.objects.order_by("-created_at").values_list("pk", flat=True).first())


def newest_job_id_with_status(status: str) -> str:
    from editing.models import EditJob

    return str(EditJob.objects.filter(status=status).order_by("-created_at").values_list("pk", flat=True).first())


def add_older_job(job_id: str, *, minutes_earlier: int, running: bool) -> str:
    """Copy a job as one submitted `minutes_earlier` before it, queued or claimed by a worker; return its id."""
    from datetime import timedelta

    from editing import jobstate
    from editing.models import EditJob

    job = EditJob.objects.get(pk=job_id)
    job.pk = uuid.uuid4()
    job.save(force_insert=True)
    EditJob.objects.filter(pk=job.pk).update(created_at=job.created_at - timedelta(minutes=minutes_earlier))
    if running:
        assert jobstate.claim(job.pk, worker="test-worker")
    return str(job.pk)


def http_errors_except(errors: list[str], *statuses: int) -> list[str]:
    """Console errors other than the browser's reports of the expected HTTP statuses."""
    return [error for error in errors if not any(f"status of {status}" in error for status in statuses)]


def test_templates_keep_masks_fit_and_prompt_counter(browser, live_server, alice, no_warmups, media_root):
    page, errors = new_page(browser, ENGLISH)
    log_in(page, live_server.url, "alice", "pw-alice")
    upload_template(page, COFFEE)
    coffee = selected_template_id(page)
    paint_strokes(page, STROKES, COFFEE_SIZE)
    painted = mask_coverage_percent(page)
    assert painted > 0

    # The smallest accepted template (64 x 64 px) is enlarged to fill the stage, up to the maximum zoom of 800%.
    tiny = upload_file(page, png_file("tiny.png", (64, 64), (20, 120, 200)))
    assert mask_coverage_percent(page) == 0
    zoom = int(page.inner_text("#zoom-level").rstrip("%"))
    assert 100 < zoom <= 800
    assert page.locator("#stage").bounding_box()["width"] == pytest.approx(64 * zoom / 100, abs=2)

    # Selecting the first template again brings back its mask and undo history.
    select_template(page, coffee)
    assert mask_coverage_percent(page) == painted
    assert page.is_enabled("#mask-undo")
    page.click("#mask-undo")
    assert 0 < mask_coverage_percent(page) < painted
    page.click("#mask-redo")
    assert mask_coverage_percent(page) == painted

    # Clicking the selected template keeps its mask.
    page.click(f".gallery-item[data-template-id='{coffee}']")
    page.wait_for_timeout(300)
    assert mask_coverage_percent(page) == painted
    select_template(page, tiny)
    assert mask_coverage_percent(page) == 0

    # The prompt counter counts characters and warns near and at the limit.
    page.fill("#prompt", "x" * 10)
    assert page.inner_text("#prompt-counter") == "10 / 2000"
    assert "near-limit" not in page.get_attribute("#prompt-counter", "class")
    page.fill("#prompt", "x" * 1990)
    assert "near-limit" in page.get_attribute("#prompt-counter", "class")
    assert page.inner_text("#prompt-limit") == ""
    page.fill("#prompt", "x" * 2000)
    page.focus("#prompt")
    page.keyboard.type("y")
    assert page.inner_text("#prompt-counter") == "2000 / 2000"
    assert page.inner_text("#prompt-limit") == "The prompt has reached the limit of 2000 characters."

    # On a narrow screen the gallery sits above the mask: selecting a template scrolls the mask into view.
    page.set_viewport_size({"width": 390, "height": 700})
    page.evaluate("window.scrollTo(0, 0)")
    page.click(f".gallery-item[data-template-id='{coffee}']")
    page.wait_for_function(
        """() => {
            const panel = document.getElementById("mask-panel").getBoundingClientRect();
            const stage = document.getElementById("stage-scroller").getBoundingClientRect();
            return Math.abs(panel.top) <= 1 && stage.bottom <= window.innerHeight;
        }"""
    )
    assert mask_coverage_percent(page) == painted
    assert errors == []


def test_job_panel_follows_its_own_job(browser, live_server, alice, no_warmups, media_root, jobs_not_sent):
    from editing.models import EditJob

    page, errors = new_page(browser, ENGLISH)
    log_in(page, live_server.url, "alice", "pw-alice")
    upload_template(page, COFFEE)
    coffee = selected_template_id(page)
    tiny = upload_file(page, png_file("tiny.png", (64, 64), (20, 120, 200)))
    select_template(page, coffee)
    paint_strokes(page, STROKES, COFFEE_SIZE)
    page.fill("#prompt", ENGLISH.prompt)

    # The result compares with the job's template, even when another one is selected meanwhile.
    page.click("#job-submit")
    page.wait_for_function("document.getElementById('job-status').textContent === 'queued'")
    assert page.is_visible("#job-cancel")
    first_job = newest_job_id()
    select_template(page, tiny)
    run_job_to_success(first_job)
    page.wait_for_selector("#result-panel:not([hidden])")
    assert page.get_attribute("#compare-before", "src") == f"/api/templates/{coffee}/image/"
    assert page.is_hidden("#job-cancel")

    # The panels follow one another without gaps in the right-hand column.
    boxes = {name: page.locator(f"#{name}-panel").bounding_box() for name in ["mask", "prompt", "job", "result"]}
    for upper, lower in [("mask", "prompt"), ("prompt", "job"), ("job", "result")]:
        gap = boxes[lower]["y"] - (boxes[upper]["y"] + boxes[upper]["height"])
        assert 0 <= gap <= 20, f"{gap} px between the {upper} and {lower} panels"
    page.screenshot(path=str(LAYOUT_SCREENSHOTS / "editor-result-1400.png"), full_page=True)

    # The "Show original" toggle reads and looks pressed.
    unpressed_background = page.eval_on_selector("#compare-toggle", "e => getComputedStyle(e).backgroundColor")
    page.click("#compare-toggle")
    assert page.get_attribute("#compare-toggle", "aria-pressed") == "true"
    assert page.eval_on_selector("#compare-toggle", "e => getComputedStyle(e).backgroundColor") != unpressed_background

    # While a new job is sent the old progress and result are gone, and a rejected job leaves no panel.
    select_template(page, coffee)
    held_requests = []
    page.route("**/api/jobs/", lambda route: held_requests.append(route) if route.request.method == "POST" else route.continue_())
    page.click("#job-submit")
    for _ in range(100):
        if held_requests:
            break
        page.wait_for_timeout(100)
    assert held_requests, "the job was not submitted"
    assert page.is_hidden("#result-panel")
    assert page.inner_text("#job-status") == "Submitting…"
    assert page.inner_text("#job-progress-text") == "0%"
    assert page.is_hidden("#job-cancel")
    held_requests[0].fulfill(status=400, content_type="application/json", body='{"prompt": ["The prompt is not allowed."]}')
    page.wait_for_selector("#prompt-error:not([hidden])")
    assert page.is_hidden("#job-panel")
    page.unroute("**/api/jobs/")

    # A job deleted while it is watched ends its panel and lets the user start another edit.
    page.click("#job-submit")
    page.wait_for_function("document.getElementById('job-status').textContent === 'queued'")
    assert page.is_disabled("#job-submit")
    EditJob.objects.filter(pk=newest_job_id()).delete()
    page.wait_for_function("document.getElementById('job-panel').dataset.status === 'lost'")
    assert page.inner_text("#job-message").startswith("This job no longer exists")
    assert page.is_enabled("#job-submit")
    assert page.is_hidden("#job-cancel")

    # After "Edit again", the notice about the loaded mask shows near the mask.
    page.goto(f"{live_server.url}/?job={first_job}")
    page.wait_for_selector("body[data-editor-ready=true]")
    assert page.inner_text("#mask-status") == "Loaded the mask of the earlier job."
    assert page.inner_text("#upload-status") == ""

    # The history fits a 390 px wide screen.
    page.set_viewport_size({"width": 390, "height": 800})
    page.goto(live_server.url + "/history/")
    page.wait_for_function("[...document.images].every((image) => image.complete)")
    page.screenshot(path=str(LAYOUT_SCREENSHOTS / "history-390.png"), full_page=True)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert http_errors_except(errors, 400, 404) == []


def test_reload_shows_active_job(browser, live_server, alice, no_warmups, media_root, jobs_not_sent):
    page, errors = new_page(browser, ENGLISH)
    log_in(page, live_server.url, "alice", "pw-alice")
    upload_template(page, COFFEE)
    coffee = selected_template_id(page)
    paint_strokes(page, STROKES, COFFEE_SIZE)
    painted = mask_coverage_percent(page)
    page.fill("#prompt", ENGLISH.prompt)
    page.fill("#steps", "7")
    page.click("#job-submit")
    page.wait_for_function("document.getElementById('job-status').textContent === 'queued'")
    upload_file(page, png_file("tiny.png", (64, 64), (20, 120, 200)))
    assert page.is_hidden("#job-others")
    # Two more active jobs, submitted earlier from elsewhere (another tab or the API).
    newest = newest_job_id()
    add_older_job(newest, minutes_earlier=2, running=True)
    add_older_job(newest, minutes_earlier=1, running=False)

    page.reload()
    page.wait_for_selector("body[data-editor-ready=true]")
    assert page.is_visible("#job-panel")
    assert page.inner_text("#job-status") == "queued"
    # The panel follows the newest job and names how many more there are, with a link to the history.
    assert page.is_visible("#job-others")
    assert page.inner_text("#job-others-text") == "2 more jobs are queued or running."
    assert page.get_attribute("#job-others-link", "href") == "/history/"
    assert page.is_disabled("#job-submit")
    assert page.get_attribute(".gallery-item[aria-pressed=true]", "data-template-id") == str(coffee)
    # The form shows what the job edits: its mask, prompt and settings.
    job_id = newest_job_id()
    assert mask_coverage_percent(page) == pytest.approx(painted, abs=0.2)
    assert page.input_value("#prompt") == ENGLISH.prompt
    assert page.input_value("#steps") == "7"
    assert page.inner_text("#mask-status") == f"The form shows job {job_id}, which is still queued: its mask, prompt and settings."

    run_job_to_success(job_id)
    page.wait_for_selector("#result-panel:not([hidden])")
    assert page.inner_text("#job-status") == "succeeded"
    assert page.is_enabled("#job-submit")
    # The finished job is no longer counted among the active ones; the two others still are.
    page.wait_for_function("document.getElementById('job-others-text').textContent.startsWith('2 more jobs')")

    # A reload follows the newest remaining job, the queued one, and names the running one.
    page.reload()
    page.wait_for_selector("body[data-editor-ready=true]")
    assert page.inner_text("#job-status") == "queued"
    assert page.inner_text("#job-others-text") == "1 more job is queued or running."

    # The same notice in Japanese.
    japanese, japanese_errors = new_page(browser, JAPANESE)
    log_in(japanese, live_server.url, "alice", "pw-alice")
    assert japanese.is_visible("#job-others")
    assert japanese.inner_text("#job-others-text") == "ほかに 1 件のジョブが待機中または実行中です。"
    assert japanese.inner_text("#job-others-link") == "履歴を開く"
    japanese.locator("#job-panel").screenshot(path=str(LAYOUT_SCREENSHOTS / "job-panel-other-jobs-ja.png"))

    # A job that ends elsewhere leaves the count without a reload, while the panel keeps its own job.
    from editing import jobstate

    assert jobstate.finish_cancelled(newest_job_id_with_status("running"))
    page.wait_for_selector("#job-others", state="hidden")
    japanese.wait_for_selector("#job-others", state="hidden")
    assert page.inner_text("#job-status") == "queued"

    # With the queued job cancelled as well, a reload finds no active job: no panel and no notice.
    assert jobstate.cancel_queued(newest_job_id_with_status("queued"))
    page.wait_for_function("document.getElementById('job-status').textContent === 'cancelled'")
    page.reload()
    page.wait_for_selector("body[data-editor-ready=true]")
    assert page.is_hidden("#job-panel")
    assert page.is_hidden("#job-others")
    assert errors == []
    assert japanese_errors == []


def test_session_end_and_new_login(browser, live_server, alice, no_warmups, media_root, jobs_not_sent):
    page, errors = new_page(browser, JAPANESE)
    log_in(page, live_server.url, "alice", "pw-alice")
    upload_template(page, COFFEE)
    paint_strokes(page, STROKES, COFFEE_SIZE)
    painted = mask_coverage_percent(page)
    page.fill("#prompt", JAPANESE.prompt)

    # Log out in another tab: a submission shows that the session ended, with a link to the login page.
    other = page.context.new_page()
    other.goto(live_server.url + "/")
    other.locator(".logout-form button[type=submit]").click()
    other.wait_for_url("**/accounts/login/**")
    page.click("#job-submit")
    page.wait_for_selector("#general-error:not([hidden])")
    link = page.locator("#general-error a")
    assert link.get_attribute("href") == "/accounts/login/"
    assert link.get_attribute("target") == "_blank"
    session_ended = page.evaluate("JSON.parse(document.getElementById('editor-messages').textContent).session_ended")
    assert page.inner_text("#general-error").startswith(session_ended)
    assert mask_coverage_percent(page) == painted
    assert page.is_enabled("#job-submit")

    # Log in again in the other tab: Django rotates the CSRF token, and the next submission uses the new one.
    other.fill("#id_username", "alice")
    other.fill("#id_password", "pw-alice")
    other.locator("main button[type=submit]").click()
    other.wait_for_selector("body[data-editor-ready=true]")
    page.click("#job-submit")
    page.wait_for_function("document.getElementById('job-status').textContent === '待機中'"
                           " || !document.getElementById('general-error').hidden")
    assert page.is_hidden("#general-error"), page.inner_text("#general-error")
    assert http_errors_except(errors, 401, 403) == []
