"""Shared fixtures: a folder for artifacts (screenshots, logs) and the app started as a real process."""
from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.paths import ARTIFACTS, ROOT, free_port


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS



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
