"""The face crop: the square region around the face that the idle animation and the preview render.

Shared by everything that shows "the face crop", so switching from idle to preview frames keeps the framing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

EYE_A = np.arange(36, 42)  # landmark indices (iBUG 68-point convention) of the eye on the image's left
EYE_B = np.arange(42, 48)



@dataclass(frozen=True)
class CropBox:
    """A square region of the source image, in source pixels (may extend past the image)."""

    x0: float
    y0: float
    side: float


def face_crop_box(points: np.ndarray) -> CropBox:
    """The face crop: SadTalker's FFHQ-style framing (centre just below the eyes, side ~4 eye distances)."""
    points = np.asarray(points, dtype=np.float64)
    eye_a, eye_b = points[EYE_A].mean(0), points[EYE_B].mean(0)
    eye_avg = (eye_a + eye_b) / 2
    eye_to_eye = eye_b - eye_a
    eye_to_mouth = (points[48] + points[54]) / 2 - eye_avg
    half = max(2.0 * np.linalg.norm(eye_to_eye), 1.8 * np.linalg.norm(eye_to_mouth), 8.0)
    centre = eye_avg + 0.1 * eye_to_mouth
    return CropBox(float(centre[0] - half), float(centre[1] - half), float(2 * half))


def cut_crop(rgb: np.ndarray, box: CropBox, size: int, margin: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The box resized to ``size`` px plus ``margin`` px of context on every side.

    Returns (image of side size + 2*margin, affine (2, 3) mapping source pixels to that image's pixels).
    Parts outside the photo repeat its edge pixels.
    """
    scale = size / box.side
    ext = box.side * (size + 2 * margin) / size
    x0 = int(math.floor(box.x0 - margin / scale))
    y0 = int(math.floor(box.y0 - margin / scale))
    side_px = max(1, int(math.ceil(ext)))
    height, width = rgb.shape[:2]
    pad = (max(0, -y0), max(0, y0 + side_px - height), max(0, -x0), max(0, x0 + side_px - width))
    region = rgb[max(0, y0):min(height, y0 + side_px), max(0, x0):min(width, x0 + side_px)]
    if any(pad):
        region = cv2.copyMakeBorder(region, *pad, cv2.BORDER_REPLICATE)
    out_side = size + 2 * margin
    interpolation = cv2.INTER_AREA if side_px > out_side else cv2.INTER_LINEAR
    crop = cv2.resize(region, (out_side, out_side), interpolation=interpolation)
    factor = out_side / side_px
    affine = np.array([[factor, 0.0, -x0 * factor], [0.0, factor, -y0 * factor]])
    return crop, affine
