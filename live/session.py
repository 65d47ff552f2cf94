"""Live avatar sessions: one portrait, always on, speaking whatever speech it is fed, in order, as it arrives.

A session is a live stream on its own clock. A thread ticks at 25 frames per second for as long as the session
lives. At each tick it

1. schedules speech ahead: frames of the waiting speech (40 ms each) are given the next free ticks, up to
   ``AHEAD_S`` ahead of now, and their sound goes out at once as ``audio`` messages on the stream's timeline (sent
   a little ahead of the frames that show it);
2. asks the motion for this tick's pose — with the cues of the speech frame given to this tick and of the frames
   after it (a bounded look-ahead), or none: idle, a pause between utterances, or an underrun (speech that did not
   arrive in time: the mouth closes and the face carries on, and resumes without a jump when speech comes);
3. renders the frame ahead of its time — by the face's ``render_ahead_ticks`` (min, max): from the least, up to
   the most while frames take long to make (several sessions share the CPU; the render-ahead follows the recent
   frames' time to make, and rises for a while after a frame was stalled past its time) — and hands it at once,
   stamped with its time, with the tick's 640 samples of sound (silence when none), to the session's live stream
   and its recording. As with the sound, the outputs play it at its time: the
   viewer draws a frame when its speech reaches the frame's ``t``, the encoded outputs (WebRTC, HLS, RTMP) read the
   stream's timeline a fixed delay behind the clock. So a frame that took long to make is still on time.

A second thread follows the clock: at each tick's time the state (idle/speaking) changes as the frame shown then
does, and the when-spoken callbacks of utterances whose last frame is shown then are called.

Speech comes in as chunks (any audio file ffmpeg decodes, raw PCM, text through the offline TTS, the viewer's
microphone over the WebSocket); a chunk marked final ends an utterance. Nothing grows with the session's age but the
recording on disk.
"""
from __future__ import annotations

import json
import logging
import math
import os
import queue
import secrets
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass, fields
from typing import Literal

import cv2
import numpy as np

from core.errors import InputError
from core.image import load_image
from core.options import FPS, SAMPLE_RATE
from preview.streaming import CUE_WINDOW, LOOKAHEAD_FRAMES, Cue, StreamingMotion, cue_of

from .avsink import (RECORDING_QUEUED_TICKS, RECORDING_VIDEO, SAMPLES_PER_TICK, AvSink,
                     recording_args, snapshot_mp4)
from .broadcaster import Broadcaster
from .clock import StreamClock
from .speech import to_pcm16
from .stream import LiveStream, StreamHub

log = logging.getLogger(__name__)

TICK_S = 1.0 / FPS
AHEAD_S = 0.4  # speech is scheduled (and its sound sent) at most this far ahead of the clock
# Speech that arrives while nothing plays starts this many ticks after the tick being made: the cushion that lets
# the next chunk of a feed at real time come 80-120 ms late without an underrun (a chunk's last frame needs 12 ms of
# the next chunk's sound, and is made the render-ahead before its time). The latency from a chunk to its first frame
# is then (cushion + render-ahead) ticks, up to one tick more: 160-200 ms on a quiet CPU. Every underrun widens the
# cushion of that session by a tick, up to MAX_LEAD_TICKS (a jitter buffer that adapts to the feed). A face that
# shows a frame only once some speech after it has come (its ``lookahead_frames``) starts that many ticks later.
START_LEAD_TICKS = 3
MAX_LEAD_TICKS = 10
LEAD_RELAX_S = 30.0  # a cushion widened by underruns narrows again by a tick after this long without one
PIECE_TICKS = 5  # speech frames per audio message (200 ms)
LATE_S = 0.040  # a frame sent later than this after its time counts as late
RENDER_MARGIN_S = 0.010  # the render-ahead covers the recent frames' time to make plus this
RECENT_MAKES = FPS  # frames the render-ahead looks back on (a second: a slow start-up is soon forgotten)
STALL_S = 0.010  # a frame begun before its time that comes this much after it was stalled (see Session._pace)
AHEAD_RELAX_S = 10.0  # the render-ahead raised by a late frame comes down by a tick after this long without one
MAX_QUEUED_SPEECH_S = 600.0  # speech waiting to be spoken, at most (a longer backlog is refused)

