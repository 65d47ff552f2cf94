"""In a real browser: the viewer never links or runs what a server sends it, Stop then Generate at once starts the
new job, and an error's reason stays on the page after its pop-up."""
from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image
from websockets.sync.server import serve

from core.audio import load_audio, write_wav
from support.browser import chromium
from support.paths import EXAMPLE_AUDIO, EXAMPLE_IMAGE, ROOT

@pytest.fixture(scope="module")
def browser():
    with chromium() as instance:
        yield instance


# ----------------------------------------------------------------------------------------------- a hostile server
URLS = {  # job -> the video_url its "done" message carries
    "script": "javascript:window.pwned=1",
    "data": "data:text/html,<script>window.pwned=1</script>",
    "other-site": "https://evil.example/video.mp4",
    "protocol-relative": "//evil.example/video.mp4",
    "own": "/outputs/own/video.mp4",
}


@pytest.fixture(scope="module")
def hostile_server():
    """A WebSocket server that answers each followed job with a "done" carrying that job's URL, and a web server
    that serves the viewer as the app does (pointing at that WebSocket server)."""
    connections: list[str] = []

    def handler(ws):
        connections.append(ws.request.path)
        ws.send(json.dumps({"type": "hello", "job": None, "protocol": 2}))
        for raw in ws:
            message = json.loads(raw)
            if message.get("type") == "follow" and message.get("job") in URLS:
                job = message["job"]
                ws.send(json.dumps({"type": "status", "job": job, "stage": "done", "message": "<b>bold</b>"}))
                ws.send(json.dumps({"type": "done", "job": job, "video_url": URLS[job], "duration_s": 1.0,
                                    "engine": "<img src=x onerror=window.pwned=1>", "num_frames": 25}))

    ws_server = serve(handler, "127.0.0.1", 0)
    threading.Thread(target=ws_server.serve_forever, daemon=True).start()
    page = (ROOT / "streaming_client.html").read_text(encoding="utf-8").replace(
        'data-ws-port=""', f'data-ws-port="{ws_server.socket.getsockname()[1]}"', 1).encode()

    class Viewer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Viewer)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{web.server_address[1]}/viewer", connections
    web.shutdown()
    ws_server.shutdown()


@pytest.mark.parametrize("job", [job for job in URLS if job != "own"])
def test_the_viewer_never_links_a_url_it_did_not_make(browser, hostile_server, job):
    url, _ = hostile_server
    page = browser.new_page()
    page.goto(f"{url}?job={job}")
    page.wait_for_function("() => window.viewerStats && window.viewerStats.done", timeout=15000)
    time.sleep(0.2)
    assert page.locator("a").count() == 0
    assert page.get_attribute("#video", "src") is None and page.locator("#result").is_hidden()
    assert page.evaluate("() => window.pwned") is None
    assert page.text_content("#status") == "<b>bold</b>"  # text, never markup
    page.close()


def test_the_viewer_links_its_own_video_with_its_token_and_ignores_a_ws_parameter(browser, hostile_server):
    url, connections = hostile_server
    before = len(connections)
    page = browser.new_page()
    page.goto(f"{url}?job=own&token=t0k&ws=ws://evil.example:1/%22%3E%3Cscript%3Ewindow.pwned=1%3C/script%3E")
    page.wait_for_function("() => window.viewerStats && window.viewerStats.done", timeout=15000)
    origin = url.rsplit("/", 1)[0]
    assert page.get_attribute("#result-text a", "href") == f"{origin}/outputs/own/video.mp4?token=t0k"
    assert "<img" in page.text_content("#result-text")  # the engine name shown as text
    assert page.input_value("#ws-url").startswith("ws://127.0.0.1:")  # its own server, not ?ws=
    assert connections[before:] == ["/?token=t0k"]  # the token travels to the stream it came with
    assert page.evaluate("() => window.pwned") is None
    page.close()


# ----------------------------------------------------------------------------------------------- the page
def open_page(browser, running_app, image, audio):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(running_app.url)
    page.get_by_text("Lite — no SadTalker weights").wait_for(timeout=30000)
    page.locator("#portrait input[type=file]").set_input_files(str(image))
    page.locator("#speech input[type=file]").set_input_files(str(audio))
    page.locator("#portrait img").first.wait_for(timeout=15000)
    page.locator("#speech audio, #speech [data-testid='waveform-controls']").first.wait_for(
        state="attached", timeout=15000)
    return page


def iframe_job(page) -> str | None:
    return page.evaluate("() => { const f = document.querySelector('#live iframe'); return f && f.dataset.job; }")


