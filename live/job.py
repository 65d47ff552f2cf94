"""Live generation jobs: idle -> preview -> final frames on a paced display clock, progress with ETA, mp4 at the end.

A job runs two threads:

* the **engine thread** iterates ``engine.generate()`` as fast as the engine goes (the mp4 encoder inside the engine
  gets every frame) and records the newest state: stage, progress, the motion (``MotionReady``), the latest final frame;
* the **display thread** publishes at most 25 frames per second to viewers (broadcaster) and to the page
  (``Job.updates()``): what it shows at each tick is ``display.decide``'s choice (idle, then the preview rendered on
  demand, so nothing holds the clip, then final frames). A slow renderer's final frames are kept for the
  progressive preview as display-size JPEGs, a few KB each, encoded once.

Cancelling (``Job.cancel()``) stops iterating the engine: the engine's generator is closed, which stops its encoder
and removes the partial mp4; the job's folder is removed too.
"""
from __future__ import annotations

import io
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import numpy as np
from PIL import Image

from core.engine import Done, Engine, Frame, MotionReady, PreviewRenderer, Progress
from core.errors import SadTalkerError
from core.image import load_image
from core.options import FPS, Options

from .broadcaster import Broadcaster, encode_jpeg
from .display import SLIDESHOW_BELOW_FPS, Memory, Tick, decide
from .progress import RenderRate

log = logging.getLogger(__name__)

DISPLAY_FPS = FPS  # never show viewers more than this many frames per second
DISPLAY_MAX_SIDE = 512  # full-size final frames are shown downscaled (the mp4 keeps full size)
PROGRESS_INTERVAL_S = 0.1  # progress messages at most 10 per second
IDLE_HEAD_START_S = 0.5  # the engine waits at most this long for the idle animation to be on screen
FINAL_JPEG_QUALITY = 85  # final frames kept for the progressive preview

JobState = Literal["running", "done", "error", "cancelled"]


@dataclass(frozen=True)
class DisplayFrame:
    seq: int  # 1, 2, 3 ... per job, in the order shown
    t: float  # idle: seconds since the animation started; preview/final: time in the clip
    quality: Literal["idle", "preview", "final"]
    pixels: np.ndarray | None  # (H, W, 3) uint8, or None when only the JPEG exists
    jpeg: bytes | None = None

    @property
    def rgb(self) -> np.ndarray:
        return self.pixels if self.pixels is not None else np.asarray(Image.open(io.BytesIO(self.jpeg)).convert("RGB"))


@dataclass(frozen=True)
class JobSnapshot:
    """What the page shows at one moment."""

    job_id: str
    engine: str
    state: JobState
    stage: str
    message: str
    done: int
    total: int
    eta_s: float | None
    frame: DisplayFrame | None
    video_path: str | None = None
    video_url: str | None = None
    duration_s: float | None = None
    error: str | None = None  # a message for the user when state == "error"
    user_error: bool = False  # the error is the user's to fix (bad input) rather than a bug
    elapsed_s: float = 0.0