SessionState = Literal["idle", "speaking", "closed"]


@dataclass(frozen=True)
class SessionOptions:
    """What a client sets when it creates a session (the ``options`` JSON of ``POST /api/sessions``)."""

    engine: Literal["lite", "sadtalker"] = "lite"  # lite: weight-free warping; sadtalker: SadTalker's own motion
    size: int = 512  # output frames are size x size (crop) or fit in size x size (full)
    preprocess: Literal["crop", "full"] = "crop"  # the face crop, or the whole portrait
    seed: int | None = None  # head motion and blinks
    use_blink: bool = True
    record: bool = True  # keep recording.mp4 of everything the session shows and says

    @classmethod
    def from_json(cls, text: str | dict | None) -> "SessionOptions":
        if text in (None, ""):
            return cls()
        try:
            values = json.loads(text) if isinstance(text, str) else dict(text)
        except (ValueError, TypeError):
            raise InputError("options must be a JSON object, e.g. {\"size\": 512, \"seed\": 1}.") from None
        if not isinstance(values, dict):
            raise InputError("options must be a JSON object, e.g. {\"size\": 512, \"seed\": 1}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown session option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
        try:
            options = cls(**values)
        except TypeError as exc:
            raise InputError(f"bad session options: {exc}") from None
        return options.check()

    def check(self) -> "SessionOptions":
        if self.engine not in ("lite", "sadtalker"):
            raise InputError(f"engine must be 'lite' or 'sadtalker' for live sessions (got {self.engine!r}).")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not 128 <= self.size <= 1024:
            raise InputError(f"size must be a whole number of pixels from 128 to 1024 (got {self.size!r}).")
        if self.preprocess not in ("crop", "full"):
            raise InputError(f"preprocess must be 'crop' or 'full' for live sessions (got {self.preprocess!r}).")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InputError(f"seed must be a whole number or null (got {self.seed!r}).")
        return self


@dataclass
class SessionStats:
    frames_sent: int = 0
    late_frames: int = 0  # ticks rendered more than LATE_S after their time
    skipped_ticks: int = 0  # ticks the thread could not render at all (it fell a whole frame behind)
    speech_frames: int = 0  # 40 ms frames of speech spoken
    underruns: int = 0  # times speech ran out mid-utterance
    utterances: int = 0
    render_s: float = 0.0  # time the face took to make the frames sent (its step: motion at the tick + render)


@dataclass(frozen=True)
class SpeechFrame:
    """One 40 ms frame of speech given to a tick, with what the face may look at around it."""

    pcm: np.ndarray  # (640,) int16: the sound of this tick
    context: np.ndarray  # float32 samples from CONTEXT_BEFORE before the frame's start to as far ahead as arrived
    ahead: int  # samples of ``context`` after the frame's end (the look-ahead at hand)
    utterance: int  # a number per utterance (1, 2, ...)
    index: int  # the frame's index within its utterance
    last: bool  # the utterance's last frame
    context_start: int = 0  # the utterance's sample where ``context`` starts (negative: zeros before it)
    complete: bool = False  # ``context`` reaches the end of the utterance (no more of it will come)


CONTEXT_BEFORE = (CUE_WINDOW - SAMPLES_PER_TICK) // 2  # 192 samples: a cue's window reaches this far back


class _Utterance:
    """Speech of one utterance as it arrives (16 kHz float32), spoken frame by frame."""

    def __init__(self, number: int, lookahead_frames: int):
        self.number = number
        self.lookahead = lookahead_frames  # the face needs this many frames after one before it can show it
        self.samples = np.zeros(0, np.float32)
        self.final = False
        self.next_frame = 0  # the next 40 ms frame to speak
        self.dropped = 0  # frames of samples dropped from the front (long utterances keep memory flat)
        self.when_spoken: list = []  # called once its last frame is on screen (e.g. to acknowledge a message)

    def add(self, samples: np.ndarray) -> None:
        self.samples = np.concatenate([self.samples, samples]) if self.samples.size else samples.copy()

    @property
    def frames_total(self) -> int:
        return math.ceil(self.samples.size / SAMPLES_PER_TICK)

    def frames_ready(self) -> int:
        """Frames that can be spoken now: what the face needs around them has arrived (or the utterance is
        complete). Look-ahead beyond that, when it has arrived, is handed over too."""
        if self.final:
            return self.frames_total - self.next_frame
        needed = CONTEXT_BEFORE + self.lookahead * SAMPLES_PER_TICK
        usable = (self.samples.size - needed) // SAMPLES_PER_TICK
        return max(0, usable - self.next_frame)

    def take(self, max_ahead: int) -> SpeechFrame:
        """The next frame, with up to ``max_ahead`` samples of look-ahead."""
        index = self.next_frame
        self.next_frame += 1
        start = index * SAMPLES_PER_TICK
        pcm = np.pad(self.samples[start:start + SAMPLES_PER_TICK], (0, max(0, start + SAMPLES_PER_TICK
                                                                            - self.samples.size)))
        lo = start - CONTEXT_BEFORE
        hi = min(self.samples.size, start + SAMPLES_PER_TICK + max_ahead)
        context = np.zeros(hi - lo, np.float32) if hi > lo else np.zeros(0, np.float32)
        if hi > max(lo, 0):
            context[max(0, -lo):] = self.samples[max(lo, 0):hi]
        frame = SpeechFrame(pcm=to_pcm16(pcm), context=context,
                            ahead=max(0, hi - (start + SAMPLES_PER_TICK)), utterance=self.number,
                            index=index + self.dropped, last=self.final and self.next_frame >= self.frames_total,
                            context_start=lo + self.dropped * SAMPLES_PER_TICK,
                            complete=self.final and hi >= self.samples.size)
        if index >= 32 * FPS:  # keep memory flat on long utterances: drop what no frame needs any more
            keep_from = (index - 2) * SAMPLES_PER_TICK
            self.samples = self.samples[keep_from:]
            self.next_frame -= index - 2
            self.dropped += index - 2
        return frame


class SpeechQueue:
    """Utterances waiting to be spoken, in order; thread-safe (chunks come from HTTP, WebSocket and queue threads)."""

    def __init__(self, lookahead_frames: int = 0, max_ahead_frames: int = LOOKAHEAD_FRAMES):
        self._lock = threading.Lock()
        self._utterances: deque[_Utterance] = deque()
        self._lookahead = lookahead_frames
        self._max_ahead = max_ahead_frames * SAMPLES_PER_TICK + CONTEXT_BEFORE
        self._numbers = 0

    def push(self, samples: np.ndarray, final: bool, when_spoken=None) -> None:
        with self._lock:
            if self.seconds_queued_locked() + samples.size / SAMPLE_RATE > MAX_QUEUED_SPEECH_S:
                raise InputError(f"More than {MAX_QUEUED_SPEECH_S:g} s of speech are waiting; "
                                 "wait until the session has spoken some of it.")
            if not self._utterances or self._utterances[-1].final:
                self._numbers += 1
                self._utterances.append(_Utterance(self._numbers, self._lookahead))
            current = self._utterances[-1]
            if samples.size:
                current.add(np.asarray(samples, dtype=np.float32))
            current.final = current.final or final
            if when_spoken is not None:
                current.when_spoken.append(when_spoken)

    def take(self) -> tuple[SpeechFrame | None, list]:
        """The next speech frame if one is ready (else None), and the callbacks of utterances that are spoken once
        it is shown."""
        finished: list = []
        with self._lock:
            while self._utterances:
                head = self._utterances[0]
                if head.final and head.next_frame >= head.frames_total:
                    self._utterances.popleft()  # spoken (an utterance with no sound at all ends here)
                    finished += head.when_spoken
                    continue
                if head.frames_ready() <= 0:
                    break
                frame = head.take(self._max_ahead)
                if frame.last:
                    self._utterances.popleft()
                    finished += head.when_spoken
                return frame, finished
            return None, finished

    def pending(self) -> bool:
        """Speech has arrived that is not spoken yet (an utterance is open or frames are waiting)."""
        with self._lock:
            return any(not u.final or u.next_frame < u.frames_total for u in self._utterances)

    def seconds_queued(self) -> float:
        with self._lock:
            return self.seconds_queued_locked()

    def seconds_queued_locked(self) -> float:
        return sum(max(0, u.samples.size - u.next_frame * SAMPLES_PER_TICK) for u in self._utterances) / SAMPLE_RATE


class LiteFace:
    """The Lite engine's always-on face: streaming motion rendered by landmark-driven warping.

    A session's face (this, or ``sadtalker.streaming.SadTalkerFace``) has ``frame(t, speech)`` once per tick and
    ``skip(t, speech)`` for a tick that is not rendered, ``scheduled(speech)`` when a speech frame gets its tick,
    ``lookahead_frames`` (speech frames that must have arrived after one before it is spoken), ``context_frames``
    (how far ahead a frame's context reaches at most), ``render_ahead_ticks`` (how early its frames are made: the
    least and the most ticks), ``renderer_name`` / ``renderer_note`` and ``close()``.
    """

    lookahead_frames = 0  # a frame can be shown as soon as its cue's window has arrived; look-ahead is a bonus
    context_frames = LOOKAHEAD_FRAMES
    # With several sessions on a small CPU a frame's time to make varies from ~10 to ~80 ms (bench/session.py)
    render_ahead_ticks = (1, 4)
    renderer_name = "lite"
    renderer_note = "landmark-driven warping"

    def __init__(self, rgb: np.ndarray, points: np.ndarray, options: SessionOptions):
        from preview.warp import CropRenderer, FaceWarper

        self.motion = StreamingMotion(seed=options.seed, use_blink=options.use_blink)
        if options.preprocess == "crop":
            self.renderer = CropRenderer(rgb, points, options.size)
        else:
            height, width = rgb.shape[:2]
            scale = options.size / max(height, width)
            size = (max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2))
            small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
            self.renderer = FaceWarper(small, np.asarray(points) * (size[0] / width))
        self.renderer.prepare()
        # A frame's cue is looked at by up to LOOKAHEAD_FRAMES + 1 ticks: computed once per (utterance, frame,
        # samples at hand), since a look-ahead frame's window can still grow while its speech arrives.
        self._cue_cache: dict[tuple[int, int, int], Cue] = {}

    def frame(self, t: float, speech: SpeechFrame | None) -> np.ndarray:
        return self.renderer.render(self.motion.step(t, self._cues(speech)))

    def skip(self, t: float, speech: SpeechFrame | None) -> None:
        """A tick that is not rendered (the CPU fell behind): the motion still moves on, so nothing jumps."""
        self.motion.step(t, self._cues(speech))

    def _cues(self, speech: SpeechFrame | None) -> list[Cue]:
        """The cue of the frame and of the look-ahead frames whose windows are in its context."""
        if speech is None:
            return []
        cues = []
        for k in range(LOOKAHEAD_FRAMES + 1):
            start = k * SAMPLES_PER_TICK
            window = speech.context[start:start + CUE_WINDOW]
            if k > 0 and window.size < CUE_WINDOW - CONTEXT_BEFORE:
                break  # this look-ahead frame has not arrived (or the utterance ends before it)
            if k > 0 and speech.ahead < k * SAMPLES_PER_TICK:
                break
            key = (speech.utterance, speech.index + k, window.size)
            cue = self._cue_cache.get(key)
            if cue is None:
                cue = self._cue_cache[key] = cue_of(np.pad(window, (0, CUE_WINDOW - window.size)))
            cues.append(cue)
        for key in [key for key in self._cue_cache if key[:2] < (speech.utterance, speech.index)]:
            del self._cue_cache[key]  # frames already spoken
        return cues

    def scheduled(self, speech: SpeechFrame) -> None:
        """Nothing to prepare: a Lite frame's motion costs a fraction of a millisecond at its tick."""

    def close(self) -> None:
        pass