def progress_text(page) -> str:
    return page.text_content(".stl-progress-text") or ""


def test_stop_then_generate_at_once_starts_the_new_job(browser, running_app, tmp_path):
    speech = load_audio(str(EXAMPLE_AUDIO))
    long_audio = tmp_path / "half-minute.wav"  # long enough to be still rendering when Stop is clicked
    write_wav(str(long_audio), np.tile(speech, 6))
    page = open_page(browser, running_app, EXAMPLE_IMAGE, long_audio)
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("() => { const f = document.querySelector('#live iframe'); return f && f.dataset.job; }",
                           timeout=30000)
    first = iframe_job(page)
    page.wait_for_function("() => /\\d+\\/\\d+ frames/.test(document.querySelector('.stl-progress-text').textContent)",
                           timeout=30000)
    page.get_by_role("button", name="Stop").click()
    page.get_by_role("button", name="Generate").click()  # at once: no wait for the Stop to be done
    deadline = time.monotonic() + 20
    while iframe_job(page) in (None, first):
        assert time.monotonic() < deadline, f"no new job after Stop + Generate; progress: {progress_text(page)!r}"
        time.sleep(0.05)
    second = iframe_job(page)
    page.wait_for_function("() => /frames/.test(document.querySelector('.stl-progress-text').textContent)",
                           timeout=30000)  # the new job runs
    assert not (running_app.outputs / first).exists()  # the stopped one left nothing
    page.get_by_role("button", name="Stop").click()  # and Stop says so
    page.wait_for_function("() => document.querySelector('.stl-progress-text').textContent.includes('Stopped')",
                           timeout=30000)
    assert iframe_job(page) == second
    page.close()


def test_the_reason_of_an_error_stays_on_the_progress_line(browser, running_app, tmp_path):
    no_face = tmp_path / "wall.png"
    y, x = np.mgrid[0:300, 0:400]
    Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)).save(no_face)
    short = tmp_path / "short.wav"
    write_wav(str(short), load_audio(str(EXAMPLE_AUDIO))[:int(1.2 * 16000)])
    page = open_page(browser, running_app, no_face, short)
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("() => { const p = document.querySelector('.stl-progress-text.stl-error');"
                           " return p && /face/i.test(p.textContent); }", timeout=60000)
    reason = progress_text(page)
    popup = page.locator(".toast-body.error").first
    popup.wait_for(timeout=10000)  # the pop-up says it too
    assert "face" in popup.text_content().lower()
    for close in page.locator("[data-testid=toast-close]").all():  # the user closes the pop-ups
        close.click()
    page.wait_for_function("() => !document.querySelector('.toast-body')", timeout=10000)
    assert progress_text(page) == reason and "face" in reason.lower()
    page.close()


def test_the_live_tab_starts_a_session_that_plays_in_the_page_and_refuses_sadtalker_without_weights(
        browser, running_app):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(running_app.url)
    page.get_by_role("tab", name="Live avatar").click()
    page.locator("#live-portrait input[type=file]").set_input_files(str(EXAMPLE_IMAGE))
    page.locator("#live-portrait img").first.wait_for(timeout=15000)
    # no weights in this app: a clear refusal, and the page keeps working
    page.locator("#live-engine").get_by_label("sadtalker").check()
    page.locator("#live-start").click()
    page.locator(".toast-body.error").first.wait_for(timeout=15000)
    assert "SadTalker" in page.locator(".toast-body.error").first.text_content()
    page.locator("#live-engine").get_by_label("lite").check()
    page.locator("#live-start").click()
    page.wait_for_function("() => { const f = document.querySelector('#live-session iframe');"
                           " return f && f.dataset.job; }", timeout=30000)
    session = page.evaluate("() => document.querySelector('#live-session iframe').dataset.job")
    frame = page.frame_locator("#live-session iframe")
    page.wait_for_function("() => { const f = document.querySelector('#live-session iframe');"
                           " const s = f.contentWindow.viewerStats; return s && s.framesDrawn > 25; }", timeout=30000)
    assert frame.locator("#mic").is_visible()  # a session: the player has the talk panel
    with urllib.request.urlopen(f"{running_app.url}api/sessions/{session}", timeout=10) as response:
        assert json.loads(response.read())["state"] in ("idle", "speaking")
    page.locator("#live-end").click()
    page.get_by_text("Ended.").wait_for(timeout=15000)
    with pytest.raises(urllib.error.HTTPError) as gone:
        urllib.request.urlopen(f"{running_app.url}api/sessions/{session}", timeout=10)
    assert gone.value.code == 404
    page.close()
