"""Sound and picture in a real browser: how soon the speech is heard, and how well the mouth keeps with it.

    python -m bench.av_sync [--engines lite,sadtalker] [--clips example,30s] [--watch page,tab] [--repeats 2]

For each engine and clip: the app is started (``app.py``; SadTalker on synthetic official-layout weights, written
once into the temp dir), the portrait and the speech are uploaded in the page, and Generate is clicked in Chromium
(Playwright, ``--autoplay-policy=no-user-gesture-required``, so Web Audio plays without a click). Where it is
watched (``--watch``): ``page``, the page's own live player (what the person who clicked sees and hears); ``tab``,
a viewer in its own tab beside the page (two players on the same CPU). Printed per run:

* click -> first sound (ms): from the click (the button pressed, by the browser's clock) to the moment the first piece of speech starts to sound in the viewer
  (its scheduled start on the Web Audio clock, output latency included); with two steps on the way: the job seen
  by the viewer (Gradio's share), and the first audio message's arrival (the server's share; the rest is the
  viewer's play-out delay and the output latency);
* A/V skew p50 / p95 / max (ms): the viewer's ``liveStats`` — each drawn frame's time minus the speech clock at
  the moment it is drawn;
* drawn fps during the playback with sound, and frames dropped (late, so not drawn late).

Targets on a 2-core box: first sound <= 300 ms (Lite), |skew| p95 <= 40 ms, drawn fps >= 24. SadTalker on a CPU
renders seconds per frame: its run measures the preview playback (motion-true, with sound) and then stops the job.
"""
from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_IMAGE = ROOT / "examples" / "portrait.png"
EXAMPLE_AUDIO = ROOT / "examples" / "speech.wav"
CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiled_clip(seconds: float, folder: str) -> str:
    """The example speech repeated to ``seconds`` (16-bit mono wav)."""
    with wave.open(str(EXAMPLE_AUDIO)) as w:
        rate, data = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), "<i2")
    samples = np.tile(data, int(np.ceil(seconds * rate / data.size)))[:int(seconds * rate)]
    path = str(Path(folder) / f"speech_{int(seconds)}s.wav")
    with wave.open(path, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
    return path


class App:
    def __init__(self, checkpoints: str, outputs: str):
        self.port, self.ws_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--port", str(self.port), "--ws-port", str(self.ws_port),
             "--outputs", outputs, "--checkpoints", checkpoints], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(self.url + "viewer", timeout=2)
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the app did not start")
                time.sleep(0.3)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(20)


def live_stats(page) -> dict:
    return page.evaluate("() => JSON.parse(JSON.stringify(window.liveStats))")


