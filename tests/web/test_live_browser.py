"""A live avatar session in a real browser: Chromium's fake microphone plays a speech file, the viewer's Talk button
sends it over the WebSocket, the session speaks it (picture and sound), and the viewer plays it back."""
from __future__ import annotations

import json
import time
import urllib.request

import pytest

from support.browser import chromium
from support.paths import EXAMPLE_AUDIO, EXAMPLE_IMAGE

def api(app, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> dict:
    request = urllib.request.Request(app.url.rstrip("/") + path, data=body, method=method, headers=headers or {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def multipart(fields: dict[str, tuple[str, bytes, str] | str]) -> tuple[bytes, str]:
    boundary = "----sadtalkerlive"
    parts = []
    for name, value in fields.items():
        if isinstance(value, tuple):
            filename, data, kind = value
            head = f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\nContent-Type: {kind}'
            parts.append(f"--{boundary}\r\n{head}\r\n\r\n".encode() + data + b"\r\n")
        else:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def browser_with_a_microphone():
    with chromium("--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                  f"--use-file-for-fake-audio-capture={EXAMPLE_AUDIO}") as instance:
        yield instance


def test_the_browser_microphone_speaks_through_a_session(running_app, browser_with_a_microphone, artifacts_dir):
    body, kind = multipart({"image": ("portrait.png", EXAMPLE_IMAGE.read_bytes(), "image/png"),
                            "options": '{"size": 256}'})
    created = api(running_app, "POST", "/api/sessions", body, {"Content-Type": kind})
    session = created["session"]
    try:
        context = browser_with_a_microphone.new_context(permissions=["microphone"])
        viewer = context.new_page()
        viewer.goto(running_app.url.rstrip("/") + created["viewer_url"] + "&transport=ws")
        viewer.locator("#mic").wait_for(state="visible", timeout=15000)  # a session: the talk panel is there
        viewer.click("#mic")
        viewer.wait_for_function("window.liveStats.mic === 'on'", timeout=10000)
        deadline = time.monotonic() + 30
        while api(running_app, "GET", f"/api/sessions/{session}")["speech_s"] < 2.0:
            assert time.monotonic() < deadline, "the microphone's speech was not spoken"
            time.sleep(0.2)
        viewer.click("#mic")  # stop talking: the utterance ends
        viewer.wait_for_function("window.liveStats.audio_chunks > 10 && window.viewerStats.framesDrawn > 50",
                                 timeout=15000)
        stats = viewer.evaluate("() => JSON.parse(JSON.stringify(window.liveStats))")
        assert stats["sound"] == "on" and stats["audio_chunks"] > 10
        state = api(running_app, "GET", f"/api/sessions/{session}")
        assert state["utterances"] >= 1 and state["viewers"] >= 1
        viewer.screenshot(path=str(artifacts_dir / "live_session_mic.png"))
        context.close()
    finally:
        api(running_app, "DELETE", f"/api/sessions/{session}")


def test_the_viewer_plays_a_session_over_webrtc_with_sound(running_app, browser_with_a_microphone, artifacts_dir):
    body, kind = multipart({"image": ("portrait.png", EXAMPLE_IMAGE.read_bytes(), "image/png"),
                            "options": '{"size": 256}'})
    created = api(running_app, "POST", "/api/sessions", body, {"Content-Type": kind})
    session = created["session"]
    try:
        api(running_app, "POST", f"/api/sessions/{session}/speech?final=1", EXAMPLE_AUDIO.read_bytes(),
            {"Content-Type": "audio/wav"})
        viewer = browser_with_a_microphone.new_context().new_page()
        viewer.goto(running_app.url.rstrip("/") + created["viewer_url"])  # a session: WebRTC by default
        viewer.wait_for_function("window.liveStats.transport === 'webrtc'", timeout=20000)
        viewer.wait_for_function("document.getElementById('rtc').currentTime > 2", timeout=20000)
        media = viewer.evaluate("""() => { const v = document.getElementById('rtc');
            return { audio: v.srcObject.getAudioTracks().length, video: v.srcObject.getVideoTracks().length,
                     width: v.videoWidth, time: v.currentTime }; }""")
        assert media["audio"] == 1 and media["video"] == 1 and media["width"] == 256, media
        later = viewer.evaluate("() => document.getElementById('rtc').currentTime")
        time.sleep(1.0)
        assert viewer.evaluate("() => document.getElementById('rtc').currentTime") > later + 0.5  # it plays on
        viewer.screenshot(path=str(artifacts_dir / "live_session_webrtc.png"))
        viewer.click("#transport")  # one click: back to the WebSocket stream
        viewer.wait_for_function("window.liveStats.transport === 'websocket' && window.viewerStats.framesDrawn > 5",
                                 timeout=15000)
        viewer.context.close()
    finally:
        api(running_app, "DELETE", f"/api/sessions/{session}")
