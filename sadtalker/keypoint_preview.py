"""Motion-true fast preview: the source crop warped by the renderer's own keypoint motion, without the generator.

The SadTalker renderer moves 15 implicit 3-D keypoints from their source positions to each frame's driving
positions and lets a dense-motion network + SPADE decoder paint the result (seconds per frame on a CPU). The preview
uses the *same* source and driving keypoints but replaces the networks by a closed-form warp (about a millisecond):

* a robust least-squares similarity (rotation, scale, shift) between the driving and source keypoints (x, y)
  carries the head motion; keypoints that moved on their own (expression) are down-weighted in that fit;
* the residual of each keypoint (expression: mouth, eyes) is spread by normalised Gaussian weights;
* both fade out away from the keypoints, so the background stays still.

The field is a backward map (for each output pixel, where to sample the source), evaluated on a coarse grid,
upsampled, and applied with one bilinear remap. Keypoints are in the renderer's normalised [-1, 1] image
coordinates (x to the right, y down).
"""
from __future__ import annotations

import cv2
import numpy as np

from core.engine import PREVIEW_SIZE

_GRID = 32  # the warp field is smooth: evaluate it on 32x32 points and upsample
_HEAD_SIGMA = 0.35  # reach of the head region around the keypoints (normalised units; the face spans ~1.2)
_HEAD_FLOOR = 0.05  # background weight per keypoint: where keypoint weights fall below it, pixels stay still
_LOCAL_SIGMA = 0.15  # reach of each keypoint's own (expression) residual