class Session:
    """One always-on talking face. ``start()`` it; feed it with ``speak``; ``close()`` ends it."""

    def __init__(self, session_id: str, face, options: SessionOptions, broadcaster: Broadcaster | None,
                 folder: str | None, hub: StreamHub | None = None):
        self.id = session_id
        self.options = options
        self.clock = StreamClock()
        self.created = time.monotonic()
        self.last_activity = self.created  # speech fed or a viewer seen
        self.stats = SessionStats()
        self.folder = folder
        self._face = face  # LiteFace or SadTalkerFace
        self.speech = SpeechQueue(face.lookahead_frames, face.context_frames)
        self.rtmp = None  # the RTMP push of this session, if it has one
        first = self._face.frame(0.0, None)
        self.height, self.width = first.shape[:2]
        self._last_rgb = first  # what the outputs repeat for ticks that could not be rendered in time
        size = (self.width, self.height)
        self.stream = (hub.open(session_id, self.clock, size, kind="session") if hub is not None
                       else LiveStream(session_id, self.clock, broadcaster, size, kind="session"))
        self._broadcaster = broadcaster
        self._recorder: AvSink | None = None
        if folder is not None and options.record:
            os.makedirs(folder, exist_ok=True)
            self.recording_path = os.path.join(folder, "recording.mp4")
            self._recorder = AvSink(self.width, self.height, recording_args(self.recording_path),
                                    name=f"recording-{session_id}", video_args=RECORDING_VIDEO,
                                    max_queued_ticks=RECORDING_QUEUED_TICKS, background=True)
        else:
            self.recording_path = None
        self._stop = threading.Event()
        self._scheduled: dict[int, SpeechFrame] = {}  # tick -> the speech frame it shows
        self._when_shown: dict[int, list] = {}  # tick -> callbacks of utterances whose last frame it shows
        self._when_shown_lock = threading.Lock()
        self._next_speech_tick = -1  # the tick after the last speech frame scheduled (none yet)
        # the cushion's least and most, in ticks: a face's look-ahead on top (SadTalker's mel windows: 3 frames)
        self._lead_range = (START_LEAD_TICKS + face.lookahead_frames, MAX_LEAD_TICKS + face.lookahead_frames)
        self._lead_ticks = self._lead_range[0]
        self._lead_changed = time.monotonic()  # when the cushion last widened or narrowed
        self._made_speaking = False  # the last frame made shows speech (the maker's view)
        self._speaking = False  # the frame of the tick now shows speech (what viewers see now)
        self._make_times: deque[float] = deque(maxlen=RECENT_MAKES)
        self._render_ahead_ticks = face.render_ahead_ticks[0]
        self._ahead_floor = face.render_ahead_ticks[0]  # raised for a while after a frame came late (see _pace)
        self._ahead_floor_changed = time.monotonic()
        self._due: queue.SimpleQueue = queue.SimpleQueue()  # (tick, speaking or None) for the state thread
        self._seq = 0
        self._thread = threading.Thread(target=self._run, name=f"session-{session_id}", daemon=True)
        self._state_thread = threading.Thread(target=self._follow_clock, name=f"session-state-{session_id}",
                                              daemon=True)

    # ------------------------------------------------------------------------------------------------ control
    def start(self) -> "Session":
        self._status("listening", "Live: waiting for speech")
        self._state_thread.start()
        self._thread.start()
        return self

    def speak(self, samples: np.ndarray, final: bool = False, when_spoken=None) -> None:
        """Queue speech (16 kHz mono float32); ``final`` ends the utterance. Returns at once; ``when_spoken()`` is
        called (on the session's state thread) once the utterance's last frame has been shown."""
        if self._stop.is_set():
            raise InputError("This session has ended.")
        self.speech.push(samples, final, when_spoken)
        self.last_activity = time.monotonic()

    def close(self) -> None:
        """End the session: the stream stops, the recording is finished."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._due.put(None)
        for thread in (self._thread, self._state_thread):
            if thread.is_alive():
                thread.join(10)
        self._face.close()
        if self._recorder is not None:
            self._recorder.close()
        self._status("ended", "The session has ended.")
        self.stream.end()

    @property
    def state(self) -> SessionState:
        if self._stop.is_set():
            return "closed"
        return "speaking" if self._speaking else "idle"

    @property
    def alive(self) -> bool:
        return not self._stop.is_set()

    def recording_snapshot(self, out: str) -> str:
        """A complete mp4 of everything shown and said so far."""
        if self._recorder is None or self.recording_path is None:
            raise InputError("This session keeps no recording (it was created with \"record\": false).")
        return snapshot_mp4(self.recording_path, out)

    def describe(self) -> dict:
        return {"session": self.id, "state": self.state, "speech_queued_s": round(self.speech.seconds_queued(), 3),
                "frames_sent": self.stats.frames_sent, "late_frames": self.stats.late_frames,
                "skipped_ticks": self.stats.skipped_ticks, "speech_s": round(self.stats.speech_frames / FPS, 2),
                "utterances": self.stats.utterances, "underruns": self.stats.underruns,
                "uptime_s": round(time.monotonic() - self.created, 1), "width": self.width, "height": self.height,
                "renderer": self._face.renderer_name, "renderer_note": self._face.renderer_note,
                "step_ms": round(1000 * self.stats.render_s / max(1, self.stats.frames_sent), 2),
                "rtmp": None if self.rtmp is None else {"url": self.rtmp.url, "connected": self.rtmp.connected,
                                                         "connects": self.rtmp.connects},
                "options": {f.name: getattr(self.options, f.name) for f in fields(self.options)}}

    # ------------------------------------------------------------------------------------------------ the ticks
    def _run(self) -> None:
        """The maker: each tick's frame, made and sent ahead of its time, in tick order."""
        tick = 0
        try:
            while self._sleep_until(self.clock.monotonic((tick - self._render_ahead_ticks) * TICK_S)):
                behind = int((time.monotonic() - self.clock.monotonic(tick * TICK_S)) / TICK_S)
                if behind >= 1:  # a whole frame behind (a busy CPU): skip ticks rather than burst to catch up
                    self._skip(tick, behind)
                    tick += behind
                started = time.monotonic()
                self._make(tick)
                self._pace(tick, started, time.monotonic())
                tick += 1
        except Exception:
            log.exception("session %s: the live stream failed", self.id)
            self._status("error", "The live stream failed; see the server log.")
        finally:
            self._due.put(None)

    def _pace(self, tick: int, started: float, ended: float) -> None:
        """How far ahead the next frames are made: the recent frames' time to make (the slowest but one: a lone
        hiccup of a quiet CPU does not add a tick of latency) plus a margin, in whole ticks — and a tick more, for
        a while, each time a frame begun before its time came more than STALL_S after it: a CPU shared by several
        sessions stalls a thread in bursts, which the recent times foretell too late. (A frame begun after its
        time, one after a stall, and the session's first second, its start-up, say nothing new.)"""
        make_s = ended - started
        self._make_times.append(make_s)
        slow = sorted(self._make_times)[-2] if len(self._make_times) > 1 else make_s
        needed = math.ceil((slow + RENDER_MARGIN_S) / TICK_S)
        least, most = self._face.render_ahead_ticks
        due = self.clock.monotonic(tick * TICK_S)
        if tick >= FPS and started < due and ended > due + STALL_S:
            self._ahead_floor = min(most, self._ahead_floor + 1)
            self._ahead_floor_changed = ended
        elif self._ahead_floor > least and ended - self._ahead_floor_changed > AHEAD_RELAX_S:
            self._ahead_floor -= 1
            self._ahead_floor_changed = ended
        self._render_ahead_ticks = min(most, max(self._ahead_floor, needed))

    def _follow_clock(self) -> None:
        """At each tick's time: the state follows what is shown, finished utterances are told."""
        try:
            while (item := self._due.get()) is not None:
                tick, speaking = item
                if not self._sleep_until(self.clock.monotonic(tick * TICK_S)):
                    return
                if speaking is not None and speaking != self._speaking:
                    self._speaking = speaking
                    self._status("speaking" if speaking else "listening",
                                 "Speaking" if speaking else "Live: waiting for speech")
                self._spoken_through(tick)
        except Exception:
            log.exception("session %s: the live stream's state failed", self.id)

    def _sleep_until(self, when: float) -> bool:
        """Wait until ``when`` (monotonic seconds); False if the session was closed meanwhile."""
        delay = when - time.monotonic()
        if delay > 0:
            self._stop.wait(delay)
        return not self._stop.is_set()

    def _make(self, tick: int) -> None:
        """The frame of ``tick``, with its sound, to the stream and the recording (ahead of its time)."""
        t = tick * TICK_S
        self._schedule_speech(tick)
        speech = self._scheduled.pop(tick, None)
        speaking = speech is not None
        now = time.monotonic()
        if not speaking and self._made_speaking and self.speech.pending():
            self.stats.underruns += 1
            self._lead_ticks = min(self._lead_range[1], self._lead_ticks + 1)
            self._lead_changed = now
        elif self._lead_ticks > self._lead_range[0] and now - self._lead_changed > LEAD_RELAX_S:
            self._lead_ticks -= 1  # the feed has kept up for a while: give back a tick of latency
            self._lead_changed = now
        self._made_speaking = speaking
        started = time.perf_counter()
        rgb = self._face.frame(t, speech)
        self.stats.render_s += time.perf_counter() - started
        if speaking:
            self.stats.speech_frames += 1
        self._send(tick, t, rgb, None if speech is None else speech.pcm, "final" if speaking else "idle")
        self._due.put((tick, speaking))

    def _schedule_speech(self, tick: int) -> None:
        """Give the next free ticks (up to AHEAD_S ahead) to the speech that is ready; send its sound now."""
        horizon = tick + int(round(AHEAD_S / TICK_S))
        # Speech goes on where the scheduled speech ends; if that is past (idle, a pause, an underrun), it starts
        # the cushion after the tick being made: the next chunk must arrive before that tick's frame is made, and
        # a frame is made up to a few ticks ahead when the CPU is busy (so latency grows with load). The cushion is
        # counted afresh at every tick while nothing is scheduled, so it is the same whenever speech arrives.
        next_tick = self._next_speech_tick if self._next_speech_tick >= tick else tick + self._lead_ticks
        piece: list[np.ndarray] = []
        piece_start = next_tick
        while next_tick <= horizon:
            speech, spoken = self.speech.take()
            if spoken:  # acknowledged when the utterance's last frame (given to a tick already) is shown
                last = self._next_speech_tick - 1 if speech is None else next_tick
                with self._when_shown_lock:
                    self._when_shown.setdefault(max(tick, last), []).extend(spoken)
            if speech is None:
                break
            if speech.index == 0:
                self.stats.utterances += 1
            self._scheduled[next_tick] = speech
            self._face.scheduled(speech)
            piece.append(speech.pcm)
            next_tick += 1
            self._next_speech_tick = next_tick
            if len(piece) == PIECE_TICKS:
                self._send_sound(piece_start, piece)
                piece, piece_start = [], next_tick
        if piece:
            self._send_sound(piece_start, piece)

    def _spoken_through(self, tick: int) -> None:
        with self._when_shown_lock:
            callbacks = [callback for due in [k for k in self._when_shown if k <= tick]
                         for callback in self._when_shown.pop(due)]
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("session %s: a when-spoken callback failed", self.id)

    def _send_sound(self, first_tick: int, pieces: list[np.ndarray]) -> None:
        self.stream.sound(first_tick * TICK_S, np.concatenate(pieces))

    def _send(self, tick: int, t: float, rgb: np.ndarray, pcm: np.ndarray | None, quality: str) -> None:
        self._seq += 1
        self._last_rgb = rgb
        self.stream.frame(self._seq, t, quality, rgb=rgb)
        if self._recorder is not None:
            self._recorder.write(rgb, pcm)
        self.stats.frames_sent += 1
        if self.clock.now() - t > LATE_S:
            self.stats.late_frames += 1
        if tick % FPS == 0 and self._broadcaster is not None and self._broadcaster.viewers_of(self.id):
            self.last_activity = time.monotonic()  # watched: not idle

    def _skip(self, tick: int, count: int) -> None:
        """Ticks that cannot be rendered in time: the motion steps through them (no jump afterwards), viewers skip
        them, and the recording gets the last frame again with the ticks' sound (it keeps its timeline)."""
        self.stats.skipped_ticks += count
        for skipped in range(tick, tick + count):
            speech = self._scheduled.pop(skipped, None)
            self._face.skip(skipped * TICK_S, speech)
            if speech is not None:
                self.stats.speech_frames += 1
            if self._recorder is not None:
                self._recorder.write(self._last_rgb, None if speech is None else speech.pcm)
            self._due.put((skipped, None))

    def _status(self, stage: str, message: str) -> None:
        self.stream.status(stage, message)


