"""The app as an attacker or an accident meets it, as real processes: who may start it how, who may watch and
fetch, a flood of viewers, a kill -9 mid-render, a polite shutdown.

One app runs with a login (``--auth``), a tight open-file limit and a viewer cap; it is killed mid-render and a
second one starts on the same outputs folder, then is stopped with SIGTERM mid-render."""
from __future__ import annotations

import asyncio
import glob
import http.cookiejar
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image
from gradio_client import Client, handle_file
from websockets.asyncio.client import connect as connect_async
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from core.audio import load_audio, write_wav
from support.paths import EXAMPLE_AUDIO, EXAMPLE_IMAGE, ROOT, free_port
from web.access import FILE_HANDLE_RESERVE, upload_cache_dir

USER, PASSWORD = "ana", "correct horse"
FILE_LIMIT = FILE_HANDLE_RESERVE + 40  # what the app may open: 40 viewers beyond the reserve


@dataclass
class App:
    process: subprocess.Popen
    url: str
    ws_url: str
    outputs: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_app(outputs: Path, log_path: Path, *flags: str, file_limit: int | None = None) -> App:
    port, ws_port = free_port(), free_port()
    limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (file_limit, file_limit))) if file_limit else None
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--ws-port", str(ws_port),
             "--outputs", str(outputs), "--checkpoints", str(outputs.parent / "no-weights"), *flags],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit)
    app = App(process, f"http://127.0.0.1:{port}/", f"ws://127.0.0.1:{ws_port}/", outputs, log_path)
    deadline = time.monotonic() + 120
    while "SadTalker Live is running" not in app.log():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"app.py did not start:\n{app.log()}")
        time.sleep(0.25)
    return app


def stop_app(app: App) -> None:
    if app.process.poll() is None:
        app.process.terminate()  # a clean shutdown: it removes its uploads
        try:
            app.process.wait(30)
        except subprocess.TimeoutExpired:
            app.process.kill()
            app.process.wait(10)


def get(url: str, opener=None) -> tuple[int, bytes]:
    try:
        with (opener or urllib.request.build_opener()).open(url, timeout=20) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def logged_in_opener(app: App):
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    form = urllib.parse.urlencode({"username": USER, "password": PASSWORD}).encode()
    with opener.open(app.url + "login", data=form, timeout=20) as response:
        assert json.loads(response.read()) == {"success": True}
    return opener


def refusal(url: str) -> tuple[int, bytes]:
    with pytest.raises(InvalidStatus) as refused:
        connect(url).close()
    return refused.value.response.status_code, bytes(refused.value.response.body)


def long_speech(path: Path, seconds: float) -> Path:
    speech = load_audio(str(EXAMPLE_AUDIO))
    write_wav(str(path), np.tile(speech, int(np.ceil(seconds * 16000 / speech.size)))[:int(seconds * 16000)])
    return path


