"""Streaming mp4 output: frames go to ffmpeg as they are produced (H.264 yuv420p + AAC, 25 fps, faststart).

Memory stays flat in clip length: nothing but the frame being written is held here. The file appears under its name
only when complete: ffmpeg writes a hidden partial file beside it, renamed when ffmpeg has finished.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import subprocess
import tempfile
from typing import ContextManager

import numpy as np

from .audio import ffmpeg_exe
from .options import FPS


class Mp4Writer:
    """Write RGB frames of one fixed size into ``path``; the audio track is muxed on the fly.

    Use as a context manager; leaving the block by an exception (or by ``abort()``) removes the partial file. Until
    ``close()`` succeeds nothing exists at ``path``: the frames go to a hidden file in the same folder
    (``.<name>.partial-<random><ext>``), renamed to ``path`` once ffmpeg has finished it.
    """

    PARTIAL_MARK = ".partial-"

    def __init__(self, path: str, width: int, height: int, audio_path: str | None = None,
                 duration_s: float | None = None, fps: int = FPS, crf: int = 18):
        self.path = path
        self.width, self.height = int(width), int(height)
        self.frames_written = 0
        folder, name = os.path.split(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        stem, ext = os.path.splitext(name)
        # same folder (the rename is atomic), same extension (ffmpeg picks the container from it)
        self.partial_path = os.path.join(folder, f".{stem}{self.PARTIAL_MARK}{secrets.token_hex(4)}{ext}")
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
        cmd += [self.partial_path]
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
            self._log.close()
            self._remove()
            raise RuntimeError(f"ffmpeg failed to write {self.path} (exit {code}): {message}")
        self._log.close()
        os.replace(self.partial_path, self.path)
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
            os.remove(self.partial_path)
        except FileNotFoundError:
            pass


def optional_mp4_writer(path: str | None, width: int, height: int, **kwargs) -> "ContextManager[Mp4Writer | None]":
    """``with optional_mp4_writer(options.output, ...) as writer``: an Mp4Writer, or None when no file is wanted."""
    return Mp4Writer(path, width, height, **kwargs) if path else contextlib.nullcontext()


class Mp4Reader:
    """Frames of a video file read back in order from ``start`` on, downscaled to at most ``max_side`` pixels
    (ffmpeg decodes and scales; one frame is held at a time). ``close()`` when done."""

    def __init__(self, path: str, start: int = 0, max_side: int = 512, fps: int = FPS):
        self.path, self.max_side, self.fps = path, max_side, fps
        self.next_index = start
        width, height = _video_size(path)
        scale = min(1.0, max_side / max(width, height))
        self.width, self.height = max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)
        cmd = [ffmpeg_exe(), "-nostdin", "-v", "error", "-ss", f"{start / fps:.3f}", "-i", path, "-an",
               "-vf", f"scale={self.width}:{self.height}", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL)

    def read(self) -> np.ndarray | None:
        """The next frame (H, W, 3) uint8, or None at the end of the file."""
        size = self.width * self.height * 3
        data = self._proc.stdout.read(size)
        if len(data) < size:
            return None
        self.next_index += 1
        return np.frombuffer(data, np.uint8).reshape(self.height, self.width, 3)

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._proc.stdout.close()


def _video_size(path: str) -> tuple[int, int]:
    """(width, height) of a video's first stream, from ffmpeg's description of the file."""
    probe = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", path], capture_output=True, text=True)
    match = re.search(r"Video: .*?(\d{2,5})x(\d{2,5})", probe.stderr)
    if match is None:
        raise RuntimeError(f"{path} has no video stream")
    return int(match.group(1)), int(match.group(2))
