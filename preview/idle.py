"""The idle animation: the uploaded face nods and blinks from the image alone, before any audio motion is known.

It renders the same face crop (``crop.face_crop_box``) as the audio-driven preview, so switching from idle to
preview frames keeps the framing.
"""
from __future__ import annotations

import numpy as np

from core.engine import PREVIEW_SIZE
from core.landmarks import LandmarkDetector, shared_detector

from .motion import IdleMotion
from .warp import prepared_crop_renderer


class IdleAnimator:
    """``render(t)`` -> (size, size, 3) uint8 of the face crop at ``t`` seconds; t = 0 is the photo itself.

    Construction detects the face (cached per image content by the detector) and prepares the warp; both are
    fast enough for the first frame to go out at once. ``render`` is thread-safe.
    """

    def __init__(self, rgb: np.ndarray, detector: LandmarkDetector | None = None, size: int = PREVIEW_SIZE,
                 seed: int | None = None, points: np.ndarray | None = None):
        rgb = np.ascontiguousarray(rgb)
        if points is None:
            points = (detector if detector is not None else shared_detector()).detect(rgb).points
        self.size = int(size)
        self.motion = IdleMotion(seed)
        self._renderer = prepared_crop_renderer(rgb, points, self.size)

    def render(self, t_seconds: float) -> np.ndarray:
        return self._renderer.render(self.motion.pose(t_seconds))