def wait_for_partial_video(outputs: Path, timeout: float = 60.0) -> Path:
    """The job folder of a render in progress: its hidden partial mp4 has frames in it, no video.mp4 yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for partial in glob.glob(str(outputs / "*" / ".video.partial-*.mp4")):
            folder = Path(partial).parent
            if os.path.getsize(partial) > 20_000 and not (folder / "video.mp4").exists():
                return folder
        time.sleep(0.05)
    raise AssertionError("no render in progress")


# ----------------------------------------------------------------------------------------------- starting
@pytest.mark.parametrize("flags, words", [
    (["--host", "0.0.0.0"], ["--host 0.0.0.0 lets other computers reach", "--auth USER:PASSWORD"]),
    (["--share"], ["public gradio.live link", "--auth USER:PASSWORD"]),
    (["--host", "0.0.0.0", "--auth", "ana"], ["--auth needs USER:PASSWORD"]),
], ids=["every interface", "share", "bad auth"])
def test_beyond_this_computer_the_app_starts_only_with_a_login(tmp_path, flags, words):
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(ROOT / "app.py"), "--port", str(free_port()), "--outputs",
                             str(tmp_path / "outputs"), *flags], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert all(word in result.stderr for word in words), result.stderr
    assert time.monotonic() - started < 30  # refused before anything loads or listens


# ----------------------------------------------------------------------------------------------- with a login
@pytest.fixture(scope="module")
def guarded(tmp_path_factory, artifacts_dir):
    """The app with a login, 1000 viewers asked for under an open-file limit that allows 40, then a kill -9."""
    outputs = tmp_path_factory.mktemp("guarded") / "outputs"
    app = start_app(outputs, artifacts_dir / "app_guarded.log", "--auth", f"{USER}:{PASSWORD}",
                    "--max-viewers", "1000", file_limit=FILE_LIMIT)
    yield app
    stop_app(app)


def test_the_login_guards_the_page_the_viewer_the_videos_and_the_stream(guarded):
    app = guarded
    assert "Live viewers: at most 40 (the open-file limit" in app.log()
    assert "WARNING" not in app.log()  # on this computer only: nothing exposed
    # A stranger: the login page, and nothing else.
    assert get(app.url)[0] == 200
    for path in ("config", "viewer", "viewer?token=guess", "outputs/20250101-120000-" + "0" * 32 + "/video.mp4"):
        assert get(app.url + path)[0] == 401, path
    status, body = refusal(app.ws_url)
    assert status == 403 and b"token" in body
    with pytest.raises(Exception, match="credentials"):
        Client(app.url, verbose=False)

    # Logged in: the page hands its viewers the token (embedded player and the viewer link).
    browser = logged_in_opener(app)
    status, config = get(app.url + "config", browser)
    assert status == 200
    tokens = set(re.findall(r"/viewer\?(?:embed=1&amp;)?token=([\w-]+)", config.decode()))
    assert len(tokens) == 1, tokens
    token = tokens.pop()
    assert len(token) >= 40  # 256 random bits, base64
    status, viewer = get(app.url + "viewer", browser)  # the viewer opened while logged in carries it too
    assert status == 200 and f'data-token="{token}"'.encode() in viewer
    assert get(app.url + f"viewer?token={token}")[0] == 200  # the link works in a browser that is not logged in
    with connect(f"{app.ws_url}?token={token}") as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"

    # A generation through the API (with the login); its video for the login or the token only.
    client = Client(app.url, auth=(USER, PASSWORD), verbose=False)
    result = client.predict(handle_file(str(EXAMPLE_IMAGE)), handle_file(str(EXAMPLE_AUDIO)), api_name="/generate")
    video_url = re.search(r"\((/outputs/[^)]+)\)", result[3]).group(1)
    job = video_url.split("/")[2]
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{32}", job)  # 128 random bits: not guessable
    assert get(app.url.rstrip("/") + video_url)[0] == 401
    for opener, query in ((None, f"?token={token}"), (browser, "")):
        status, video = get(app.url.rstrip("/") + video_url + query, opener)
        assert status == 200 and video == (app.outputs / job / "video.mp4").read_bytes()
    assert get(app.url + f"outputs/{job}/.sadtalker-live.lock?token={token}")[0] == 404
    # Gradio's cache holds the uploads and the result, no per-frame files (frames go over the WebSocket only)
    cached = sorted(os.path.basename(p) for p in glob.glob(os.path.join(upload_cache_dir(str(app.outputs)), "*", "*")))
    assert set(cached) <= {"portrait.png", "speech.wav", "video.mp4"} and len(cached) <= 4, cached


def test_with_every_viewer_slot_taken_the_page_and_generate_still_work(guarded):
    app = guarded
    browser = logged_in_opener(app)
    token = re.search(rb'data-token="([\w-]+)"', get(app.url + "viewer", browser)[1]).group(1).decode()
    opened, release = threading.Event(), threading.Event()
    holding: list = []

    async def hold(count: int) -> None:
        sockets = [await connect_async(f"{app.ws_url}?token={token}", close_timeout=1) for _ in range(count)]
        holding.extend(sockets)
        opened.set()
        while not release.is_set():
            await asyncio.sleep(0.05)
        await asyncio.gather(*(ws.close() for ws in sockets))  # never read from: each one's buffers are full

    thread = threading.Thread(target=asyncio.run, args=(hold(40),), daemon=True)
    thread.start()
    try:
        assert opened.wait(60) and len(holding) == 40
        status, body = refusal(f"{app.ws_url}?token={token}")
        assert status == 503 and b"full (40 connections)" in body
        assert get(app.url + "config", browser)[0] == 200  # the page
        client = Client(app.url, auth=(USER, PASSWORD), verbose=False)  # and Generate
        result = client.predict(handle_file(str(EXAMPLE_IMAGE)), handle_file(str(EXAMPLE_AUDIO)),
                                api_name="/generate")
        video = result[2]["video"] if isinstance(result[2], dict) else result[2]
        assert os.path.getsize(video) > 10_000 and "made by the **lite** engine" in result[3]
    finally:
        release.set()
        thread.join(30)
    assert "refused a viewer connection" in app.log()


# ----------------------------------------------------------------------------------------------- crashes
@pytest.fixture(scope="module")
def restarted(guarded, tmp_path_factory, artifacts_dir):
    """kill -9 of the guarded app mid-render, then a new app on its outputs folder (no login: this computer)."""
    folder = tmp_path_factory.mktemp("inputs")
    speech = long_speech(folder / "minute.wav", 60.0)
    portrait = folder / "portrait.png"  # not the example's bytes: the page caches the example itself at start
    Image.open(EXAMPLE_IMAGE).save(portrait, compress_level=1)
    client = Client(guarded.url, auth=(USER, PASSWORD), verbose=False)
    finished = {p.name for p in guarded.outputs.iterdir() if (p / "video.mp4").exists()}
    client.submit(handle_file(str(portrait)), handle_file(str(speech)), api_name="/generate")
    killed = wait_for_partial_video(guarded.outputs)
    uploads = upload_cache_dir(str(guarded.outputs))
    ours = {"minute.wav": speech.read_bytes(), "portrait.png": portrait.read_bytes()}
    left_behind = [p for p in glob.glob(os.path.join(uploads, "*", "*"))  # this job's uploads in Gradio's cache
                   if os.path.basename(p) in ours and Path(p).read_bytes() == ours[os.path.basename(p)]]
    guarded.process.send_signal(signal.SIGKILL)
    guarded.process.wait(10)
    assert killed.exists() and len(left_behind) == 2  # what the old version served after a restart / kept for ever
    app = start_app(guarded.outputs, artifacts_dir / "app_restarted.log")
    yield app, killed, finished, left_behind, speech
    stop_app(app)


def test_after_a_kill_mid_render_nothing_broken_is_served(restarted):
    app, killed, finished, left_behind, _ = restarted
    assert not killed.exists()  # the unfinished job's folder is gone
    assert get(app.url + f"outputs/{killed.name}/video.mp4")[0] == 404
    assert finished and all(get(app.url + f"outputs/{job}/video.mp4")[0] == 200 for job in finished)
    assert [path for path in left_behind if os.path.exists(path)] == []  # the killed run's uploads


def test_sigterm_mid_render_stops_the_job_its_ffmpeg_and_removes_this_runs_files(restarted):
    app, _, finished, _, speech = restarted
    client = Client(app.url, verbose=False)
    client.submit(handle_file(str(EXAMPLE_IMAGE)), handle_file(str(speech)), api_name="/generate")
    rendering = wait_for_partial_video(app.outputs)
    encoders = [child for child in psutil.Process(app.process.pid).children(recursive=True)
                if "ffmpeg" in child.name()]
    assert encoders
    app.process.send_signal(signal.SIGTERM)
    assert app.process.wait(30) == 0
    assert "Stopped." in app.log()
    assert not rendering.exists()
    assert not any(encoder.is_running() and encoder.status() != psutil.STATUS_ZOMBIE for encoder in encoders)
    assert not os.path.exists(upload_cache_dir(str(app.outputs)))
    assert all((app.outputs / job / "video.mp4").exists() for job in finished)  # finished videos stay
