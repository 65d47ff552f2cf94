"""What a user can set for one generation: one frozen dataclass, checked before any work starts.

Per request, derive a copy with ``dataclasses.replace(options, ...)``; never mutate shared options.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal

from .errors import InputError

FPS = 25  # SadTalker's video rate; audio windows and coefficients are defined per 1/25 s
SAMPLE_RATE = 16000  # every engine works on 16 kHz mono audio

Preprocess = Literal["crop", "extcrop", "resize", "full", "extfull"]
Enhancer = Literal["gfpgan", "RestoreFormer"]
BackgroundEnhancer = Literal["realesrgan"]

PREPROCESS_CHOICES: tuple[str, ...] = ("crop", "extcrop", "resize", "full", "extfull")
ENHANCER_CHOICES: tuple[str, ...] = ("gfpgan", "RestoreFormer")
BACKGROUND_ENHANCER_CHOICES: tuple[str, ...] = ("realesrgan",)
NUM_POSE_STYLES = 46  # Audio2Pose has 46 class embeddings: pose_style 0..45


@dataclass(frozen=True)
class Options:
    # --- every engine ---
    output: str | None = None  # mp4 to write (H.264 + AAC); None = frames only (benchmarks, tests)
    seed: int | None = None  # randomness of head motion / blinks / pose noise; None = fresh each run
    max_audio_s: float = 300.0  # longer audio is refused up front (memory and time are linear in length)
    use_blink: bool = True  # natural eye blinks

    # --- SadTalker engine (the lite engine ignores these; the UI greys them out) ---
    preprocess: Preprocess = "crop"  # how the portrait is cropped for the renderer
    still: bool = False  # keep the source head pose (less head motion), as the official --still
    pose_style: int = 0  # one of the 46 learned head-motion styles
    expression_scale: float = 1.0  # >1 exaggerates mouth/expression, <1 calms it
    size: Literal[256, 512] = 256  # renderer resolution (selects the 256 or 512 checkpoint)
    batch_size: int = 2  # frames rendered per network call
    enhancer: Enhancer | None = None  # face restoration of every frame (needs its weights in checkpoints/)
    background_enhancer: BackgroundEnhancer | None = None  # RealESRGAN x2 on the whole frame
    ref_eyeblink: str | None = None  # video whose eye blinks (expression) drive the eyes
    ref_pose: str | None = None  # video whose head motion is added to the generated pose
    input_yaw: tuple[float, ...] | None = None  # degrees; one value = constant, several = a path through them
    input_pitch: tuple[float, ...] | None = None
    input_roll: tuple[float, ...] | None = None

    def check(self) -> "Options":
        """Raise InputError saying what to change if any value is unusable; return self."""
        if self.preprocess not in PREPROCESS_CHOICES:
            raise InputError(f"preprocess must be one of {', '.join(PREPROCESS_CHOICES)} (got {self.preprocess!r}).")
        if isinstance(self.pose_style, bool) or not isinstance(self.pose_style, int) or not 0 <= self.pose_style < NUM_POSE_STYLES:
            raise InputError(f"pose style must be a whole number from 0 to {NUM_POSE_STYLES - 1} (got {self.pose_style!r}).")
        if not (isinstance(self.expression_scale, (int, float)) and math.isfinite(self.expression_scale)
                and 0.0 <= self.expression_scale <= 10.0):
            raise InputError(f"expression scale must be between 0 and 10 (got {self.expression_scale!r}).")
        if self.size not in (256, 512):
            raise InputError(f"size must be 256 or 512 (got {self.size!r}).")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= 32:
            raise InputError(f"batch size must be a whole number from 1 to 32 (got {self.batch_size!r}).")
        if self.enhancer is not None and self.enhancer not in ENHANCER_CHOICES:
            raise InputError(f"enhancer must be one of {', '.join(ENHANCER_CHOICES)} or none (got {self.enhancer!r}).")
        if self.background_enhancer is not None and self.background_enhancer not in BACKGROUND_ENHANCER_CHOICES:
            raise InputError(f"background enhancer must be 'realesrgan' or none (got {self.background_enhancer!r}).")
        if not (math.isfinite(self.max_audio_s) and self.max_audio_s > 0):
            raise InputError(f"max audio length must be a positive number of seconds (got {self.max_audio_s!r}).")
        for name in ("input_yaw", "input_pitch", "input_roll"):
            values = getattr(self, name)
            if values is not None and (len(values) == 0 or not all(math.isfinite(v) and -90 <= v <= 90 for v in values)):
                raise InputError(f"{name.replace('_', ' ')} must be one or more angles in degrees between -90 and 90.")
        for name in ("ref_eyeblink", "ref_pose"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise InputError(f"{name.replace('_', ' ')} video {path!r} does not exist; choose a video file or leave it empty.")
        return self