class Job:
    def __init__(self, job_id: str, engine: Engine, image_path: str, audio_path: str, options: Options,
                 out_dir: str | None, video_url: str | None, broadcaster: Broadcaster | None,
                 idle_animator_factory: Callable[[np.ndarray], object]):
        self.id = job_id
        self.engine = engine
        self.image_path, self.audio_path = image_path, audio_path
        self.options = options
        self.out_dir = out_dir
        self.video_url = video_url
        self._broadcaster = broadcaster
        self._idle_factory = idle_animator_factory
        self._cond = threading.Condition()
        self._version = 0  # bumped on every change a page would show
        self._cancel = threading.Event()
        self._idle_ready = threading.Event()
        self._finished = threading.Event()
        self.started_at = time.monotonic()
        # --- state shared between the threads (guarded by _cond) ---
        self._state: JobState = "running"
        self._stage, self._message = "starting", "Starting…"
        self._done = self._total = 0
        self._eta_s: float | None = None
        self._motion: MotionReady | None = None
        self._render_started: float | None = None  # when the motion was known (final rendering starts)
        self._latest_final: Frame | None = None
        self._slow_render = False  # the renderer is slower than SLIDESHOW_BELOW_FPS (from its second frame on)
        self._kept_finals: dict[int, bytes] = {}  # index -> display-size JPEG, while the renderer is slow
        self._engine_finished: Done | None = None
        self._display: DisplayFrame | None = None
        self._error: str | None = None
        self._user_error = False
        self._result: Done | None = None
        self._rate = RenderRate()
        self._last_progress_sent = 0.0
        self._seq = 0
        self._engine_thread = threading.Thread(target=self._run_engine, name=f"engine-{job_id}", daemon=True)
        self._display_thread = threading.Thread(target=self._run_display, name=f"display-{job_id}", daemon=True)

    # ------------------------------------------------------------------------------------------------ control
    def start(self) -> "Job":
        self._status("starting", f"Starting the {self.engine.name} engine…")
        self._display_thread.start()
        self._engine_thread.start()
        return self

    def cancel(self) -> None:
        """Stop the job; returns at once (``wait()`` for the clean-up to finish)."""
        self._cancel.set()
        with self._cond:
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def snapshot(self) -> JobSnapshot:
        with self._cond:
            return self._snapshot_locked()

    def updates(self, max_fps: float = DISPLAY_FPS, heartbeat_s: float = 1.0) -> Iterator[JobSnapshot]:
        """Snapshots whenever something changed (at most ``max_fps`` per second), ending with the final one."""
        seen = -1
        interval = 1.0 / max_fps
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._version != seen, timeout=heartbeat_s)
                seen = self._version
                snapshot = self._snapshot_locked()
            yield snapshot
            if snapshot.state != "running" and self._finished.is_set():
                return
            time.sleep(interval)

    # ------------------------------------------------------------------------------------------------ engine thread
    def _run_engine(self) -> None:
        # Let the idle animation reach the screen before the engine competes for the CPU (bounded head start).
        self._idle_ready.wait(IDLE_HEAD_START_S)
        events = None
        try:
            if not self._cancel.is_set():
                events = self.engine.generate(self.image_path, self.audio_path, self.options)
                for event in events:
                    if self._cancel.is_set():
                        break
                    self._on_event(event)
        except SadTalkerError as exc:
            self._fail(str(exc), user_error=True)
        except Exception as exc:  # a bug: keep the traceback in the log, tell the user something useful
            log.exception("job %s failed", self.id)
            self._fail(f"Generation failed unexpectedly ({exc.__class__.__name__}: {exc}). See the server log.",
                       user_error=False)
        finally:
            if events is not None:
                events.close()  # stops the engine's encoder and removes its partial file if it did not finish
        with self._cond:
            if self._engine_finished is None and self._state == "running":
                if self._cancel.is_set():
                    self._state = "cancelled"
                else:
                    self._state, self._error = "error", "The engine stopped without producing a video."
                    log.error("job %s: engine stopped without a Done event", self.id)
            self._cond.notify_all()
        self._display_thread.join()
        self._finish()

    def _on_event(self, event) -> None:
        now = time.monotonic()
        if isinstance(event, Frame):
            kept = self._keep_final(event, now)
            with self._cond:
                self._latest_final = event
                if kept is not None:
                    self._kept_finals[event.index] = kept
                self._rate.frame(now)
                self._done = event.index + 1
                self._total = max(self._total, self._done)
                self._eta_s = self._rate.eta_s(self._done, self._total)
                if self._stage != "render":
                    self._stage, self._message = "render", "Rendering full-quality frames"
                    status = True
                else:
                    status = False
                self._version += 1
            if status:
                self._status("render", "Rendering full-quality frames")
            self._send_progress(now, force=self._done >= self._total)
        elif isinstance(event, Progress):
            # Stages are reported as status lines; the progress bar counts frames (Frame events drive it).
            with self._cond:
                stage_changed = event.stage != self._stage
                # within a stage, only its first and last step are news (not "Rendered 35/105 frames" every 5)
                milestone = event.message and event.message != self._message and event.done in (0, event.total)
            if stage_changed or milestone:
                self._status(event.stage, event.message or event.stage)
        elif isinstance(event, MotionReady):
            with self._cond:
                self._motion = event
                self._render_started = now
                self._rate.started(now)
                self._total = event.num_frames
                self._done = 0
                self._version += 1
                self._cond.notify_all()  # the display thread starts the preview now
            self._send_progress(now, force=True)
        elif isinstance(event, Done):
            with self._cond:
                self._engine_finished = event
                self._done = self._total = event.num_frames
                self._eta_s = 0.0
                self._version += 1
                self._cond.notify_all()
        else:
            log.warning("job %s: ignored an unknown event %r", self.id, type(event).__name__)

    def _keep_final(self, frame: Frame, now: float) -> bytes | None:
        """Decide whether the renderer is slow (average rate since the motion was known, set-up included, from the
        second frame on) and, while it may be, return the frame as a display-size JPEG for the progressive preview."""
        with self._cond:
            started = self._render_started
        if started is None:
            return None
        done = frame.index + 1
        slow = done >= 2 and done / max(now - started, 1e-6) < SLIDESHOW_BELOW_FPS
        with self._cond:
            self._slow_render = slow
        if done >= 2 and not slow:
            return None
        return encode_jpeg(_fit_for_display(frame.rgb), quality=FINAL_JPEG_QUALITY)

    def _send_progress(self, now: float, force: bool = False) -> None:
        if self._broadcaster is None or (not force and now - self._last_progress_sent < PROGRESS_INTERVAL_S):
            return
        self._last_progress_sent = now
        with self._cond:
            done, total, eta, stage = self._done, self._total, self._eta_s, self._stage
        self._broadcaster.publish_progress(self.id, done, total, eta, stage)

    # ------------------------------------------------------------------------------------------------ display thread
    def _run_display(self) -> None:
        idle = None
        try:
            idle = self._idle_factory(load_image(self.image_path))
        except SadTalkerError as exc:  # not an image / no face: the engine would fail the same way, but later
            self._fail(str(exc), user_error=True)
            self._cancel.set()
        except Exception:
            log.exception("job %s: the idle animation failed; continuing without it", self.id)
        if idle is not None and not self._cancel.is_set():
            self._status("idle", "Animating the face while the motion is computed…")
        tick = 1.0 / DISPLAY_FPS
        idle_start = time.monotonic()
        next_tick = idle_start
        preview: PreviewRenderer | None = None
        preview_start = 0.0
        memory = Memory()
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._stop_display_locked() or
                                        (preview is None and self._motion is not None),
                                        timeout=max(0.0, next_tick - time.monotonic()))
                    motion, final, finished = self._motion, self._latest_final, self._engine_finished
                    slow, kept = self._slow_render, self._kept_finals
                    if self._stop_display_locked() and finished is None:
                        return  # cancelled or failed
                now = time.monotonic()
                if finished is not None:
                    # The clip is complete: make sure the last final frame is what viewers keep.
                    if final is not None and final.index != memory.shown_final:
                        self._show("final", final.time_s, final.rgb)
                    return
                if motion is None:
                    if idle is not None and now >= next_tick:
                        self._show("idle", now - idle_start, idle.render(now - idle_start))
                        self._idle_ready.set()
                else:
                    if preview is None:  # motion just became known: the preview starts this instant
                        preview, preview_start, next_tick = motion.preview, now, now
                        self._idle_ready.set()
                        self._status("preview", "Playing the preview while full-quality frames render…")
                    if now < next_tick:
                        continue
                    view = Tick(playhead=int((now - preview_start) * DISPLAY_FPS), num_frames=motion.num_frames,
                                latest_final=None if final is None else final.index, slow=slow, kept=kept)
                    show, memory = decide(view, memory)
                    if show is None:
                        pass
                    elif show.kept:
                        self._show("final", show.index / motion.fps, jpeg=kept[show.index])
                    elif show.quality == "final":
                        self._show("final", final.time_s, final.rgb)
                    else:
                        self._show("preview", show.index / motion.fps, preview.render(show.index))
                if now >= next_tick:
                    next_tick += tick
                    if next_tick < now:  # fell behind (busy CPU): drop display frames rather than burst
                        next_tick = now + tick
        except Exception:
            log.exception("job %s: the live display failed; generation continues", self.id)
        finally:
            self._idle_ready.set()

    def _stop_display_locked(self) -> bool:
        return self._cancel.is_set() or self._state != "running" or self._engine_finished is not None

    def _show(self, quality: str, t: float, rgb: np.ndarray | None = None, jpeg: bytes | None = None) -> None:
        """Publish a frame given as pixels or as an already encoded display-size JPEG (encoded once either way)."""
        if rgb is not None:
            rgb = _fit_for_display(rgb)
        with self._cond:
            self._seq += 1
            self._display = DisplayFrame(self._seq, t, quality, rgb, jpeg)
            self._version += 1
            self._cond.notify_all()
            seq = self._seq
        if self._broadcaster is not None:
            self._broadcaster.publish_frame(self.id, seq, t, quality, rgb=rgb, jpeg=jpeg)

    # ------------------------------------------------------------------------------------------------ outcome
    def _fail(self, message: str, user_error: bool) -> None:
        with self._cond:
            if self._state != "running":
                return  # the first failure is the one reported
            self._state, self._error, self._user_error = "error", message, user_error
            self._version += 1
            self._cond.notify_all()

    def _finish(self) -> None:
        with self._cond:
            if self._state == "running" and self._engine_finished is not None:
                self._state, self._result = "done", self._engine_finished
            state, error = self._state, self._error
        if state != "done" and self.out_dir is not None:
            shutil.rmtree(self.out_dir, ignore_errors=True)  # no half-written results stay behind
        if self._broadcaster is not None:
            if state == "done":
                result = self._result
                self._send_progress(time.monotonic(), force=True)
                self._status("done", f"Done: {result.duration_s:.1f} s video by the {result.engine} engine "
                                     f"in {time.monotonic() - self.started_at:.1f} s")
                self._broadcaster.publish_done(self.id, self.video_url if result.video_path else None,
                                               result.duration_s, result.engine, result.num_frames)
            elif state == "cancelled":
                self._status("cancelled", "Stopped.")
            else:
                self._broadcaster.publish_error(self.id, error or "Generation failed.")
                self._status("error", error or "Generation failed.")
        with self._cond:
            if state == "done":
                self._stage, self._message = "done", "Done"
            elif state == "cancelled":
                self._stage, self._message = "cancelled", "Stopped."
            else:
                self._stage, self._message = "error", error or "Generation failed."
            self._version += 1
            self._finished.set()
            self._cond.notify_all()

    def _status(self, stage: str, message: str) -> None:
        with self._cond:
            self._stage, self._message = stage, message
            self._version += 1
            self._cond.notify_all()
        if self._broadcaster is not None:
            self._broadcaster.publish_status(self.id, stage, message)

    def _snapshot_locked(self) -> JobSnapshot:
        result = self._result
        return JobSnapshot(
            job_id=self.id, engine=self.engine.name, state=self._state, stage=self._stage, message=self._message,
            done=self._done, total=self._total, eta_s=self._eta_s, frame=self._display,
            video_path=result.video_path if result else None,
            video_url=self.video_url if result and result.video_path else None,
            duration_s=result.duration_s if result else None, error=self._error, user_error=self._user_error,
            elapsed_s=time.monotonic() - self.started_at)


def _fit_for_display(rgb: np.ndarray) -> np.ndarray:
    height, width = rgb.shape[:2]
    scale = DISPLAY_MAX_SIDE / max(height, width)
    if scale >= 1.0:
        return rgb
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))
