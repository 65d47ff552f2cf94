"""Streaming mp4 output: frames go to ffmpeg as they are produced (H.264 yuv420p + AAC, 25 fps, faststart).

Memory stays flat in clip length: nothing but the frame being written is held here.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from typing import ContextManager

import numpy as np

from .audio import ffmpeg_exe
from .options import FPS


class Mp4Writer:
    """Write RGB frames of one fixed size into ``path``; the audio track is muxed on the fly.

    Use as a context manager; leaving the block by an exception (or by ``abort()``) removes the partial file.
    """

    def __init__(self, path: str, width: int, height: int, audio_path: str | None = None,
                 duration_s: float | None = None, fps: int = FPS, crf: int = 18):
        self.path = path
        self.width, self.height = int(width), int(height)
        self.frames_written = 0
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._log = tempfile.TemporaryFile()
        cmd = [ffmpeg_exe(), "-nostdin", "-y", "-v", "error",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{self.width}x{self.height}", "-r", str(fps), "-i", "-"]
        if audio_path is not None:
            cmd += ["-i", audio_path, "-map", "0:v:0", "-map", "1:a:0", "-c:a", "aac", "-b:a", "160k"]
        # yuv420p needs even sides: pad by at most one pixel instead of failing on odd-sized portraits
        cmd += ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-c:v", "libx264", "-preset", "veryfast", "-crf", str(crf),
                "-pix_fmt", "yuv420p", "-movflags", "+faststart"]
        if duration_s is not None:
            cmd += ["-t", f"{duration_s:.3f}"]
        cmd += [path]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log)

    def write(self, rgb: np.ndarray) -> None:
        if rgb.shape != (self.height, self.width, 3) or rgb.dtype != np.uint8:
            raise ValueError(f"frame must be ({self.height}, {self.width}, 3) uint8, got {rgb.shape} {rgb.dtype}")
        try:
            self._proc.stdin.write(np.ascontiguousarray(rgb).tobytes())
        except BrokenPipeError:
            raise RuntimeError(f"ffmpeg stopped while writing {self.path}: {self._read_log()}") from None
        self.frames_written += 1

    def close(self) -> str:
        """Finish the file and return its path; raises RuntimeError with ffmpeg's message if it failed."""
        if self._proc.stdin and not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except BrokenPipeError:
                pass
        code = self._proc.wait()
        if code != 0:
            message = self._read_log()
            self._remove()
            raise RuntimeError(f"ffmpeg failed to write {self.path} (exit {code}): {message}")
        self._log.close()
        return self.path

    def abort(self) -> None:
        """Stop ffmpeg and delete the partial file."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        if self._proc.stdin and not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except BrokenPipeError:
                pass
        self._log.close()
        self._remove()

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _read_log(self) -> str:
        self._log.seek(0)
        text = self._log.read().decode("utf-8", "replace").strip()
        return text.splitlines()[-1] if text else "no message"

    def _remove(self) -> None:
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass


def optional_mp4_writer(path: str | None, width: int, height: int, **kwargs) -> "ContextManager[Mp4Writer | None]":
    """``with optional_mp4_writer(options.output, ...) as writer``: an Mp4Writer, or None when no file is wanted."""
    return Mp4Writer(path, width, height, **kwargs) if path else contextlib.nullcontext()
