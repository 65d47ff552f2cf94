"""Live streams: every job and every session is one, with one clock; every output of it plays from that clock.

A producer (a job's display thread, a session's ticks) hands its stream frames and speech stamped with their time
``t`` on the stream's timeline. The stream passes them to the WebSocket broadcaster and, once an encoded output
(WebRTC, HLS, RTMP) is attached, into a ``Timeline``: a short buffer from which an output takes, for any moment,
the frame showing then and the sound playing then. An output reads the timeline a fixed delay behind the clock, so
sound and picture come out together by construction, and never drift: both are read at the same ``t``.

The ``StreamHub`` knows the process's streams by id (routes look them up there) and which one is the newest job's.
"""
from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict, deque

import cv2
import numpy as np
from PIL import Image

from core.options import FPS, SAMPLE_RATE

from .broadcaster import Broadcaster
from .clock import StreamClock

log = logging.getLogger(__name__)

OUTPUT_DELAY_S = 0.12  # outputs read the timeline this far behind the clock (frames and speech are all there)
AUDIO_RING_S = 8.0  # speech kept on the timeline (it arrives up to ~0.4 s ahead; outputs read ~0.1 s behind)
FRAMES_KEPT = 2 * FPS
JOB_OUTPUT_SIZE = (512, 512)  # jobs show frames of several sizes; encoded outputs letterbox them into this


class Timeline:
    """The last seconds of a stream: ``frame_at(t)`` (fixed size, letterboxed) and ``sound_at(t, n)`` (int16)."""

    def __init__(self, width: int, height: int):
        self.width, self.height = int(width), int(height)
        self._lock = threading.Lock()
        self._frames: deque[tuple[float, np.ndarray | None, bytes | None]] = deque(maxlen=FRAMES_KEPT)
        self._fitted: tuple[int, np.ndarray] | None = None  # (id of the source, fitted frame)
        self._ring = np.zeros(int(AUDIO_RING_S * SAMPLE_RATE), np.int16)
        self._ring_written = np.full(self._ring.size, -1, np.int64)  # absolute sample index stored in each slot
        self._blank = np.zeros((self.height, self.width, 3), np.uint8)

    def add_frame(self, t: float, rgb: np.ndarray | None = None, jpeg: bytes | None = None) -> None:
        with self._lock:
            self._frames.append((t, rgb, jpeg))

    def add_sound(self, t: float, pcm: np.ndarray) -> None:
        start = int(round(t * SAMPLE_RATE))
        index = np.arange(start, start + pcm.size)
        with self._lock:
            slots = index % self._ring.size
            self._ring[slots] = pcm
            self._ring_written[slots] = index

    def frame_at(self, t: float) -> np.ndarray:
        with self._lock:
            chosen = None
            for entry in self._frames:
                if entry[0] <= t + 1e-6:
                    chosen = entry
                else:
                    break
            if chosen is None and self._frames:
                chosen = self._frames[0]
        if chosen is None:
            return self._blank
        if self._fitted is not None and self._fitted[0] == id(chosen):
            return self._fitted[1]
        _, rgb, jpeg = chosen
        if rgb is None:
            rgb = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        fitted = letterbox(rgb, self.width, self.height)
        self._fitted = (id(chosen), fitted)
        return fitted

    def sound_at(self, t: float, count: int) -> np.ndarray:
        start = int(round(t * SAMPLE_RATE))
        index = np.arange(start, start + count)
        with self._lock:
            slots = index % self._ring.size
            present = self._ring_written[slots] == index
            return np.where(present, self._ring[slots], 0).astype(np.int16)


