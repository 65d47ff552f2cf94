"""A live stream into the bundled ffmpeg: picture and sound muxed from one clock (recording, HLS, RTMP).

Each display tick hands the sink one frame and exactly one frame's worth of sound (640 samples at 16 kHz, silence
when nothing is said), so sound and picture cannot drift apart: frame k and samples [640 k, 640 (k+1)) are the same
moment by construction. ffmpeg reads the picture on stdin and the sound on a second pipe; a writer thread feeds it
so the stream's ticks never wait for the encoder. If the encoder falls behind, whole ticks (picture and sound
together) are dropped rather than letting memory grow.
"""
from __future__ import annotations

import logging
import os
import queue
import subprocess
import tempfile
import threading

import numpy as np

from core.audio import ffmpeg_exe
from core.options import FPS, SAMPLE_RATE

log = logging.getLogger(__name__)

SAMPLES_PER_TICK = SAMPLE_RATE // FPS  # 640
MAX_QUEUED_TICKS = 2 * FPS  # two seconds of stream waiting for the encoder at most

# H.264 for live use: no B-frames (no reordering delay), a key frame every second (segments and joins)
LIVE_VIDEO = ["-c:v", "libx264", "-preset", "veryfast", "-tune", "zerolatency", "-pix_fmt", "yuv420p",
              "-g", str(FPS), "-keyint_min", str(FPS), "-sc_threshold", "0"]
LIVE_AUDIO = ["-c:a", "aac", "-b:a", "96k", "-ar", "48000"]


class AvSink:
    """``write(rgb, pcm)`` once per tick from the stream's thread; ``close()`` ends the file or stream cleanly."""

    def __init__(self, width: int, height: int, output_args: list[str], name: str = "output"):
        self.width, self.height, self.name = int(width), int(height), name
        self.ticks_written = self.ticks_dropped = 0
        self._queue: queue.Queue = queue.Queue(maxsize=MAX_QUEUED_TICKS)
        self._log = tempfile.TemporaryFile()
        audio_read, self._audio = os.pipe()
        cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{self.width}x{self.height}", "-r", str(FPS),
               "-i", "pipe:0",
               "-f", "s16le", "-ar", str(SAMPLE_RATE), "-ac", "1", "-i", f"pipe:{audio_read}",
               "-map", "0:v:0", "-map", "1:a:0", *LIVE_VIDEO, *LIVE_AUDIO, *output_args]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log,
                                      pass_fds=(audio_read,))
        os.close(audio_read)
        self._thread = threading.Thread(target=self._run, name=f"avsink-{name}", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def write(self, rgb: np.ndarray, pcm: np.ndarray | None) -> None:
        """One tick: a (height, width, 3) uint8 frame and SAMPLES_PER_TICK int16 samples (None: silence)."""
        if pcm is None:
            pcm = np.zeros(SAMPLES_PER_TICK, np.int16)
        try:
            self._queue.put_nowait((rgb, pcm))
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
                rgb, pcm = item
                video.write(np.ascontiguousarray(rgb, dtype=np.uint8).tobytes())
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