class KeypointPreview:
    """Thread-safe ``render(i)`` of preview frames for a clip whose keypoint motion is known.

    source_rgb: (H, W, 3) uint8 renderer source crop; kp_source: (K, 3); kp_driving: (n, K, 3), in [-1, 1], the
    motion of the first n of ``num_frames`` frames (default: all). A preview can start from the motion of the
    first seconds; ``update`` then gives it the rest, and until then later frames hold the last known pose.

    Without ``kp_driving`` (a live face, whose motion is made as it goes) the source is prepared once and
    ``render_keypoints`` paints any driving keypoints.
    """

    def __init__(self, source_rgb: np.ndarray, kp_source: np.ndarray, kp_driving: np.ndarray | None = None,
                 size: int = PREVIEW_SIZE, num_frames: int | None = None):
        kp_source = np.asarray(kp_source, np.float64)
        self.size = size
        shrink = source_rgb.shape[0] > size
        self._source = cv2.resize(np.ascontiguousarray(source_rgb), (size, size),
                                  interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        self._kp_source = kp_source[:, :2]  # (K, 2) x, y
        if kp_driving is None:
            self.num_frames = int(num_frames or 0)
            self._kp_driving = np.zeros((0, *self._kp_source.shape))
        else:
            self.num_frames = int(len(kp_driving) if num_frames is None else num_frames)
            self._kp_driving = self._checked(kp_driving, kp_source.shape)  # (n, K, 2)
        axis = np.linspace(-1.0, 1.0, _GRID)
        grid_x, grid_y = np.meshgrid(axis, axis)  # (G, G) each, row = y
        self._points = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)  # (G*G, 2) as (x, y)
        self._pixel_x, self._pixel_y = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32))

    def _checked(self, kp_driving: np.ndarray, kp_shape: tuple[int, ...]) -> np.ndarray:
        kp_driving = np.asarray(kp_driving, np.float64)
        if kp_driving.ndim != 3 or kp_driving.shape[1:] != kp_shape or not 1 <= len(kp_driving) <= self.num_frames:
            raise ValueError(f"kp_driving must be (n, {kp_shape[0]}, 3) with 1 <= n <= {self.num_frames}, "
                             f"got {kp_driving.shape}")
        return kp_driving[:, :, :2]

    @property
    def motion(self) -> np.ndarray:
        """(known_frames, K, 2) driving keypoints (x, y) the preview is rendered from."""
        return self._kp_driving

    @property
    def known_frames(self) -> int:
        """How many frames' motion the preview has (``num_frames`` once complete)."""
        return len(self._kp_driving)

    def update(self, kp_driving: np.ndarray) -> None:
        """Replace the motion by that of more (or all) frames, e.g. once the whole clip's motion is known."""
        self._kp_driving = self._checked(kp_driving, (self._kp_driving.shape[1], 3))  # one reference swap

    def render(self, index: int) -> np.ndarray:
        """(size, size, 3) uint8 preview of frame ``index`` (clamped to the clip and to the known motion)."""
        driving = self._kp_driving
        if not len(driving):
            raise ValueError("this preview has no motion: give kp_driving, or use render_keypoints")
        index = min(max(int(index), 0), len(driving) - 1)
        return self.render_keypoints(driving[index])

    def render_keypoints(self, kp_driving: np.ndarray) -> np.ndarray:
        """(size, size, 3) uint8 frame for one set of driving keypoints (K, 3) or (K, 2) in [-1, 1]."""
        kp_driving = np.asarray(kp_driving, np.float64)
        if kp_driving.shape[0] != len(self._kp_source) or kp_driving.ndim != 2 or kp_driving.shape[1] not in (2, 3):
            raise ValueError(f"kp_driving must be ({len(self._kp_source)}, 3), got {kp_driving.shape}")
        field = self.sample_field(kp_driving[:, :2])  # (G*G, 2) normalised source positions
        # Upsample the displacement (smooth, ~0 at the borders), not the positions, so no motion = exact identity.
        shift = ((field - self._points) * 0.5 * (self.size - 1)).astype(np.float32).reshape(_GRID, _GRID, 2)
        shift = cv2.resize(shift, (self.size, self.size), interpolation=cv2.INTER_LINEAR)  # (S, S, 2) pixels
        map_x = self._pixel_x + shift[..., 0]
        map_y = self._pixel_y + shift[..., 1]
        return cv2.remap(self._source, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    def sample_field(self, kp_driving: np.ndarray) -> np.ndarray:
        """For each coarse grid point (x, y) of the output, the source position to sample: (G*G, 2)."""
        points, kp_src = self._points, self._kp_source
        affine = _fit_similarity(kp_driving, kp_src)  # (2, 3): driving -> source
        residual = kp_src - _apply_affine(affine, kp_driving)  # (K, 2): what the head motion misses (expression)

        dist2 = ((points[:, None, :] - kp_driving[None, :, :]) ** 2).sum(-1)  # (G*G, K)
        head = np.exp(-dist2 / (2 * _HEAD_SIGMA ** 2)).sum(1, keepdims=True)
        head_weight = head / (head + _HEAD_FLOOR * len(kp_driving))  # (G*G, 1): ~0 far away .. ~1 on the face
        local = np.exp(-dist2 / (2 * _LOCAL_SIGMA ** 2))
        local /= local.sum(1, keepdims=True) + 1e-6  # (G*G, K) interpolation weights of the residuals
        moved = _apply_affine(affine, points) + local @ residual  # (G*G, 2)
        return points + head_weight * (moved - points)


def _fit_similarity(src: np.ndarray, dst: np.ndarray, iterations: int = 3) -> np.ndarray:
    """2x3 similarity A (rotation, uniform scale, shift) with A @ [src, 1] ~ dst for (K, 2) point sets.

    Iteratively reweighted: points far off the fit (a mouth that opened) get less weight, so the head motion is
    not bent by the expression.
    """
    weights = np.ones(len(src))
    affine = np.hstack([np.eye(2), np.zeros((2, 1))])
    for _ in range(iterations):
        w = weights / weights.sum()
        mean_src, mean_dst = w @ src, w @ dst
        a, b = src - mean_src, dst - mean_dst
        covariance = (b * w[:, None]).T @ a  # (2, 2)
        u, sigma, vt = np.linalg.svd(covariance)
        flip = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
        rotation = u @ flip @ vt
        variance = (w * (a ** 2).sum(1)).sum()
        scale = (sigma * np.diag(flip)).sum() / variance if variance > 1e-12 else 1.0
        affine = np.hstack([scale * rotation, (mean_dst - scale * rotation @ mean_src)[:, None]])
        residual = np.linalg.norm(dst - _apply_affine(affine, src), axis=1)
        cutoff = max(np.median(residual) * 2.0, 1e-3)
        weights = 1.0 / np.maximum(residual / cutoff, 1.0)  # Huber-like: full weight up to the cutoff
    return affine


def _apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ affine[:, :2].T + affine[:, 2]