def letterbox(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """``rgb`` scaled to fit ``width`` x ``height``, centred on black."""
    h, w = rgb.shape[:2]
    if (w, h) == (width, height):
        return rgb
    scale = min(width / w, height / h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    scaled = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    canvas = np.zeros((height, width, 3), np.uint8)
    x, y = (width - size[0]) // 2, (height - size[1]) // 2
    canvas[y:y + size[1], x:x + size[0]] = scaled
    return canvas


class LiveStream:
    """One job's or session's stream: what its producer sends goes to the viewers and to its encoded outputs."""

    def __init__(self, stream_id: str, clock: StreamClock, broadcaster: Broadcaster | None,
                 size: tuple[int, int] = JOB_OUTPUT_SIZE, kind: str = "job"):
        self.id, self.clock, self.kind = stream_id, clock, kind
        self.size = size
        self.broadcaster = broadcaster
        self.ended = threading.Event()
        self._timeline: Timeline | None = None
        self._outputs: list = []
        self._lock = threading.Lock()
        if broadcaster is not None:
            broadcaster.open_stream(stream_id, clock)

    # --- what producers send ------------------------------------------------------------------------------
    def frame(self, seq: int, t: float, quality: str, rgb: np.ndarray | None = None, jpeg: bytes | None = None) -> None:
        if self.broadcaster is not None:
            self.broadcaster.publish_frame(self.id, seq, t, quality, rgb=rgb, jpeg=jpeg)
        if self._timeline is not None:
            self._timeline.add_frame(t, rgb, jpeg)

    def sound(self, t: float, pcm: np.ndarray) -> None:
        if self.broadcaster is not None:
            self.broadcaster.publish_audio(self.id, t, pcm)
        if self._timeline is not None:
            self._timeline.add_sound(t, pcm)

    def status(self, stage: str, message: str) -> None:
        if self.broadcaster is not None:
            self.broadcaster.publish_status(self.id, stage, message)

    def progress(self, done: int, total: int, eta_s: float | None, stage: str = "render") -> None:
        if self.broadcaster is not None:
            self.broadcaster.publish_progress(self.id, done, total, eta_s, stage)

    def done(self, video_url: str | None, duration_s: float, engine: str, num_frames: int) -> None:
        if self.broadcaster is not None:
            self.broadcaster.publish_done(self.id, video_url, duration_s, engine, num_frames)

    def error(self, message: str) -> None:
        if self.broadcaster is not None:
            self.broadcaster.publish_error(self.id, message)

    # --- encoded outputs ----------------------------------------------------------------------------------
    def timeline(self) -> Timeline:
        with self._lock:
            if self._timeline is None:
                self._timeline = Timeline(*self.size)
            return self._timeline

    def attach(self, output) -> None:
        """An output with ``close()``; closed when the stream ends."""
        with self._lock:
            self._outputs.append(output)
        if self.ended.is_set():
            output.close()

    def detach(self, output) -> None:
        with self._lock:
            if output in self._outputs:
                self._outputs.remove(output)

    def outputs(self) -> list:
        with self._lock:
            return list(self._outputs)

    def end(self) -> None:
        self.ended.set()
        with self._lock:
            outputs, self._outputs = self._outputs, []
        for output in outputs:
            try:
                output.close()
            except Exception:
                log.exception("stream %s: closing an output failed", self.id)


class StreamHub:
    """The process's live streams by id, and the newest job's (for outputs that follow the page)."""

    MAX_REMEMBERED = 64

    def __init__(self, broadcaster: Broadcaster | None):
        self.broadcaster = broadcaster
        self._streams: "OrderedDict[str, LiveStream]" = OrderedDict()
        self._lock = threading.Lock()
        self._listeners: list = []  # called with each new job stream (outputs that follow the page)

    def open(self, stream_id: str, clock: StreamClock, size: tuple[int, int] = JOB_OUTPUT_SIZE,
             kind: str = "job") -> LiveStream:
        stream = LiveStream(stream_id, clock, self.broadcaster, size, kind)
        with self._lock:
            self._streams[stream_id] = stream
            while len(self._streams) > self.MAX_REMEMBERED:
                _, old = self._streams.popitem(last=False)
                old.end()
            listeners = list(self._listeners) if kind == "job" else []
        for listener in listeners:
            listener(stream)
        return stream

    def get(self, stream_id: str) -> LiveStream | None:
        with self._lock:
            return self._streams.get(stream_id)

    def close(self, stream_id: str) -> None:
        with self._lock:
            stream = self._streams.pop(stream_id, None)
        if stream is not None:
            stream.end()

    def on_new_job(self, listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def close_all(self) -> None:
        with self._lock:
            streams, self._streams = list(self._streams.values()), OrderedDict()
        for stream in streams:
            stream.end()
