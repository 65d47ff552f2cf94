"""A generation job as a live stream: one clock, frames and speech at real time, progress with ETA, mp4 at the end.

A job runs two threads on the job's ``StreamClock``:

* the **engine thread** iterates ``engine.generate()`` as fast as the engine goes (the mp4 encoder inside the engine
  gets every frame) and records what the display needs: the motion and its speech (``MotionReady``), how many final
  frames exist and how fast they come, the newest one, and — near the playhead — final frames as display-size JPEGs
  (encoded once; a bounded window, so nothing holds the clip). When the engine is done the mp4 is offered at once
  (``done``), even while the live playback goes on.
* the **display thread** ticks at 25 frames per second and asks ``display.decide`` what to show: the idle animation,
  then the clip once at real time with its speech (preview frames, or final ones where the renderer keeps up), then
  for a slow renderer the rendering progress silently and the finished video once more with its speech. Frames and
  speech go to the job's live stream stamped with their time on the job's timeline; viewers and the encoded
  outputs play them against that clock.

Cancelling (``Job.cancel()``) stops both: the engine's generator is closed, which stops its encoder and removes the
partial mp4; an unfinished job's folder is removed too. A job whose video is done keeps it.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import numpy as np
from PIL import Image

from core.engine import Done, Engine, Frame, MotionReady, Progress
from core.errors import SadTalkerError
from core.image import load_image
from core.options import FPS, Options
from core.video import Mp4Reader

from .broadcaster import Broadcaster, encode_jpeg
from .clock import StreamClock
from .display import Known, Show, State, decide, frame_time, playhead
from .progress import RenderRate
from .speech import SpeechFeed, to_pcm16
from .stream import LiveStream, StreamHub

log = logging.getLogger(__name__)

DISPLAY_MAX_SIDE = 512  # full-size final frames are shown downscaled (the mp4 keeps full size)
PROGRESS_INTERVAL_S = 0.1  # progress messages at most 10 per second
IDLE_HEAD_START_S = 0.5  # the engine waits at most this long for the idle animation to be on screen
# While the clip plays, its frames are sent up to this long before their time (the speech goes further ahead): a
# viewer holds them until their time, so a late message (a busy browser or CPU) costs no frame. Idle and rendering
# frames are made at their time and go out then.
FRAME_LEAD_S = 0.16
KEEP_AHEAD_FRAMES = 20 * FPS  # final frames kept (display-size JPEG, a few KB each) ahead of the playhead
FINAL_JPEG_QUALITY = 85
ENGINE_NICENESS = 5  # the engine thread's scheduling priority below the live stream's threads

JobState = Literal["running", "done", "error", "cancelled"]

PHASE_STATUS = {
    "idle": ("idle", "Animating the face while the motion is computed…"),
    "play": ("playing", "Playing the clip with its speech while full-quality frames render…"),
    "rendering": ("rendering", "Rendering full-quality frames…"),
    "replay": ("replay", "Playing the finished video with its speech"),
}


@dataclass(frozen=True)
class DisplayFrame:
    seq: int  # 1, 2, 3 ... per job, in the order shown
    t: float  # seconds on the job's timeline
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
    state: JobState  # the generation's outcome ("running" until the engine is done)
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
    playing: bool = False  # the live stream is still going (it may outlast the generation)


class Job:
    def __init__(self, job_id: str, engine: Engine, image_path: str, audio_path: str, options: Options,
                 out_dir: str | None, video_url: str | None, broadcaster: Broadcaster | None,
                 idle_animator_factory: Callable[[np.ndarray], object], hub: StreamHub | None = None,
                 on_finished: Callable[["Job"], None] | None = None):
        self.id = job_id
        self.engine = engine
        self.image_path, self.audio_path = image_path, audio_path
        self.options = options
        self.out_dir = out_dir
        self.video_url = video_url
        self.clock = StreamClock()
        self._idle_factory = idle_animator_factory
        self._on_finished = on_finished  # called once the job ended completely (e.g. to prune old outputs)
        self._cond = threading.Condition()
        self._version = 0  # bumped on every change a page would show
        self._cancel = threading.Event()
        self._idle_ready = threading.Event()
        self._generated = threading.Event()  # the engine's outcome is known
        self._finished = threading.Event()  # both threads ended and the clean-up is done
        self.started_at = time.monotonic()
        # --- state shared between the threads (guarded by _cond) ---
        self._state: JobState = "running"
        self._stage, self._message = "starting", "Starting…"
        self._done = self._total = 0
        self._eta_s: float | None = None
        self._motion: MotionReady | None = None
        self._latest_final: Frame | None = None
        self._kept: dict[int, bytes] = {}  # index -> display-size JPEG of final frames near the playhead
        self._playhead = 0  # the display's position in the clip (the engine keeps finals from here on)
        self._result: Done | None = None
        self._display: DisplayFrame | None = None
        self._error: str | None = None
        self._user_error = False
        self._playing = True
        self._rate = RenderRate()
        self._last_progress_sent = 0.0
        self._seq = 0
        self.stream = hub.open(job_id, self.clock) if hub is not None else LiveStream(job_id, self.clock, broadcaster)
        self._engine_thread = threading.Thread(target=self._run_engine, name=f"engine-{job_id}", daemon=True)
        self._display_thread = threading.Thread(target=self._run_display, name=f"display-{job_id}", daemon=True)

    # ------------------------------------------------------------------------------------------------ control
    def start(self) -> "Job":
        self._status("starting", f"Starting the {self.engine.name} engine…")
        self._display_thread.start()
        self._engine_thread.start()
        return self

    def cancel(self) -> None:
        """Stop the job (the generation if it still runs, and the live stream); returns at once."""
        self._cancel.set()
        with self._cond:
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the job ended completely (generation and live stream)."""
        return self._finished.wait(timeout)

    def wait_generated(self, timeout: float | None = None) -> bool:
        """Wait until the generation's outcome is known (the live stream may go on)."""
        return self._generated.wait(timeout)

    @property
    def finished(self) -> bool:
        """The generation is over (done, failed or cancelled); its live stream may still be playing."""
        return self._generated.is_set()

    def snapshot(self) -> JobSnapshot:
        with self._cond:
            return self._snapshot_locked()

    def updates(self, max_fps: float = 10.0, heartbeat_s: float = 1.0) -> Iterator[JobSnapshot]:
        """Snapshots whenever something changed (at most ``max_fps`` per second), ending with the generation's
        outcome."""
        seen = -1
        interval = 1.0 / max_fps
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._version != seen, timeout=heartbeat_s)
                seen = self._version
                snapshot = self._snapshot_locked()
            yield snapshot
            if snapshot.state != "running":
                return
            time.sleep(interval)

    # ------------------------------------------------------------------------------------------------ engine thread
    def _run_engine(self) -> None:
        # The live stream plays at real time and the engine works in its gaps: this thread (and the encoder it
        # starts) yields the CPU to the display and the viewers' server when both want it. A quick-start engine's
        # motion is what the live preview waits for: it runs at once, and yields from its motion on.
        quick = self.engine.quick_start
        if not quick:
            _lower_this_thread(ENGINE_NICENESS)
            # let the idle animation reach the screen before the engine competes for the CPU (bounded head start)
            self._idle_ready.wait(IDLE_HEAD_START_S)
        events = None
        try:
            if not self._cancel.is_set():
                events = self.engine.generate(self.image_path, self.audio_path, self.options)
                for event in events:
                    if self._cancel.is_set():
                        break
                    self._on_event(event)
                    if quick and isinstance(event, MotionReady):
                        # the rest is the final render, far faster than real time: it takes only the CPU the
                        # live stream and the viewers (a browser on the same machine) leave
                        _idle_this_thread()
                        quick = False
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
            if self._state == "running":
                if self._result is not None:
                    self._state = "done"
                elif self._cancel.is_set():
                    self._state = "cancelled"
                else:
                    self._state, self._error = "error", "The engine stopped without producing a video."
                    log.error("job %s: engine stopped without a Done event", self.id)
            state = self._state
            self._version += 1
            self._cond.notify_all()
        self._publish_outcome(state)
        self._generated.set()
        self._display_thread.join()
        self._finish(state)

    def _on_event(self, event) -> None:
        now = time.monotonic()
        if isinstance(event, Frame):
            jpeg = self._keep(event)
            with self._cond:
                self._latest_final = event
                if jpeg is not None:
                    self._kept[event.index] = jpeg
                self._rate.frame(now)
                self._done = event.index + 1
                self._total = max(self._total, self._done)
                self._eta_s = self._rate.eta_s(self._done, self._total)
                self._version += 1
            self._send_progress(now, force=self._done >= self._total)
        elif isinstance(event, Progress):
            # Stages before the motion are status lines; after it the display's phase is the news.
            with self._cond:
                before_motion = self._motion is None
                stage_changed = event.stage != self._stage
                # within a stage, only its first and last step are news (not "Rendered 35/105 frames" every 5)
                milestone = event.message and event.message != self._message and event.done in (0, event.total)
            if before_motion and (stage_changed or milestone):
                self._status(event.stage, event.message or event.stage)
        elif isinstance(event, MotionReady):
            log.info("job %s: motion ready %.0f ms after the start (%s engine, %d frames)", self.id,
                     1000 * (now - self.started_at), self.engine.name, event.num_frames)
            with self._cond:
                first = self._motion is None
                self._motion = event
                if first:
                    self._rate.started(now)
                    self._total, self._done = event.num_frames, 0
                self._version += 1
                self._cond.notify_all()  # the display thread starts playing now
            self._send_progress(now, force=True)
        elif isinstance(event, Done):
            with self._cond:
                self._result = event
                self._done = self._total = event.num_frames
                self._eta_s = 0.0
                self._version += 1
                self._cond.notify_all()
        else:
            log.warning("job %s: ignored an unknown event %r", self.id, type(event).__name__)

    def _keep(self, frame: Frame) -> bytes | None:
        """A display-size JPEG of a final frame the live stream may show soon (near the playhead), else None."""
        with self._cond:
            start = self._playhead
        if not start <= frame.index < start + KEEP_AHEAD_FRAMES:
            return None
        return encode_jpeg(_fit_for_display(frame.rgb), quality=FINAL_JPEG_QUALITY)

    def _send_progress(self, now: float, force: bool = False) -> None:
        if not force and now - self._last_progress_sent < PROGRESS_INTERVAL_S:
            return
        self._last_progress_sent = now
        with self._cond:
            done, total, eta = self._done, self._total, self._eta_s
        self.stream.progress(done, total, eta, "render")

    # ------------------------------------------------------------------------------------------------ display thread
    def _run_display(self) -> None:
        idle, motion_came = None, False
        if self.engine.quick_start:
            # Its motion comes within a fraction of a second: wait for it rather than compete with it for the CPU
            # (the idle animation's set-up decodes the photo and finds the face too); the idle animation is made
            # only if it is still needed then.
            with self._cond:
                self._cond.wait_for(lambda: self._motion is not None or self._stopped_locked(), IDLE_HEAD_START_S)
                motion_came = self._motion is not None
        if not motion_came:
            idle = self._make_idle()
        player = _Player(self, idle, make_idle_later=motion_came)
        try:
            player.run()
        except Exception:
            log.exception("job %s: the live display failed; generation continues", self.id)
        finally:
            player.close()
            self._idle_ready.set()
            with self._cond:
                self._playing = False
                self._version += 1
                self._cond.notify_all()

    def _make_idle(self):
        """The idle animation of the photo, or None (the stream then shows nothing until the clip plays)."""
        try:
            return self._idle_factory(load_image(self.image_path))
        except SadTalkerError as exc:  # not an image / no face: the engine would fail the same way, but later
            self._fail(str(exc), user_error=True)
            self._cancel.set()
        except Exception:
            log.exception("job %s: the idle animation failed; continuing without it", self.id)
        return None

    def _known_locked(self, now: float) -> Known:
        motion = self._motion
        return Known(now=now, num_frames=None if motion is None else motion.num_frames,
                     rendered=self._done if self._motion is not None else 0, render_fps=self._rate.fps(),
                     kept=self._kept.keys(), video_ready=self._result is not None and self._result.video_path is not None,
                     engine_done=self._result is not None)

    def _stopped_locked(self) -> bool:
        return self._cancel.is_set() or self._state in ("error", "cancelled")

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
        self.stream.frame(seq, t, quality, rgb=rgb, jpeg=jpeg)

    def _speak(self, t: float, pcm: np.ndarray) -> None:
        self.stream.sound(t, pcm)

    # ------------------------------------------------------------------------------------------------ outcome
    def _fail(self, message: str, user_error: bool) -> None:
        with self._cond:
            if self._state != "running":
                return  # the first failure is the one reported
            self._state, self._error, self._user_error = "error", message, user_error
            self._version += 1
            self._cond.notify_all()

    def _publish_outcome(self, state: JobState) -> None:
        """The generation is over: offer the video at once (the live stream may still be playing it)."""
        if state == "done":
            result = self._result
            self._send_progress(time.monotonic(), force=True)
            with self._cond:
                self._stage, self._message = "done", "Done"
            self.stream.done(self.video_url if result.video_path else None, result.duration_s, result.engine,
                             result.num_frames)
            self._status("done", f"Done: {result.duration_s:.1f} s video by the {result.engine} engine "
                                 f"in {time.monotonic() - self.started_at:.1f} s")
        elif state == "error":
            message = self._error or "Generation failed."
            self.stream.error(message)
            self._status("error", message)

    def _finish(self, state: JobState) -> None:
        if state != "done" and self.out_dir is not None:
            shutil.rmtree(self.out_dir, ignore_errors=True)  # no half-written results stay behind
        if self._cancel.is_set():
            self._status("cancelled", "Stopped." if state != "done" else "Stopped — the video is kept.")
        elif state == "done":
            self._status("finished", "Done — the video is ready.")
        self.stream.end()
        if self._on_finished is not None:  # before wait() returns: the clean-up is part of the job
            try:
                self._on_finished(self)
            except Exception:
                log.exception("job %s: the clean-up after the job failed", self.id)
        with self._cond:
            self._kept.clear()
            self._latest_final = None
            self._motion = None
            shown = self._display
            if shown is not None and shown.pixels is not None:  # remembered jobs keep their last picture small
                self._display = DisplayFrame(shown.seq, shown.t, shown.quality, None,
                                             shown.jpeg or encode_jpeg(shown.pixels, quality=FINAL_JPEG_QUALITY))
            self._version += 1
            self._finished.set()
            self._cond.notify_all()

    def _status(self, stage: str, message: str) -> None:
        with self._cond:
            self._stage, self._message = stage, message
            self._version += 1
            self._cond.notify_all()
        self.stream.status(stage, message)

    def _snapshot_locked(self) -> JobSnapshot:
        result = self._result if self._state == "done" else None
        return JobSnapshot(
            job_id=self.id, engine=self.engine.name, state=self._state, stage=self._stage, message=self._message,
            done=self._done, total=self._total, eta_s=self._eta_s, frame=self._display,
            video_path=result.video_path if result else None,
            video_url=self.video_url if result and result.video_path else None,
            duration_s=result.duration_s if result else None, error=self._error, user_error=self._user_error,
            elapsed_s=time.monotonic() - self.started_at, playing=self._playing)


