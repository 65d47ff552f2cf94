"""End to end: ``python app.py`` as a real process, the Gradio API as a user's script calls it, a WebSocket viewer
recording what it is shown, the mp4 checked with ffmpeg."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from gradio_client import Client, handle_file
from websockets.sync.client import connect

from support.paths import ROOT
from core.audio import ffmpeg_exe, load_audio

EXAMPLE_IMAGE = ROOT / "examples" / "portrait.png"
EXAMPLE_AUDIO = ROOT / "examples" / "speech.wav"


class Viewer:
    """Records every message of the job it follows (frames without their pixels)."""

    def __init__(self, ws_url: str):
        self.messages: list[dict] = []
        self._stack = contextlib.ExitStack()
        self._ws = self._stack.enter_context(connect(ws_url))
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        with contextlib.suppress(Exception):
            while True:
                message = json.loads(self._ws.recv())
                message["jpeg_bytes"] = len(message.pop("jpeg", ""))
                self.messages.append(message)

    def wait_for(self, predicate, timeout=60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in list(self.messages):
                if predicate(message):
                    return message
            time.sleep(0.05)
        raise AssertionError(f"no matching message in {[m['type'] for m in self.messages][-30:]}")

    def close(self):
        self._stack.close()


def probe(path: str) -> str:
    return subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", path], capture_output=True, text=True).stderr


def video_frames(path: str) -> int:
    out = subprocess.run([ffmpeg_exe(), "-i", path, "-map", "0:v:0", "-c", "copy", "-f", "null", "-"],
                         capture_output=True, text=True).stderr
    return int(out.rsplit("frame=", 1)[1].split()[0])


def test_generate_on_the_example_streams_preview_final_and_returns_the_mp4(running_app):
    viewer = Viewer(running_app.ws_url)
    assert viewer.wait_for(lambda m: m["type"] == "hello")
    client = Client(running_app.url, verbose=False)
    result = client.predict(handle_file(str(EXAMPLE_IMAGE)), handle_file(str(EXAMPLE_AUDIO)), api_name="/generate")
    done = viewer.wait_for(lambda m: m["type"] == "done", timeout=10)
    viewer.close()
    job = done["job"]
    assert result[0] == job  # the API's first output names the job's live stream (/viewer?job=<id>)
    messages = [m for m in viewer.messages if m.get("job") == job]

    # The viewer was shown the face moving at once — the idle animation, or straight away the preview when the Lite
    # engine's motion came first (~0.1 s: the job does not make the idle animation then) — then final frames, then
    # the result.
    qualities = [m["quality"] for m in messages if m["type"] == "frame"]
    assert qualities[0] in ("idle", "preview")
    assert "preview" in qualities and "final" in qualities
    first_final = qualities.index("final")
    assert qualities.index("preview") < first_final
    assert "preview" not in qualities[first_final:] and "idle" not in qualities[qualities.index("preview"):]
    assert all(m["jpeg_bytes"] > 500 and m["width"] > 0 for m in messages if m["type"] == "frame")
    assert [m for m in messages if m["type"] == "frame"][-1]["quality"] == "final"
    stages = [m["stage"] for m in messages if m["type"] == "status"]
    assert stages[0] == "starting" and stages[-1] == "done"
    progress = [m for m in messages if m["type"] == "progress" and m["stage"] == "render"]
    assert progress and progress[-1]["done"] == progress[-1]["total"] == done["num_frames"]
    assert done["engine"] == "lite" and done["video_url"] == f"/outputs/{job}/video.mp4"

    # The API returns the mp4 (the third output), with H.264 video and AAC audio as long as the speech.
    video = result[2]["video"] if isinstance(result[2], dict) else result[2]
    assert video and os.path.isfile(video)
    info = probe(video)
    assert "Video: h264" in info and "yuv420p" in info and "25 fps" in info and "Audio: aac" in info
    audio_s = load_audio(str(EXAMPLE_AUDIO)).size / 16000
    frames = video_frames(video)
    assert abs(frames / 25 - audio_s) <= 1 / 25 + 1e-6, (frames, audio_s)
    assert abs(done["duration_s"] - audio_s) <= 1 / 25 + 1e-6

    # The same file is served at the URL the viewer got (for its download link).
    with urllib.request.urlopen(running_app.url.rstrip("/") + done["video_url"], timeout=10) as response:
        assert response.status == 200 and response.headers["content-type"] == "video/mp4"
        assert len(response.read()) == os.path.getsize(running_app.outputs / job / "video.mp4")


def test_bad_input_gets_a_clear_error_and_the_app_keeps_serving(running_app, tmp_path):
    not_image = tmp_path / "holiday.png"
    not_image.write_bytes(b"this is a text file, not a photo")
    client = Client(running_app.url, verbose=False)
    viewer = Viewer(running_app.ws_url)
    with pytest.raises(Exception) as failure:
        client.predict(handle_file(str(not_image)), handle_file(str(EXAMPLE_AUDIO)), api_name="/generate")
    assert "Could not read the image" in str(failure.value)
    error = viewer.wait_for(lambda m: m["type"] == "error", timeout=10)
    assert "Could not read the image" in error["message"]
    viewer.close()
    jobs = [d for d in os.listdir(running_app.outputs) if not d.startswith(".")]  # not the app's lock file
    assert all((running_app.outputs / d).joinpath("video.mp4").exists() for d in jobs)
    with urllib.request.urlopen(running_app.url, timeout=10) as response:  # still serving
        assert response.status == 200
    assert running_app.process.poll() is None


def test_cancelling_the_api_call_stops_the_job_and_keeps_nothing(running_app):
    client = Client(running_app.url, verbose=False)
    viewer = Viewer(running_app.ws_url)
    before = set(os.listdir(running_app.outputs))
    job = client.submit(handle_file(str(EXAMPLE_IMAGE)), handle_file(str(EXAMPLE_AUDIO)), api_name="/generate")
    started = viewer.wait_for(lambda m: m["type"] == "frame", timeout=30)
    assert job.cancel()
    status = viewer.wait_for(lambda m: m["type"] == "status" and m["stage"] == "cancelled" and
                             m["job"] == started["job"], timeout=15)
    viewer.close()
    assert status["message"]
    time.sleep(0.5)
    assert set(os.listdir(running_app.outputs)) == before  # the job's folder and partial mp4 are gone


def test_render_command_writes_the_mp4_and_refuses_bad_input_in_one_line(tmp_path):
    output = tmp_path / "out.mp4"
    ok = subprocess.run([sys.executable, str(ROOT / "app.py"), "render", "--image", str(EXAMPLE_IMAGE),
                         "--audio", str(EXAMPLE_AUDIO), "--output", str(output), "--engine", "lite"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert output.is_file() and "Audio: aac" in probe(str(output))
    assert "render" in ok.stderr and "by the lite engine" in ok.stderr

    silent = tmp_path / "empty.wav"
    silent.write_bytes(b"")
    bad = subprocess.run([sys.executable, str(ROOT / "app.py"), "render", "--image", str(EXAMPLE_IMAGE),
                          "--audio", str(silent), "--output", str(tmp_path / "bad.mp4")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    error_lines = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "audio" in error_lines[0].lower()
    assert not (tmp_path / "bad.mp4").exists()

    sadtalker = subprocess.run([sys.executable, str(ROOT / "app.py"), "render", "--image", str(EXAMPLE_IMAGE),
                                "--audio", str(EXAMPLE_AUDIO), "--output", str(tmp_path / "s.mp4"), "--engine",
                                "sadtalker", "--checkpoints", str(tmp_path)], capture_output=True, text=True)
    assert sadtalker.returncode == 2 and "Traceback" not in sadtalker.stderr
    assert "checkpoints/README.md" in sadtalker.stderr
