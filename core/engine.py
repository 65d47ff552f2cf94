"""The engine contract: every engine's ``generate(image, audio, options)`` yields these typed events.

The live jobs, the viewers and the headless renderer all consume the same stream. Cancelling a generation is simply:
stop iterating (the engine's ``finally`` stops its encoder and removes the partial file).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Protocol

import numpy as np

from .options import Options

PREVIEW_SIZE = 128  # side of the square preview and idle frames (pixels)

Quality = Literal["idle", "preview", "final"]


@dataclass(frozen=True)
class Progress:
    """A stage started or advanced. ``total`` is 0 when the stage has no countable steps."""

    stage: str  # short machine name: "landmarks", "audio", "motion", "render", "encode", ...
    done: int
    total: int
    message: str = ""  # human-readable, shown in the UI status line


@dataclass(frozen=True)
class Frame:
    """One video frame. ``rgb`` is (H, W, 3) uint8."""

    index: int
    time_s: float
    quality: Quality
    rgb: np.ndarray


class PreviewRenderer(Protocol):
    """Renders a cheap preview frame of the clip on demand (thread-safe, any order)."""

    num_frames: int

    def render(self, index: int) -> np.ndarray:
        """(PREVIEW_SIZE, PREVIEW_SIZE, 3) uint8 preview of frame ``index``, driven by the final video's motion."""
        ...


@dataclass(frozen=True)
class MotionReady:
    """The clip's motion is known (for a long clip: of its first seconds, the preview gets the rest before it plays
    that far); previews can be rendered from now on. ``audio`` is the speech the motion belongs to (SAMPLE_RATE mono
    float32, as decoded for the motion), so a live stream plays exactly what drives the mouth."""

    num_frames: int
    fps: float
    preview: PreviewRenderer
    audio: np.ndarray


@dataclass(frozen=True)
class Done:
    """Generation finished. ``video_path`` is None when no output file was requested."""

    video_path: str | None
    num_frames: int
    duration_s: float
    engine: str  # "lite" or "sadtalker"
    warnings: tuple[str, ...] = ()  # things the user should know (e.g. enhancer weights missing, skipped)


Event = Progress | Frame | MotionReady | Done


class Engine(Protocol):
    """What the live layer runs: loaded once per process, ``generate`` is safe for concurrent jobs."""

    name: str  # "lite" or "sadtalker"
    # Its motion is ready within a fraction of a second, light on the CPU: a job starts it at once and at full
    # priority (the live preview waits for that motion), and lowers its priority for the rest (the render).
    # Otherwise the job lowers it from the start and lets the idle animation reach the screen first.
    quick_start: bool

    def generate(self, image: "str | np.ndarray", audio: str, options: Options) -> Iterator[Event]: ...
