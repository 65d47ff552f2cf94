"""A pace-controlled engine for testing the live display policy.

The real engines render at fixed speeds (the Lite engine faster than real time, SadTalker on a CPU far slower), and
the policy must be right for both; this engine follows the generate() contract exactly (typed events, one frame at
a time, streaming mp4 through the real Mp4Writer and ffmpeg) and encodes what it drew in the pixels, so tests can
tell which frame a viewer was shown.
"""
from __future__ import annotations

import time

import numpy as np

from core.audio import load_audio, num_video_frames
from core.engine import Done, Frame, MotionReady, Progress
from core.image import load_image
from core.video import Mp4Writer


def frame_code(index: int) -> int:
    """The red level that marks frame ``index`` (distinct, JPEG-safe steps of 6)."""
    return 12 + (index * 6) % 240


def decode_code(red_level: float) -> int:
    return round((red_level - 12) / 6)


class ScriptedPreview:
    def __init__(self, num_frames: int):
        self.num_frames = num_frames
        self.rendered: list[int] = []

    def render(self, index: int) -> np.ndarray:
        self.rendered.append(index)
        frame = np.zeros((128, 128, 3), np.uint8)
        frame[..., 0] = frame_code(index)
        frame[..., 1] = 200  # green = preview
        return frame


class ScriptedIdle:
    def __init__(self, rgb: np.ndarray, size: int = 128):
        self.size = size

    def render(self, t: float) -> np.ndarray:
        return np.full((self.size, self.size, 3), 128, np.uint8)  # grey = idle


class ScriptedEngine:
    def __init__(self, name: str = "lite", num_frames: int | None = None, final_fps: float = 50.0,
                 motion_delay_s: float = 0.1, size: tuple[int, int] = (96, 128), fail_at: int | None = None,
                 error: Exception | None = None, first_frame_delay_s: float = 0.0, tint: int = 200,
                 quick_start: bool = False):
        self.name = name
        self.quick_start = quick_start  # False: the job lets the idle animation reach the screen first
        self.first_frame_delay_s, self.tint = first_frame_delay_s, tint
        self.num_frames, self.final_fps, self.motion_delay_s = num_frames, final_fps, motion_delay_s
        self.height, self.width = size
        self.fail_at, self.error = fail_at, error
        self.closed = False
        self.frames_made = 0
        self.preview: ScriptedPreview | None = None

    def generate(self, image, audio, options):
        self.closed = False
        try:
            load_image(image)
            yield Progress("audio", 0, 1, "Reading the audio")
            samples = load_audio(audio, options.max_audio_s)
            num_frames = self.num_frames or num_video_frames(samples.size)
            time.sleep(self.motion_delay_s)
            yield Progress("motion", 1, 1, "Motion computed")
            self.preview = ScriptedPreview(num_frames)
            yield MotionReady(num_frames, 25.0, self.preview, samples)
            writer = None
            if options.output:
                writer = Mp4Writer(options.output, self.width, self.height, audio_path=audio,
                                    duration_s=num_frames / 25)
            start = time.monotonic() + self.first_frame_delay_s
            try:
                for index in range(num_frames):
                    if self.fail_at is not None and index == self.fail_at:
                        raise self.error
                    wait = start + index / self.final_fps - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    rgb = np.zeros((self.height, self.width, 3), np.uint8)
                    rgb[..., 0] = frame_code(index)
                    rgb[..., 2] = self.tint  # blue = final
                    if writer is not None:
                        writer.write(rgb)
                    self.frames_made += 1
                    yield Frame(index, index / 25, "final", rgb)
                path = writer.close() if writer is not None else None
            except BaseException:
                if writer is not None:
                    writer.abort()
                raise
            yield Done(path, num_frames, num_frames / 25, self.name)
        finally:
            self.closed = True
