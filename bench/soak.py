"""Memory over many jobs: the example generated back to back with the Lite engine, RSS printed every 20 jobs.

    python -m bench.soak [--jobs 200] [--every 20] [--app]

In-process (default): a Studio with a real Broadcaster (port 0) and one WebSocket viewer that follows every stream,
as the app runs it. ``--app``: ``app.py`` started as a process on free ports, each job through the Gradio API (what
the Generate button calls), RSS read from that process. Either way a job is started as soon as the previous one's
video is done (its live playback may still be going, as on the page), and RSS is read after the job of that number
has ended completely.

Target: RSS after 200 jobs <= RSS after 20 jobs + 30 MB.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_IMAGE = os.path.join(ROOT, "examples", "portrait.png")
EXAMPLE_AUDIO = os.path.join(ROOT, "examples", "speech.wav")


def rss_mb(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def threads(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def open_files(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def report(done: int, pid: int | str, started: float, first: list) -> None:
    """One line of figures; ``first`` keeps the first report's (job number, RSS) to compare with."""
    rss = rss_mb(pid)
    if not first:
        first.extend((done, rss))
    print(f"{done:5d} jobs  RSS {rss:7.1f} MB  ({rss - first[1]:+6.1f} MB since job {first[0]})  "
          f"threads {threads(pid):3d}  open files {open_files(pid):4d}  {time.monotonic() - started:6.0f} s",
          flush=True)


def viewer(url: str, stop: threading.Event) -> None:
    """A viewer tab: follows the latest stream, reads every message."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with connect(url, max_size=None) as ws:
        while not stop.is_set():
            try:
                ws.recv(timeout=0.5)
            except TimeoutError:
                continue
            except ConnectionClosed:  # the server stopped
                return


def soak_in_process(jobs: int, every: int) -> None:
    from core.options import Options
    from live.broadcaster import Broadcaster
    from live.studio import Studio

    outputs = tempfile.mkdtemp(prefix="soak-outputs-")
    broadcaster = Broadcaster(port=0).start()
    stop = threading.Event()
    watcher = threading.Thread(target=viewer, args=(broadcaster.url, stop), daemon=True)
    watcher.start()
    studio = Studio(broadcaster, outputs_dir=outputs, checkpoint_dir=os.path.join(outputs, "no-weights"))
    started, first = time.monotonic(), []
    try:
        for done in range(1, jobs + 1):
            job = studio.start(EXAMPLE_IMAGE, EXAMPLE_AUDIO, Options(seed=done))
            job.wait_generated(300)
            assert job.snapshot().state == "done", job.snapshot().error
            if done % every == 0:
                job.wait(60)  # its live playback ended too
                report(done, "self", started, first)
    finally:
        stop.set()
        broadcaster.stop()
        shutil.rmtree(outputs, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def soak_app(jobs: int, every: int) -> None:
    from gradio_client import Client, handle_file

    folder = tempfile.mkdtemp(prefix="soak-app-")
    port, ws_port = free_port(), free_port()
    with open(os.path.join(folder, "app.log"), "w") as log:
        app = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), "--port", str(port), "--ws-port",
                                str(ws_port), "--outputs", os.path.join(folder, "outputs"), "--checkpoints",
                                os.path.join(folder, "no-weights")], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:
                if app.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the app did not start: " + open(os.path.join(folder, "app.log")).read())
                time.sleep(0.5)
        threading.Thread(target=viewer, args=(f"ws://127.0.0.1:{ws_port}/", stop), daemon=True).start()
        started, first = time.monotonic(), []
        for done in range(1, jobs + 1):
            client.predict(handle_file(EXAMPLE_IMAGE), handle_file(EXAMPLE_AUDIO), api_name="/generate")
            if done % every == 0:
                time.sleep(6.5)  # the live playback of the example (5.8 s) ends
                report(done, app.pid, started, first)
    finally:
        stop.set()
        app.terminate()
        app.wait(30)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--app", action="store_true", help="through app.py and its Gradio API")
    parsed = parser.parse_args()
    print(json.dumps({"jobs": parsed.jobs, "mode": "app" if parsed.app else "in-process"}), flush=True)
    (soak_app if parsed.app else soak_in_process)(parsed.jobs, parsed.every)