class _Player:
    """The display thread's loop: one tick per frame time, what ``decide`` says, speech a little ahead."""

    def __init__(self, job: Job, idle, make_idle_later: bool = False):
        self.job, self.idle = job, idle
        self.make_idle_later = make_idle_later
        self.state = State()
        self.feed: SpeechFeed | None = None
        self.pcm: np.ndarray | None = None
        self.reader: Mp4Reader | None = None
        self.sent_through = -1  # the last clip frame of the current playback sent (frames go out ahead)
        self.provisional: set[int] = set()  # clip frames sent ahead as preview while the final ones were not there

    def run(self) -> None:
        job, clock = self.job, self.job.clock
        next_tick = clock.now()
        while True:
            with job._cond:
                # wake at the next tick, or at once when the motion arrives (the clip starts that moment)
                job._cond.wait_for(lambda: job._stopped_locked() or (self.state.phase == "idle" and job._motion),
                                   timeout=max(0.0, clock.monotonic(next_tick) - time.monotonic()))
                if job._stopped_locked():
                    return
                now = clock.now()
                known = job._known_locked(now)
                motion, latest = job._motion, job._latest_final
            show, state = decide(known, self.state)
            if state.phase != self.state.phase or state.play_start != self.state.play_start:
                self._enter(state, motion)
            self.state = state
            if self.feed is not None:  # the speech first: it reaches a viewer before the frames it belongs to
                for t, pcm in self.feed.due(now):
                    job._speak(t, pcm)
            if show is not None and show.index is not None and state.phase in ("play", "replay"):
                self._play_ahead(show, known, motion, latest)
            elif show is not None:
                self._show(show, motion, latest)
            if state.phase == "ended":
                return
            next_tick = self._next_tick(next_tick, clock.now())

    def _play_ahead(self, show: Show, known: Known, motion: MotionReady | None, latest: Frame | None) -> None:
        """The clip's frames from the playhead up to FRAME_LEAD_S ahead that are not sent yet, each decided as at
        its own time with what is known now. A preview frame sent ahead is sent again, final, when its time comes if
        the final one is there by then (a viewer plays ~0.1 s behind: it gets the final one in time)."""
        current = show.index
        if current in self.provisional and show.source != "preview":
            self._show(show, motion, latest)
        self.provisional = {index for index in self.provisional if index > current}
        last = min(known.num_frames - 1, playhead(self.state, known.now + FRAME_LEAD_S))
        for index in range(max(current, self.sent_through + 1), last + 1):
            if index != current:
                show, self.state = decide(dataclasses.replace(known, now=frame_time(self.state, index)), self.state)
                if show.source == "preview":
                    self.provisional.add(index)
            self._show(show, motion, latest)
            self.sent_through = index

    def _next_tick(self, previous: float, now: float) -> float:
        if self.state.phase in ("play", "replay"):
            return frame_time(self.state, playhead(self.state, now) + 1)
        following = previous + 1.0 / FPS
        return following if following > now else now + 1.0 / FPS  # fell behind: skip, do not burst

    def _enter(self, state: State, motion: MotionReady | None) -> None:
        job = self.job
        if state.phase in PHASE_STATUS:
            job._status(*PHASE_STATUS[state.phase])
        if state.phase == "idle":
            job._idle_ready.set() if self.idle is None else None
        if state.phase in ("play", "replay") and motion is not None:
            if self.pcm is None:
                self.pcm = to_pcm16(motion.audio)
            self.feed = SpeechFeed(self.pcm, state.play_start)
            self.sent_through, self.provisional = -1, set()
            self._close_reader()
            if state.phase == "replay":
                self._open_reader(0)  # ffmpeg starts decoding now, so frame 0 is at hand when its time comes
        else:
            self.feed = None
        job._idle_ready.set()

    def _show(self, show: Show, motion: MotionReady | None, latest: Frame | None) -> None:
        job = self.job
        if show.source == "idle":
            if self.make_idle_later:  # skipped while a quick engine's motion came: needed after all
                self.make_idle_later = False
                self.idle = job._make_idle()
            if self.idle is not None:
                job._show("idle", show.t, self.idle.render(show.t))
                job._idle_ready.set()
            return
        with job._cond:
            job._playhead = show.index
            for index in [i for i in job._kept if i < show.index]:
                del job._kept[index]  # played: the window moves on
            jpeg = job._kept.get(show.index)
        if show.source == "preview":
            job._show("preview", show.t, motion.preview.render(show.index))
        elif show.source == "kept" and jpeg is not None:
            job._show("final", show.t, jpeg=jpeg)
        elif show.source == "file":
            rgb = self._file_frame(show.index)
            if rgb is not None:
                job._show("final", show.t, rgb)
        elif show.source == "latest" and latest is not None:
            job._show("final", show.t, latest.rgb)

    def _file_frame(self, index: int) -> np.ndarray | None:
        """Frame ``index`` of the finished video, read on in order (reopened at ``index`` after a jump)."""
        if self.reader is None or not self.reader.next_index <= index < self.reader.next_index + FPS:
            self._open_reader(index)
        if self.reader is None:
            return None
        rgb = None
        while self.reader.next_index <= index:
            rgb = self.reader.read()
            if rgb is None:
                return None
        return rgb

    def _open_reader(self, index: int) -> None:
        self._close_reader()
        path = self.job._result.video_path if self.job._result is not None else None
        if path is not None:
            self.reader = Mp4Reader(path, start=index, max_side=DISPLAY_MAX_SIDE)

    def _close_reader(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None

    def close(self) -> None:
        self._close_reader()


def _lower_this_thread(niceness: int) -> None:
    """Lower the calling thread's CPU priority (Linux schedules threads by their own nice value)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + niceness)
    except (AttributeError, OSError):  # not Linux, or not allowed: the stream still plays, with less margin
        pass


def _idle_this_thread() -> None:
    """Run the calling thread (and the processes it starts) in Linux's idle class: only when no other thread wants
    the CPU. Elsewhere: a lower priority."""
    try:
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        _lower_this_thread(ENGINE_NICENESS)


def _fit_for_display(rgb: np.ndarray) -> np.ndarray:
    height, width = rgb.shape[:2]
    scale = DISPLAY_MAX_SIDE / max(height, width)
    if scale >= 1.0:
        return rgb
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))
