"""A live stream into the bundled ffmpeg: picture and sound muxed from one clock (recording, HLS, RTMP).

Each display tick hands the sink one frame and exactly one frame's worth of sound (640 samples at 16 kHz, silence
when nothing is said), so sound and picture cannot drift apart: frame k and samples [640 k, 640 (k+1)) are the same
moment by construction. ffmpeg reads the picture on stdin and the sound on a second pipe; a writer thread feeds it
so the stream's ticks never wait for the encoder. If the encoder falls behind by more than its queue holds, whole
ticks (picture and sound together) are dropped rather than letting memory grow. A recording's encoder runs at a lower
CPU priority with a longer queue: it is not live, so it takes the CPU the live work leaves and catches up when the
CPU is less busy, instead of making the live frames late when several sessions share a small CPU.

Each frame is converted to the encoder's YUV 4:2:0 here (OpenCV: ~0.15 ms at 512x512) instead of letting
ffmpeg's swscale do it from RGB (~1.7 ms): that halves an output's CPU, which decides how many live sessions a CPU
holds. The conversion is the same BT.601 limited-range one. 4:2:0 needs even sizes: an odd width or height loses its
last column or row.
"""
from __future__ import annotations

import logging
import os
import queue
import subprocess
import tempfile
import threading

import cv2
import numpy as np

from core.audio import ffmpeg_exe
from core.options import FPS, SAMPLE_RATE

log = logging.getLogger(__name__)

SAMPLES_PER_TICK = SAMPLE_RATE // FPS  # 640
MAX_QUEUED_TICKS = 2 * FPS  # two seconds of stream waiting for the encoder at most (a live output)
RECORDING_QUEUED_TICKS = 8 * FPS  # a recording's encoder may fall this far behind (~3 MB a second at 512 x 512)

# H.264 for live use: no B-frames (no reordering delay), a key frame every second (segments and joins)
LIVE_VIDEO = ["-c:v", "libx264", "-preset", "veryfast", "-tune", "zerolatency", "-pix_fmt", "yuv420p",
              "-g", str(FPS), "-keyint_min", str(FPS), "-sc_threshold", "0"]
# A session's recording goes to the local disk, where size matters less than the CPU of several sessions at once:
# x264's fastest preset on one thread takes about half of veryfast's CPU (bench/session.py, concurrency) for ~40 %
# more bytes. One thread per encoder: with a stream per session, threads within one encoder only add overhead.
RECORDING_VIDEO = [*LIVE_VIDEO[:2], "-preset", "ultrafast", "-threads", "1", *LIVE_VIDEO[4:]]
LIVE_AUDIO = ["-c:a", "aac", "-b:a", "96k", "-ar", "48000"]


class AvSink:
    """``write(rgb, pcm)`` once per tick from the stream's thread; ``close()`` ends the file or stream cleanly."""

    def __init__(self, width: int, height: int, output_args: list[str], name: str = "output",
                 video_args: list[str] = LIVE_VIDEO, max_queued_ticks: int = MAX_QUEUED_TICKS,
                 background: bool = False):
        self.width, self.height, self.name = int(width) // 2 * 2, int(height) // 2 * 2, name
        if self.width < 2 or self.height < 2:
            raise ValueError(f"a stream of {width}x{height} pixels is too small to encode")
        self.ticks_written = self.ticks_dropped = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max_queued_ticks)
        self._log = tempfile.TemporaryFile()
        audio_read, self._audio = os.pipe()
        cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", f"{self.width}x{self.height}", "-r", str(FPS),
               "-i", "pipe:0",
               "-f", "s16le", "-ar", str(SAMPLE_RATE), "-ac", "1", "-i", f"pipe:{audio_read}",
               "-map", "0:v:0", "-map", "1:a:0", *video_args, *LIVE_AUDIO, *output_args]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log,
                                      pass_fds=(audio_read,))
        os.close(audio_read)
        if background:
            try:  # Linux's idle class: it runs when no other thread wants the CPU
                os.sched_setscheduler(self._proc.pid, os.SCHED_IDLE, os.sched_param(0))
            except (AttributeError, OSError):  # not Linux: it encodes at the normal priority
                pass
        self._thread = threading.Thread(target=self._run, name=f"avsink-{name}", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def write(self, rgb: np.ndarray, pcm: np.ndarray | None) -> None:
        """One tick: a (height, width, 3) uint8 frame and SAMPLES_PER_TICK int16 samples (None: silence)."""
        if pcm is None:
            pcm = np.zeros(SAMPLES_PER_TICK, np.int16)
        if self._queue.full():
            self.ticks_dropped += 1  # picture and sound of the tick together: the two stay in step
            return
        yuv = cv2.cvtColor(rgb[:self.height, :self.width], cv2.COLOR_RGB2YUV_I420)  # half the bytes to hold
        try:
            self._queue.put_nowait((yuv, pcm))
        except queue.Full:
            self.ticks_dropped += 1  # picture and sound of the tick together: the two stay in step

    def close(self, timeout: float = 10.0) -> int:
        """Finish the output (ffmpeg writes its trailer); returns ffmpeg's exit status. An ffmpeg that no longer
        takes the stream (a server gone, a full disk) is ended instead of waited for."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:  # the writer is stuck on a pipe ffmpeg does not read
            self._proc.kill()
            self._drain_and_stop()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._proc.kill()
            self._thread.join(timeout)
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            return self._proc.wait()

    def _drain_and_stop(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put_nowait(None)

    def kill(self) -> None:
        self._proc.kill()
        self._drain_and_stop()
        self._thread.join(5)
        self._proc.wait()

    @property
    def stalled(self) -> bool:
        """ffmpeg stopped taking the stream: the queue is full (it has not read a tick for about two seconds). A
        server that hung up can leave ffmpeg waiting instead of exiting; this is how the output notices."""
        return self._queue.full()

    def error_text(self) -> str:
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace").strip()

    def _run(self) -> None:
        video, audio = self._proc.stdin, self._audio
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    break
                yuv, pcm = item
                video.write(yuv.data)
                os.write(audio, np.ascontiguousarray(pcm, dtype="<i2").tobytes())
                self.ticks_written += 1
        except (BrokenPipeError, OSError) as exc:
            log.warning("%s: ffmpeg stopped taking the stream (%s): %s", self.name, exc, self.error_text()[-300:])
        finally:
            for closing in (lambda: video.close(), lambda: os.close(audio)):
                try:
                    closing()
                except OSError:
                    pass


def recording_args(path: str) -> list[str]:
    """A fragmented mp4 that is readable while it grows (every fragment starts with a key frame)."""
    return ["-f", "mp4", "-movflags", "frag_keyframe+empty_moov+default_base_moof", "-flush_packets", "1", path]


def snapshot_mp4(growing: str, out: str) -> str:
    """A complete, seekable copy of what a growing recording holds so far (no re-encoding)."""
    proc = subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-i", growing, "-c", "copy",
                           "-movflags", "+faststart", out], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"could not copy the recording: {proc.stderr.strip()[-300:]}")
    return out
