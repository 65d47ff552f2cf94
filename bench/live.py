"""Live-session figures (issue "live studio", point 11). Prints:

1. first idle frame latency at a viewer (target <= 150 ms): from ``Studio.start()`` to the frame's arrival at a
   viewer in another process; and through the real app: from the Gradio API call to the viewer;
2. first preview frame latency for 10 s of audio (target <= 1 s);
3. peak RSS of a whole generation for 10 s vs 60 s of audio (ratio target <= 1.2);
4. generation throughput with 50 viewers connected vs none (ratio target >= 0.95).

    python -m bench.live [--repeats 3] [--skip-app]

The speech clips are the example clip tiled to 10 s and 60 s. Viewers run in a separate process (like browser tabs)
and time-stamp with the system-wide monotonic clock, so their times compare with this process's.
"""
from __future__ import annotations

if __name__ in ("live",):  # imported by that name: bench/ is on the import path because a bench ran as a file
    raise ImportError("bench/live.py stands in for the live package here: run benchmarks as modules "
                      "from the repository root, e.g. python -m bench.session")

import argparse
import asyncio
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

EXAMPLE_IMAGE = ROOT / "examples" / "portrait.png"
EXAMPLE_AUDIO = ROOT / "examples" / "speech.wav"


# ------------------------------------------------------------------------------------------------ viewer process
def run_viewers(url: str, count: int, low_priority: bool) -> None:
    """``count`` viewers. The first is a WebSocket client that prints one JSON line per message (frames without
    their pixels). The others complete the WebSocket handshake and then read and discard every byte: the server
    sends them exactly what it sends a browser tab, but this process spends no CPU parsing it. For the throughput
    figure it also runs at the lowest priority (on a shared 2-core box the harness's own work would otherwise be
    measured as lost generation speed; real viewers are browsers, usually on other machines). A viewer starved of
    CPU is a slow viewer: the server then sends it only the latest frames, which is the behaviour under test.
    Latency figures use a viewer at normal priority."""
    from urllib.parse import urlparse

    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    address = urlparse(url)
    if low_priority:  # viewers stand in for browser tabs on other machines: the box's CPU belongs to generation
        os.nice(19)

    async def first_viewer(ws):
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                received = time.monotonic()
                message = json.loads(raw)
                message.pop("jpeg", None)
                message["received"] = received
                print(json.dumps(message), flush=True)

    async def raw_viewer():
        reader, writer = await asyncio.open_connection(address.hostname, address.port)
        writer.write(f"GET / HTTP/1.1\r\nHost: {address.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert b" 101 " in head.split(b"\r\n")[0], head
        return reader, writer  # the writer too: dropping it would close the connection

    async def discard(connection):
        reader, _writer = connection
        while await reader.read(1 << 20):
            pass

    async def main():
        ws = await connect(url, max_size=None, compression=None)
        others = [await raw_viewer() for _ in range(count - 1)]
        print(json.dumps({"type": "viewers-ready", "count": count}), flush=True)
        await asyncio.gather(first_viewer(ws), *(discard(connection) for connection in others))

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


class Viewers:
    """The viewer process, and what its first viewer saw."""

    def __init__(self, url: str, count: int, low_priority: bool = False):
        self.messages: list[dict] = []
        self._lock = threading.Condition()
        self.process = subprocess.Popen([sys.executable, "-m", "bench.live", "_viewers", url, str(count),
                                         str(int(low_priority))], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        threading.Thread(target=self._read, daemon=True).start()
        self.wait(lambda m: m["type"] == "viewers-ready", 30)
        self.wait(lambda m: m["type"] == "hello", 30)

    def _read(self):
        for line in self.process.stdout:
            with self._lock:
                self.messages.append(json.loads(line))
                self._lock.notify_all()

    def wait(self, predicate, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for message in self.messages:
                    if predicate(message):
                        return message
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("the viewer did not get the expected message")
                self._lock.wait(remaining)

    def first(self, job: str, quality: str, timeout: float = 60) -> float:
        return self.wait(lambda m: m.get("job") == job and m["type"] == "frame" and m["quality"] == quality,
                         timeout)["received"]

    def close(self):
        self.process.terminate()
        self.process.wait(10)


# ------------------------------------------------------------------------------------------------ helpers
def make_clip(seconds: float, folder: str) -> str:
    """The example speech tiled to ``seconds`` (16 kHz mono wav)."""
    import numpy as np

    from core.audio import load_audio, write_wav

    speech = load_audio(str(EXAMPLE_AUDIO))
    total = int(seconds * 16000)
    clip = np.tile(speech, total // speech.size + 1)[:total]
    path = os.path.join(folder, f"speech_{seconds:g}s.wav")
    write_wav(path, clip)
    return path


def fresh_portrait(folder: str, run: int) -> str:
    """The example portrait with one pixel changed: a photo the face detector has not seen (no cached landmarks),
    as every user's first upload is."""
    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(EXAMPLE_IMAGE).convert("RGB")).copy()
    rgb[0, 0] = (run * 37 + 11) % 256, run % 256, 7
    path = os.path.join(folder, f"portrait_{run}.png")
    Image.fromarray(rgb).save(path)
    return path


def studio_with_broadcaster(outputs: str):
    from live.broadcaster import Broadcaster
    from live.engines import load_engine
    from live.studio import Studio

    broadcaster = Broadcaster(port=0).start()
    studio = Studio(broadcaster, outputs_dir=outputs)
    load_engine("lite")
    warm(studio)
    return broadcaster, studio


def warm(studio) -> None:
    """A short job first, as the app does at start-up: models loaded, code paths warm."""
    with tempfile.TemporaryDirectory() as folder:
        job = studio.start(str(EXAMPLE_IMAGE), make_clip(1.0, folder))
        job.wait(60)


def median_ms(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1000:.0f} ms (runs: {', '.join(f'{v * 1000:.0f}' for v in values)})"


# ------------------------------------------------------------------------------------------------ measurements
def latencies(repeats: int, folder: str) -> None:
    clip10 = make_clip(10.0, folder)
    broadcaster, studio = studio_with_broadcaster(os.path.join(folder, "outputs"))
    viewers = Viewers(broadcaster.url, 1)
    idle, preview = [], []
    try:
        for run in range(repeats):
            image = fresh_portrait(folder, run)
            started = time.monotonic()
            job = studio.start(image, clip10)
            idle.append(viewers.first(job.id, "idle") - started)
            preview.append(viewers.first(job.id, "preview") - started)
            job.wait(120)
    finally:
        viewers.close()
        broadcaster.stop()
    print(f"1. first idle frame at a viewer after Studio.start():     {median_ms(idle)}  (target <= 150 ms)")
    print(f"2. first preview frame at a viewer, 10 s of audio:        {median_ms(preview)}  (target <= 1000 ms)")


def app_idle_latency(repeats: int) -> None:
    """Through the real app process: a browser click on Generate (files already uploaded, as a person does it) and
    a gradio_client API call (which uploads both files first) -> the first idle frame at a viewer."""
    import socket

    from gradio_client import Client, handle_file

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    port, ws_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as outputs:
        app = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--ws-port", str(ws_port),
                                "--outputs", outputs], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        viewers = None
        try:
            client = None
            deadline = time.monotonic() + 120
            while client is None:
                try:
                    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                except Exception:
                    if time.monotonic() > deadline or app.poll() is not None:
                        raise RuntimeError("the app did not start")
                    time.sleep(0.5)
            viewers = Viewers(f"ws://127.0.0.1:{ws_port}/", 1)

            def idle_after(started: float) -> tuple[float, float]:
                starting = viewers.wait(lambda m: m["type"] == "status" and m["stage"] == "starting"
                                        and m["received"] > started, 60)
                idle = viewers.first(starting["job"], "idle")
                viewers.wait(lambda m: m["type"] == "done" and m["job"] == starting["job"], 120)
                return idle - started, idle - starting["received"]

            api = []
            for _ in range(repeats + 1):  # the first call of a fresh app process also warms it
                started = time.monotonic()
                client.submit(handle_file(str(EXAMPLE_IMAGE)), handle_file(str(EXAMPLE_AUDIO)), api_name="/generate")
                api.append(idle_after(started))
            clicks = browser_clicks(f"http://127.0.0.1:{port}/", repeats, idle_after, outputs)
        finally:
            if viewers is not None:
                viewers.close()
            app.terminate()
            app.wait(20)
    if clicks:
        print(f"1b. app in Chromium, click Generate -> first idle frame:  {median_ms([c[0] for c in clicks])}"
              f"  (a new photo each click, uploaded before it)")
        print(f"    job start -> first idle frame in those clicks:        {median_ms([c[1] for c in clicks])}")
    api = api[1:]
    print(f"1c. app via gradio_client, call -> first idle frame:      {median_ms([a[0] for a in api])}"
          f"  (includes uploading both files)")
    print(f"    job start -> first idle frame in those calls:         {median_ms([a[1] for a in api])}")


def browser_clicks(url: str, repeats: int, idle_after, folder: str) -> list[tuple[float, float]]:
    chromium = "/usr/bin/chromium"
    if not os.path.exists(chromium):
        print("1b. (skipped: no /usr/bin/chromium)")
        return []
    from playwright.sync_api import sync_playwright

    results = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(url)
        page.locator("input[type=file]").nth(1).set_input_files(str(EXAMPLE_AUDIO))
        for run in range(repeats):
            # a photo the app has not seen: upload it (as a person does before clicking), then click
            page.locator("input[type=file]").nth(0).set_input_files(fresh_portrait(folder, 100 + run))
            page.wait_for_timeout(2000)  # the upload finishes
            # the click's own time stamp, taken in the page (Playwright's click adds its own checks before it)
            clicked_epoch_ms = page.evaluate("""() => {
                const button = [...document.querySelectorAll('button')].find(b => b.textContent.trim() === 'Generate');
                const at = performance.timeOrigin + performance.now();
                button.click();
                return at;
            }""")
            started = clicked_epoch_ms / 1000 - (time.time() - time.monotonic())
            results.append(idle_after(started))
        browser.close()
    return results


def rss_child(seconds: float) -> None:
    """One whole generation in this (fresh) process; prints its peak RSS."""
    with tempfile.TemporaryDirectory() as folder:
        clip = make_clip(seconds, folder)
        broadcaster, studio = studio_with_broadcaster(os.path.join(folder, "outputs"))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        job = studio.start(str(EXAMPLE_IMAGE), clip)
        job.wait(600)
        snap = job.snapshot()
        assert snap.state == "done", snap
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        broadcaster.stop()
    print(json.dumps({"seconds": seconds, "peak_kb": peak, "before_kb": before, "frames": snap.total}))


def peak_rss() -> None:
    results = {}
    for seconds in (10.0, 60.0):
        out = subprocess.run([sys.executable, "-m", "bench.live", "_rss", str(seconds)], capture_output=True, text=True,
                             cwd=ROOT)
        if out.returncode != 0:
            raise RuntimeError(out.stderr)
        results[seconds] = json.loads(out.stdout.strip().splitlines()[-1])
    r10, r60 = results[10.0], results[60.0]
    print(f"3. peak RSS of a generation: 10 s audio {r10['peak_kb'] / 1024:.0f} MiB ({r10['frames']} frames), "
          f"60 s audio {r60['peak_kb'] / 1024:.0f} MiB ({r60['frames']} frames): "
          f"ratio {r60['peak_kb'] / r10['peak_kb']:.3f}  (target <= 1.2)")


def throughput(repeats: int, folder: str) -> None:
    """Runs alternate between no viewers and 50; besides wall-clock speed, the CPU time this process and its ffmpeg
    spent per frame (less sensitive to other work on a shared box than wall-clock time)."""
    clip = make_clip(10.0, folder)
    broadcaster, studio = studio_with_broadcaster(os.path.join(folder, "outputs"))
    fps: dict[int, list[float]] = {0: [], 50: []}
    cpu_ms: dict[int, list[float]] = {0: [], 50: []}
    try:
        for _ in range(repeats):
            for count in (0, 50):
                viewers = Viewers(broadcaster.url, count, low_priority=True) if count else None
                if viewers:
                    deadline = time.monotonic() + 10
                    while broadcaster.viewer_count < count and time.monotonic() < deadline:
                        time.sleep(0.05)
                    assert broadcaster.viewer_count == count, broadcaster.viewer_count
                cpu_before = cpu_seconds()
                started = time.monotonic()
                job = studio.start(str(EXAMPLE_IMAGE), clip)
                job.wait(300)
                elapsed = time.monotonic() - started
                frames = job.snapshot().total
                fps[count].append(frames / elapsed)
                cpu_ms[count].append((cpu_seconds() - cpu_before) / frames * 1000)
                if viewers:
                    viewers.close()
                    time.sleep(0.5)
    finally:
        broadcaster.stop()
    none, many = statistics.median(fps[0]), statistics.median(fps[50])
    print(f"4. generation throughput (10 s audio, start to done): no viewers {none:.1f} fps "
          f"(runs {', '.join(f'{v:.1f}' for v in fps[0])}), 50 viewers {many:.1f} fps "
          f"(runs {', '.join(f'{v:.1f}' for v in fps[50])}): ratio {many / none:.3f}  (target >= 0.95)")
    cpu_none, cpu_many = statistics.median(cpu_ms[0]), statistics.median(cpu_ms[50])
    print(f"   CPU per frame (this process + ffmpeg): no viewers {cpu_none:.1f} ms, 50 viewers {cpu_many:.1f} ms: "
          f"throughput ratio if CPU-bound {cpu_none / cpu_many:.3f}")


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_viewers":
        return run_viewers(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1")
    if len(sys.argv) > 1 and sys.argv[1] == "_rss":
        return rss_child(float(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-app", action="store_true", help="skip the measurement through the real app")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    print(f"SadTalker Live, live-session figures ({os.cpu_count()} CPUs, median of {args.repeats})", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        latencies(args.repeats, folder)
        if not args.skip_app:
            app_idle_latency(args.repeats)
        peak_rss()
        throughput(args.repeats, folder)


if __name__ == "__main__":
    main()
