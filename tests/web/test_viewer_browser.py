"""A real browser (headless Chromium via Playwright) uses the app like a person: the served viewer in one tab, the
Gradio page in another, the one-click example, Generate, then Stop. Screenshots are kept in tests/artifacts/."""
from __future__ import annotations

import os
import time
import urllib.request

import pytest
from playwright.sync_api import Page, sync_playwright

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    # Never skipped: a missing browser is a broken test setup, and CI (.ci/run) installs it.
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} not found: install Chromium (apt-get install chromium) or run .ci/run"
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield instance
        instance.close()


def stats(viewer: Page) -> dict:
    return viewer.evaluate("() => JSON.parse(JSON.stringify(window.viewerStats))")


def wait_until(condition, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def canvas_pixels(viewer: Page) -> dict:
    """Mean and spread of the canvas pixels, and its size: a drawn face is neither blank nor flat."""
    return viewer.evaluate("""() => {
        const c = document.getElementById('canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let sum = 0, sq = 0, n = 0;
        for (let i = 0; i < d.length; i += 4) {
            const v = (d[i] + d[i + 1] + d[i + 2]) / 3; sum += v; sq += v * v; n++;
        }
        const mean = sum / n;
        return { mean, std: Math.sqrt(sq / n - mean * mean), width: c.width, height: c.height };
    }""")


def test_viewer_draws_live_frames_while_the_page_generates_and_stop_cancels(running_app, browser, artifacts_dir):
    viewer = browser.new_page(viewport={"width": 1100, "height": 720})
    viewer.goto(running_app.url + "viewer")
    viewer.wait_for_function("document.getElementById('connection').dataset.state === 'open'", timeout=15000)
    assert viewer.input_value("#ws-url") == running_app.ws_url

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(running_app.url)
    page.get_by_text("Lite — no SadTalker weights").wait_for(timeout=30000)
    page.locator('[data-testid="dataset-cell-0-0"]').click()  # the one-click example
    page.locator("img[src*='portrait']").first.wait_for(timeout=15000)
    page.get_by_role("button", name="Generate").click()

    # Frames reach the viewer and are drawn: idle or preview first, then final ones.
    wait_until(lambda: stats(viewer)["framesDrawn"] >= 5, 30, "frames drawn in the viewer")
    live = canvas_pixels(viewer)
    assert live["std"] > 10 and 20 < live["mean"] < 235, live
    viewer.screenshot(path=str(artifacts_dir / "viewer_live.png"))
    page.screenshot(path=str(artifacts_dir / "page_live.png"), full_page=True)

    final = wait_until(lambda: (s := stats(viewer))["done"] and s, 120, "done in the viewer")
    assert final["qualities"].get("final", 0) > 0
    assert set(final["qualities"]) <= {"idle", "preview", "final"} and len(final["qualities"]) >= 2
    assert final["lastQuality"] == "final"
    pixels = canvas_pixels(viewer)
    assert pixels["std"] > 10 and pixels["width"] > 128, pixels  # the full-size final frame is on the canvas
    video_src = viewer.evaluate("document.getElementById('video').src")  # resolved against the page
    assert video_src and video_src.endswith("/video.mp4")
    with urllib.request.urlopen(video_src, timeout=10) as response:
        assert response.status == 200 and response.headers["content-type"] == "video/mp4"
    assert viewer.get_attribute("#result-text a", "download").endswith(".mp4")
    assert "Done" in viewer.inner_text("#status")

    # The page shows the finished video, which the browser can play (a real duration), and says which engine.
    page.get_by_text("made by the lite engine").wait_for(timeout=30000)
    duration = page.wait_for_function(
        "() => { const v = document.querySelector('video'); return v && v.duration > 1 ? v.duration : null; }",
        timeout=30000).json_value()
    assert duration > 1
    assert page.locator("#live img").count() == 1
    viewer.screenshot(path=str(artifacts_dir / "viewer_done.png"))
    page.screenshot(path=str(artifacts_dir / "page_done.png"), full_page=True)

    # Generate again and Stop: the job is cancelled, the viewer says so, nothing is kept.
    first_job = final["job"]
    page.get_by_role("button", name="Generate").click()
    wait_until(lambda: stats(viewer)["job"] not in (None, first_job) and stats(viewer)["framesDrawn"] > 0, 30,
               "the second job's frames")
    second_job = stats(viewer)["job"]
    page.get_by_role("button", name="Stop").click()
    viewer.wait_for_function("document.getElementById('status').textContent.includes('Stopped')", timeout=30000)
    wait_until(lambda: not (running_app.outputs / second_job).exists(), 10, "the stopped job's folder to go")
    assert (running_app.outputs / first_job / "video.mp4").is_file()
    viewer.screenshot(path=str(artifacts_dir / "viewer_stopped.png"))
