"""What a user can set for one generation: one frozen dataclass, checked before any work starts.

Per request, derive a copy with ``dataclasses.replace(options, ...)``; never mutate shared options.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
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
class Control:
    """How a user sets one option: the CLI flag and the page control are both built from this (one source)."""

    label: str  # the page control's label; also the start of the CLI help
    help: str = ""  # one line more
    engines: Literal["all", "sadtalker"] = "sadtalker"  # "sadtalker": greyed out on the page while Lite runs
    choices: tuple | None = None
    slider: tuple[float, float, float] | None = None  # (min, max, step) of the page's slider
    flag: str = ""  # the CLI flag when it is not --<name-with-dashes>


def _option(default, control: Control | None = None):
    return field(default=default, metadata={"control": control} if control else {})


@dataclass(frozen=True)
class Options:
    # --- every engine ---
    output: str | None = None  # mp4 to write (H.264 + AAC); None = frames only (benchmarks, tests)
    max_audio_s: float = 300.0  # longer audio is refused up front (memory and time are linear in length)
    min_audio_s: float = 1.0 / FPS  # shorter audio is refused (the app and the CLI ask for core.audio.MIN_AUDIO_S)
    seed: int | None = _option(None, Control(  # randomness of head motion / blinks / pose noise
        "Seed", "fixed randomness (head motion, blinks); empty = different each time", engines="all"))
    use_blink: bool = _option(True, Control("Eye blinks", "natural eye blinks", engines="all", flag="--blink"))

    # --- SadTalker engine (the Lite engine ignores these; the page greys them out) ---
    preprocess: Preprocess = _option("crop", Control(  # how the portrait is cropped for the renderer
        "Preprocess", "crop the face, or animate the full image (full / extfull)", choices=PREPROCESS_CHOICES))
    still: bool = _option(False, Control("Still mode", "keep the photo's head pose (less head motion)"))
    pose_style: int = _option(0, Control(  # one of the 46 learned head-motion styles
        "Pose style", f"one of the learned head-motion styles, 0..{NUM_POSE_STYLES - 1}",
        slider=(0, NUM_POSE_STYLES - 1, 1)))
    expression_scale: float = _option(1.0, Control(
        "Expression scale", ">1 exaggerates mouth and expression, <1 calms it", slider=(0.0, 3.0, 0.1)))
    size: Literal[256, 512] = _option(256, Control(  # selects the 256 or 512 checkpoint
        "Face render size", "renderer resolution in pixels", choices=(256, 512)))
    batch_size: int = _option(2, Control("Batch size", "frames per network call", slider=(1, 10, 1)))
    enhancer: Enhancer | None = _option(None, Control(  # needs its weights in checkpoints/
        "Face enhancer", "restore the face in every frame", choices=ENHANCER_CHOICES))
    background_enhancer: BackgroundEnhancer | None = _option(None, Control(
        "Background enhancer", "RealESRGAN x2 on the whole frame (with a face enhancer)",
        choices=BACKGROUND_ENHANCER_CHOICES))
    ref_eyeblink: str | None = _option(None, Control(
        "Eye-blink reference video", "a video whose eye blinks drive the eyes"))
    ref_pose: str | None = _option(None, Control(
        "Head-pose reference video", "a video whose head motion is added to the generated pose"))
    input_yaw: tuple[float, ...] | None = _option(None, Control(  # one value = constant, several = a path
        "Yaw path", "degrees; one value holds it, several move the head through them"))
    input_pitch: tuple[float, ...] | None = _option(None, Control(
        "Pitch path", "degrees; one value holds it, several move the head through them"))
    input_roll: tuple[float, ...] | None = _option(None, Control(
        "Roll path", "degrees; one value holds it, several move the head through them"))

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
        if not (math.isfinite(self.min_audio_s) and 0 <= self.min_audio_s <= self.max_audio_s):
            raise InputError(f"min audio length must be between 0 and the max audio length (got {self.min_audio_s!r}).")
        for name in ("input_yaw", "input_pitch", "input_roll"):
            values = getattr(self, name)
            if values is not None and (len(values) == 0 or not all(math.isfinite(v) and -90 <= v <= 90 for v in values)):
                raise InputError(f"{name.replace('_', ' ')} must be one or more angles in degrees between -90 and 90.")
        for name in ("ref_eyeblink", "ref_pose"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise InputError(f"{name.replace('_', ' ')} video {path!r} does not exist; choose a video file or leave it empty.")
        return self


def user_options() -> list[tuple[str, object, Control]]:
    """(field name, default, control) of every option a user sets, in the order the page shows them."""
    return [(f.name, f.default, f.metadata["control"]) for f in fields(Options) if "control" in f.metadata]


def cli_flag(name: str, control: Control) -> str:
    return control.flag or "--" + name.replace("_", "-")


def is_path_option(name: str) -> bool:
    return name in ("ref_eyeblink", "ref_pose")


def is_angle_path_option(name: str) -> bool:
    return name in ("input_yaw", "input_pitch", "input_roll")


def options_from_user(values: dict, **fixed) -> Options:
    """Options from what a user typed or picked (page controls, CLI flags, JSON): blanks and "none" mean unset,
    sliders' floats become whole numbers where the option is one, angle paths may be "10, -10" text. Checked."""
    kwargs = dict(fixed)
    for name, default, control in user_options():
        if name not in values:
            continue
        value = values[name]
        if isinstance(value, str) and value.strip().lower() in ("", "none"):
            value = None
        if value is None:
            kwargs[name] = None if default is None else default
            continue
        try:
            if is_angle_path_option(name):
                parts = value.replace(",", " ").split() if isinstance(value, str) else list(value)
                value = tuple(float(v) for v in parts)
            elif isinstance(default, bool):
                value = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
            elif name in ("seed", "pose_style", "batch_size", "size"):
                number = float(value)
                if number != int(number):
                    raise ValueError
                value = int(number)
            elif isinstance(default, float):
                value = float(value)
        except (TypeError, ValueError):
            raise InputError(f"{control.label}: {value!r} is not a valid value ({control.help}).") from None
        kwargs[name] = value
    return Options(**kwargs).check()