def status_text(page) -> str:
    return page.inner_text("#status")


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def embedded_player(page, since_epoch_ms: float, timeout: float = 30.0):
    """The page's own live player (the viewer embedded in it), once it has the speech of a job started after
    ``since_epoch_ms``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for frame in page.frames:
            if "/viewer?embed=1" in frame.url:
                try:
                    if frame.evaluate("since => (window.liveStats.first_audio_epoch_ms || 0) > since",
                                      since_epoch_ms):
                        return frame
                except Exception:  # the frame is still loading
                    pass
        page.wait_for_timeout(20)  # (Playwright learns of new frames only while it waits on the browser)
    raise RuntimeError("timed out waiting for the page's live player")


def one_run(browser, app: App, audio: str, engine: str, watch: str) -> dict:
    tab = None
    if watch == "tab":
        tab = browser.new_context(viewport={"width": 1000, "height": 700}).new_page()
        tab.goto(app.url + "viewer")
        tab.wait_for_function("document.getElementById('connection').dataset.state === 'open'", timeout=15000)
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.goto(app.url)
    page.get_by_text("Engine:").first.wait_for(timeout=60000)
    page.locator("#portrait input[type=file]").set_input_files(str(EXAMPLE_IMAGE))
    page.locator("#speech input[type=file]").set_input_files(audio)
    page.locator("#speech audio, #speech .waveform-container, #speech [data-testid='waveform-Speech']").first \
        .wait_for(state="attached", timeout=30000)
    time.sleep(1.0)  # the face is found on upload; let that finish as a person would before clicking
    # The click's moment is the browser's: Playwright spends 50-100 ms on its checks (visible, stable, hit) before
    # it presses the button, which a person's click does not.
    page.evaluate("() => document.addEventListener('pointerdown', event => {"
                  " window.benchPressedAt = performance.timeOrigin + event.timeStamp; }, true)")
    page.get_by_role("button", name="Generate").click()
    clicked = page.evaluate("() => window.benchPressedAt")
    viewer = tab if tab is not None else embedded_player(page, clicked)
    first_sound = wait_for(lambda: live_stats(viewer)["first_sound_epoch_ms"], 120, "the first sound")
    # the clip's playback with sound: until the stream renders (slow engine) or is finished (fast engine)
    wait_for(lambda: any(word in status_text(viewer) for word in ("Rendering", "ready", "Stopped")), 600,
             "the end of the playback")
    drawn = live_stats(viewer)
    if engine == "sadtalker":
        page.get_by_role("button", name="Stop").click()
        wait_for(lambda: "Stopped" in status_text(viewer), 60, "the stop")
    skews = sorted(abs(x) for x in drawn["skews"])
    result = {
        "first_sound_ms": first_sound - clicked,
        "job_seen_ms": drawn["job_seen_epoch_ms"] - clicked,
        "first_audio_ms": drawn["first_audio_epoch_ms"] - clicked,
        "skew_p50": skews[len(skews) // 2] if skews else float("nan"),
        "skew_p95": skews[int(0.95 * (len(skews) - 1))] if skews else float("nan"),
        "skew_max": skews[-1] if skews else float("nan"),
        "drawn_fps": drawn["playback_fps"],
        "dropped": drawn["dropped"],
        "frames": len(skews),
    }
    page.context.close()
    if tab is not None:
        tab.context.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="lite,sadtalker")
    parser.add_argument("--clips", default="example,30s")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--watch", default="page,tab",
                        help="where the stream is watched and measured: 'page' (the page's own live player, the "
                             "page alone in the browser), 'tab' (a viewer in its own tab beside the page); "
                             "comma-separated, each run separately")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as folder, sync_playwright() as playwright:
        clips = {"example": str(EXAMPLE_AUDIO), "30s": tiled_clip(30, folder)}
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        for engine in args.engines.split(","):
            if engine == "sadtalker":
                from sadtalker.synthetic import cached_official_layout

                checkpoints = cached_official_layout(legacy=False)
            else:
                checkpoints = str(Path(folder) / "no-weights")
                Path(checkpoints).mkdir(exist_ok=True)
            app = App(checkpoints, str(Path(folder) / f"outputs-{engine}"))
            try:
                for clip, watch in [(c, w) for c in args.clips.split(",") for w in args.watch.split(",")]:
                    runs = [one_run(browser, app, clips[clip], engine, watch) for _ in range(args.repeats)]
                    for run in runs:
                        print(f"{engine:9s} {clip:7s} {watch:4s} click->first sound {run['first_sound_ms']:6.0f} ms "
                              f"(job seen {run['job_seen_ms']:4.0f}, "
                              f"first audio message {run['first_audio_ms']:4.0f} ms) | "
                              f"skew p50 {run['skew_p50']:4.0f} p95 {run['skew_p95']:4.0f} "
                              f"max {run['skew_max']:4.0f} ms"
                              f" ({run['frames']} frames) | drawn {run['drawn_fps']:4.1f} fps | "
                              f"dropped {run['dropped']}", flush=True)
                    print(f"{engine:9s} {clip:7s} {watch:4s} median first sound "
                          f"{statistics.median(r['first_sound_ms'] for r in runs):.0f} ms, worst skew p95 "
                          f"{max(r['skew_p95'] for r in runs):.0f} ms, lowest drawn fps "
                          f"{min(r['drawn_fps'] for r in runs):.1f}  (targets: <= 300 ms Lite, <= 40 ms, >= 24)",
                          flush=True)
            finally:
                app.close()
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