def single_threaded_opencv() -> None:
    """OpenCV without its own thread pool, for the whole process (the app calls this at start-up).

    The app's parallelism is its own threads: sessions, engines, encoders, the broadcaster. OpenCV splitting each
    warp over the cores on top of that only adds hand-offs: with four 512x512 sessions on two cores, its pool cost
    ~10 % of the CPU and made frames late (``python -m bench.session``). One warp alone takes ~30 % longer.
    """
    cv2.setNumThreads(1)


class SessionManager:
    """Creates sessions, finds them by id, ends them (on request, when idle too long, at shutdown)."""

    def __init__(self, broadcaster: Broadcaster | None, folder: str, detector_factory, max_sessions: int = 8,
                 idle_minutes: float = 30.0, reap_every_s: float = 5.0, hub: StreamHub | None = None,
                 checkpoint_dir: str | None = None, device: str = "cpu"):
        """``checkpoint_dir``/``device``: where SadTalker sessions get the process's SadTalker pipeline
        (``live.engines.load_engine``: the networks load once, shared with the page's jobs)."""
        self.broadcaster = broadcaster
        self.checkpoint_dir = checkpoint_dir
        self.device = device
        self.hub = hub
        self.folder = os.path.abspath(folder)
        self.max_sessions = max_sessions
        self.idle_s = idle_minutes * 60.0
        self.reap_every_s = reap_every_s
        self._detector = detector_factory
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="session-reaper", daemon=True)
        self._reaper.start()

    def create(self, image: "str | np.ndarray", options: SessionOptions | None = None,
               rtmp_url: str | None = None) -> Session:
        """Check the portrait (a clear InputError if unusable) and start an always-on session for it; with
        ``rtmp_url`` its stream is also pushed there (one continuous FLV stream, reconnecting)."""
        options = (options or SessionOptions()).check()
        if rtmp_url is not None:
            check_rtmp_url(rtmp_url)
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise SessionLimitError(f"The server already runs {self.max_sessions} live sessions (the limit, "
                                        "--max-sessions); end one (DELETE /api/sessions/<id>) or try later.")
        rgb = load_image(image)
        points = self._detector().detect(rgb).points
        face = self._face(rgb, points, options)
        session_id = secrets.token_urlsafe(16)
        try:
            session = Session(session_id, face, options, self.broadcaster, os.path.join(self.folder, session_id),
                              self.hub)
        except BaseException:
            face.close()
            raise
        with self._lock:
            self._sessions[session_id] = session
        session.start()
        if rtmp_url:
            from .outputs import RtmpOutput

            session.rtmp = RtmpOutput(session.stream, rtmp_url)
            session.stream.attach(session.rtmp)
        return session

    def _face(self, rgb: np.ndarray, points: np.ndarray, options: SessionOptions):
        if options.engine == "lite":
            return LiteFace(rgb, points, options)
        from sadtalker.streaming import SadTalkerFace

        from .engines import choose_engine, load_engine

        if self.checkpoint_dir is None:
            raise InputError("This server has no SadTalker checkpoint folder; create the session with "
                             "{\"engine\": \"lite\"}.")
        choose_engine("sadtalker", self.checkpoint_dir)  # a clear InputError when the weights are not installed
        pipeline = load_engine("sadtalker", self.checkpoint_dir, self.device)
        return SadTalkerFace(pipeline, rgb, points, size=options.size, preprocess=options.preprocess,
                             seed=options.seed, use_blink=options.use_blink)

    def get(self, session_id: str) -> Session | None:
        with self._lock:
            return self._sessions.get(session_id)

    def delete(self, session_id: str) -> bool:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            return False
        session.close()
        if self.hub is not None:
            self.hub.close(session_id)
        if session.folder:
            shutil.rmtree(session.folder, ignore_errors=True)
        with self._lock:  # gone (404) only once nothing of it is left
            self._sessions.pop(session_id, None)
        return True

    def all(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def close(self) -> None:
        self._stop.set()
        for session in self.all():
            self.delete(session.id)

    def _reap(self) -> None:
        while not self._stop.wait(self.reap_every_s):
            now = time.monotonic()
            for session in self.all():
                if now - session.last_activity > self.idle_s and not session.speech.pending():
                    log.info("session %s ended: no speech and no viewer for %.0f min", session.id, self.idle_s / 60)
                    self.delete(session.id)


class SessionLimitError(InputError):
    """Too many sessions at once."""


def check_rtmp_url(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("rtmp", "rtmps") or not parts.hostname:
        raise InputError(f"rtmp_url must be an rtmp:// or rtmps:// address with a host (got {url!r}).")
    return url
