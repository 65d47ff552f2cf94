"""Shared test setup: the repository root on sys.path and a folder for artifacts (screenshots, logs)."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ARTIFACTS = ROOT / "tests" / "artifacts"


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningApp:
    url: str  # http://127.0.0.1:<port>/
    ws_url: str
    outputs: Path
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def running_app(tmp_path_factory, artifacts_dir):
    """``python app.py`` started as a real process on free ports (shared by the end-to-end and browser tests)."""
    outputs = tmp_path_factory.mktemp("outputs")
    port, ws_port = free_port(), free_port()
    log_path = artifacts_dir / "app.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--ws-port", str(ws_port),
             "--outputs", str(outputs), "--checkpoints", str(tmp_path_factory.mktemp("no-weights"))],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    app = RunningApp(f"http://127.0.0.1:{port}/", f"ws://127.0.0.1:{ws_port}/", outputs, process, log_path)
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            pytest.fail(f"app.py exited with {process.returncode}:\n{app.log()}")
        try:
            with urllib.request.urlopen(app.url + "viewer", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"app.py did not start within 120 s:\n{app.log()}")
        time.sleep(0.25)
    yield app
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()


# ------------------------------------------------------------------------------------------------------------------
# A pace-controlled engine for testing the live display policy. The real engines render at fixed speeds (the lite
# engine faster than real time, SadTalker on a CPU far slower), and the policy must be right for both; this engine
# follows the generate() contract exactly (typed events, one frame at a time, streaming mp4 through the real
# Mp4Writer and ffmpeg) and encodes what it drew in the pixels, so tests can tell which frame a viewer was shown.
# ------------------------------------------------------------------------------------------------------------------
import time as _time

import numpy as _np

from core.audio import load_audio as _load_audio, num_video_frames as _num_video_frames
from core.engine import Done as _Done, Frame as _Frame, MotionReady as _MotionReady, Progress as _Progress
from core.image import load_image as _load_image
from core.video import Mp4Writer as _Mp4Writer


def frame_code(index: int) -> int:
    """The red level that marks frame ``index`` (distinct, JPEG-safe steps of 6)."""
    return 12 + (index * 6) % 240


def decode_code(red_level: float) -> int:
    return round((red_level - 12) / 6)


class ScriptedPreview:
    def __init__(self, num_frames: int):
        self.num_frames = num_frames
        self.rendered: list[int] = []

    def render(self, index: int) -> _np.ndarray:
        self.rendered.append(index)
        frame = _np.zeros((128, 128, 3), _np.uint8)
        frame[..., 0] = frame_code(index)
        frame[..., 1] = 200  # green = preview
        return frame


class ScriptedIdle:
    def __init__(self, rgb: _np.ndarray, size: int = 128):
        self.size = size

    def render(self, t: float) -> _np.ndarray:
        return _np.full((self.size, self.size, 3), 128, _np.uint8)  # grey = idle


class ScriptedEngine:
    def __init__(self, name: str = "lite", num_frames: int | None = None, final_fps: float = 50.0,
                 motion_delay_s: float = 0.1, size: tuple[int, int] = (96, 128), fail_at: int | None = None,
                 error: Exception | None = None, first_frame_delay_s: float = 0.0, tint: int = 200):
        self.name = name
        self.first_frame_delay_s, self.tint = first_frame_delay_s, tint
        self.num_frames, self.final_fps, self.motion_delay_s = num_frames, final_fps, motion_delay_s
        self.height, self.width = size
        self.fail_at, self.error = fail_at, error
        self.closed = False
        self.frames_made = 0
        self.preview: ScriptedPreview | None = None

    def generate(self, image, audio, options):
        self.closed = False
        try:
            _load_image(image)
            yield _Progress("audio", 0, 1, "Reading the audio")
            samples = _load_audio(audio, options.max_audio_s)
            num_frames = self.num_frames or _num_video_frames(samples.size)
            _time.sleep(self.motion_delay_s)
            yield _Progress("motion", 1, 1, "Motion computed")
            self.preview = ScriptedPreview(num_frames)
            yield _MotionReady(num_frames, 25.0, self.preview)
            writer = None
            if options.output:
                writer = _Mp4Writer(options.output, self.width, self.height, audio_path=audio,
                                    duration_s=num_frames / 25)
            start = _time.monotonic() + self.first_frame_delay_s
            try:
                for index in range(num_frames):
                    if self.fail_at is not None and index == self.fail_at:
                        raise self.error
                    wait = start + index / self.final_fps - _time.monotonic()
                    if wait > 0:
                        _time.sleep(wait)
                    rgb = _np.zeros((self.height, self.width, 3), _np.uint8)
                    rgb[..., 0] = frame_code(index)
                    rgb[..., 2] = self.tint  # blue = final
                    if writer is not None:
                        writer.write(rgb)
                    self.frames_made += 1
                    yield _Frame(index, index / 25, "final", rgb)
                path = writer.close() if writer is not None else None
            except BaseException:
                if writer is not None:
                    writer.abort()
                raise
            yield _Done(path, num_frames, num_frames / 25, self.name)
        finally:
            self.closed = True
