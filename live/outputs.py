"""Encoded live outputs of a stream through the bundled ffmpeg: HLS (a bounded window of 1 s segments on disk) and
RTMP push (one continuous FLV stream that reconnects with back-off when the server drops).

Both read the stream's ``Timeline`` a fixed delay behind its clock, 25 frames a second, each frame with exactly
the sound of its 40 ms: picture and sound share the stream's clock, so they cannot drift apart however long the
stream runs. Idle moments are idle frames and silence: the output never has a gap.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import time

from core.options import FPS

from .avsink import SAMPLES_PER_TICK, AvSink
from .clock import StreamClock
from .stream import OUTPUT_DELAY_S, JOB_OUTPUT_SIZE, LiveStream, StreamHub, Timeline

log = logging.getLogger(__name__)

HLS_SEGMENT_S = 1  # segments of one second (a key frame every second): the delay stays around 2-3 s
HLS_WINDOW = 6  # segments listed in the playlist (older ones are deleted)
RECONNECT_FIRST_S, RECONNECT_MAX_S = 1.0, 30.0


def hls_args(folder: str) -> list[str]:
    return ["-f", "hls", "-hls_time", str(HLS_SEGMENT_S), "-hls_list_size", str(HLS_WINDOW),
            "-hls_flags", "delete_segments+independent_segments+omit_endlist", "-hls_delete_threshold", "2",
            "-hls_segment_type", "mpegts", "-hls_segment_filename", os.path.join(folder, "segment_%06d.ts"),
            os.path.join(folder, "index.m3u8")]


RTMP_IO_TIMEOUT_US = 3_000_000  # a server that stops taking data for this long counts as gone (then: reconnect)


def rtmp_args(url: str) -> list[str]:
    return ["-f", "flv", "-flvflags", "no_duration_filesize", "-rw_timeout", str(RTMP_IO_TIMEOUT_US), url]


class EncodedOutput:
    """A thread that feeds one AvSink from a timeline at 25 frames a second (restarting the sink if asked to)."""

    def __init__(self, name: str, clock: StreamClock, timeline: Timeline, sink_args: list[str],
                 reconnect: bool = False):
        self.name, self.clock, self.timeline = name, clock, timeline
        self.sink_args, self.reconnect = sink_args, reconnect
        self.connects = 0  # times the sink was (re)started
        self.ticks_sent = 0
        self._stop = threading.Event()
        self._sink: AvSink | None = None
        self._thread = threading.Thread(target=self._run, name=f"output-{name}", daemon=True)
        self._thread.start()

    @property
    def connected(self) -> bool:
        return self._sink is not None and self._sink.alive

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def _source_time(self, t: float) -> float:
        """Where on the source timeline output time ``t`` is (the same clock, unless a subclass follows jobs)."""
        return t

    def _run(self) -> None:
        tick = math.ceil((self.clock.now() - OUTPUT_DELAY_S) * FPS)
        wait_s = RECONNECT_FIRST_S
        retry_at = connected_at = 0.0
        while not self._stop.is_set():
            t = tick / FPS
            delay = self.clock.monotonic(t + OUTPUT_DELAY_S) - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                break
            if time.monotonic() - self.clock.monotonic(t + OUTPUT_DELAY_S) > 1.0:  # fell far behind: catch up
                tick = math.ceil((self.clock.now() - OUTPUT_DELAY_S) * FPS)
                continue
            if self._sink is not None and self.reconnect and self._sink.alive and self._sink.stalled:
                self._sink.kill()  # the server hung up and ffmpeg waits instead of exiting: start over
            if self._sink is not None and not self._sink.alive:
                log.warning("%s: the output stopped (%s); reconnecting in %.0f s", self.name,
                            self._sink.error_text()[-200:] or "no message", wait_s)
                self._sink.kill()
                self._sink, retry_at = None, time.monotonic() + wait_s
                wait_s = min(RECONNECT_MAX_S, wait_s * 2)
                if not self.reconnect:
                    return
            if self._sink is None and time.monotonic() >= retry_at:
                self._sink = AvSink(self.timeline.width, self.timeline.height, self.sink_args, name=self.name)
                self.connects += 1
                connected_at = time.monotonic()
            if self._sink is not None:
                source_t = self._source_time(t)
                self._sink.write(self.timeline.frame_at(source_t), self.timeline.sound_at(source_t, SAMPLES_PER_TICK))
                self.ticks_sent += 1
                if time.monotonic() - connected_at > 10.0:
                    wait_s = RECONNECT_FIRST_S  # it has held for a while: the next drop starts the back-off again
            tick += 1


class HlsOutput(EncodedOutput):
    """``index.m3u8`` and its segments in ``folder``, removed when the output closes."""

    def __init__(self, stream: LiveStream, folder: str):
        os.makedirs(folder, exist_ok=True)
        self.folder = folder
        self.last_request = time.monotonic()
        super().__init__(f"hls-{stream.id}", stream.clock, stream.timeline(), hls_args(folder))

    @property
    def playlist(self) -> str:
        return os.path.join(self.folder, "index.m3u8")

    def close(self) -> None:
        super().close()
        shutil.rmtree(self.folder, ignore_errors=True)


class RtmpOutput(EncodedOutput):
    """One continuous FLV stream (H.264 + AAC) pushed to ``url``; reconnects with back-off if the server drops."""

    def __init__(self, stream: LiveStream, url: str):
        self.url = url
        super().__init__(f"rtmp-{stream.id}", stream.clock, stream.timeline(), rtmp_args(url), reconnect=True)


class PageRtmpOutput(EncodedOutput):
    """The page's live picture pushed to ``url`` as one continuous stream across jobs (``serve --rtmp-url``): it
    follows the newest job's stream, and shows its last frame in silence between jobs."""

    def __init__(self, hub: StreamHub, url: str, size: tuple[int, int] = JOB_OUTPUT_SIZE):
        self._follow_lock = threading.Lock()
        self._source: LiveStream | None = None
        self._offset = 0.0  # output time minus the followed stream's time
        self._blank = Timeline(*size)
        self.url = url
        clock = StreamClock()
        super().__init__("rtmp-page", clock, self._blank, rtmp_args(url), reconnect=True)
        hub.on_new_job(self.follow)

    def follow(self, stream: LiveStream) -> None:
        timeline = stream.timeline()
        with self._follow_lock:
            self._source = stream
            self._offset = self.clock.now() - stream.clock.now()
            self.timeline = timeline

    def _source_time(self, t: float) -> float:
        with self._follow_lock:
            return t - self._offset
