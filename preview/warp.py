"""Landmark-driven warping: renders a portrait in a given pose (jaw, lips, eyelids, brows, head rotation).

How a frame is made (all fields are *backward* maps: for each output pixel, where to read the source):

* The head region of the image is covered by a coarse grid (about 10 nodes per eye-to-mouth distance). On it,
  every pose parameter has a precomputed *basis* displacement field: head yaw/pitch from a 2.5-D depth model
  (nose and face in front of the neck axis, so the features shift more than the outline), roll about the neck,
  lip stretch and brow raise as thin-plate splines through the 68 landmarks with anchors that keep the rest still.
  A pose is a weighted sum of those bases, inverted by fixed-point iteration and upsampled bilinearly to pixels:
  one smooth field, so no triangle seams, and it fades to zero before the edge of the head region and of the image,
  so nothing tears there.
* The jaw is a second layer: lower lip, chin and jaw line move down together. A pixel uses the jaw layer when
  that layer maps it below the lips' midline in the source; a pixel that neither layer maps onto its own side of
  the midline is inside the opened mouth and gets a dark interior shaded from the lip colour.
* Eyelids: in each eye, columns of the upper lid are stretched down over the eye (a 1-D map per column in the
  face's frame), which is how a real lid covers the eyeball during a blink.

Everything is in units of the face (eye-to-mouth distance), so the same pose looks the same on the 2048 px photo
and on the 128 px preview crop.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import cv2
import numpy as np

from core.engine import PREVIEW_SIZE
from core.remembered import Remembered

from .crop import EYE_A, EYE_B, cut_crop, face_crop_box
from .tps import tps

# Landmark indices (iBUG 68-point convention).
JAW = np.arange(0, 17)
BROWS = np.arange(17, 27)
NOSE = np.arange(27, 36)
MOUTH_OUTER = np.arange(48, 60)
MOUTH_INNER = np.arange(60, 68)


@dataclass(frozen=True)
class Pose:
    """What the renderer can move. Zero everywhere = the photo as it is."""

    jaw: float = 0.0  # lower lip + chin drop, in face units (eye-to-mouth distance); speech peaks ~0.3
    lip_shape: float = 0.0  # +1 stretched wide ("ee"), -1 rounded ("oo")
    blink: float = 0.0  # 0 open .. 1 closed
    brow: float = 0.0  # brow raise, face units (~0.05 is visible)
    pitch: float = 0.0  # degrees, + nods down
    yaw: float = 0.0  # degrees, + turns towards the image's right
    roll: float = 0.0  # degrees, + tilts clockwise in the image
    shift_x: float = 0.0  # head translation, face units
    shift_y: float = 0.0


REST = Pose()


# ---------------------------------------------------------------------------------------------------------------
# The warper
# ---------------------------------------------------------------------------------------------------------------

class FaceWarper:
    """Renders ``rgb`` in any Pose. Built once per image (a few ms); ``render`` is thread-safe.

    ``view`` (x0, y0, x1, y1): the part of the image that is shown, when only a part is (a crop cut from a larger
    image that gives the warp real context at its edges). Motion is computed on the whole region of interest as
    without a view; the per-pixel work is done only where it can be seen, and ``render`` returns the view.
    """

    GRID_PER_FACE = 9.0  # coarse-grid nodes per face unit
    DEPTH_AXIS = 1.0  # face units from the neck's rotation axis to the face plane (parallax of yaw/pitch)

    def __init__(self, rgb: np.ndarray, points: np.ndarray, view: tuple[int, int, int, int] | None = None):
        self.image = np.ascontiguousarray(rgb)
        # OpenCV's remap has a vector path for 4-channel pixels that a 3-channel one lacks: the padded copy warps
        # 2.3x faster, the padding costs nothing per frame but its removal (~0.1 ms at 512 x 512).
        padded = self.image.ndim == 3 and self.image.shape[2] == 3 and self.image.dtype == np.uint8
        self._source = cv2.cvtColor(self.image, cv2.COLOR_RGB2RGBA) if padded else self.image
        self.height, self.width = rgb.shape[:2]
        pts = np.asarray(points, dtype=np.float64).reshape(68, 2)
        self.points = pts

        # Face frame: origin between the eyes, u along the eye line, v down the face; unit = eye-to-mouth.
        eye_a, eye_b = pts[EYE_A].mean(0), pts[EYE_B].mean(0)
        self.origin = (eye_a + eye_b) / 2
        axis = eye_b - eye_a
        angle = math.atan2(axis[1], axis[0])
        self.ex = np.array([math.cos(angle), math.sin(angle)])
        self.ey = np.array([-math.sin(angle), math.cos(angle)])
        mouth_centre = (pts[48] + pts[54]) / 2
        self.unit = max(float(np.dot(mouth_centre - self.origin, self.ey)), 4.0)  # pixels per face unit
        local = self._to_local(pts)  # (68, 2) pixels in the face frame
        self.local = local

        self._expression_lock = threading.Lock()
        self._expression_bases = None
        self._seam = None
        self._build_roi(local)
        self._build_grid()
        self._build_window(view)
        self._build_bases(local)
        self._build_mouth(local)
        self._build_eyes(local)

    # --- coordinate frames -------------------------------------------------------------------------------------

    def _to_local(self, xy: np.ndarray) -> np.ndarray:
        d = xy - self.origin
        return np.stack([d @ self.ex, d @ self.ey], axis=-1)

    def _to_image(self, uv: np.ndarray) -> np.ndarray:
        return self.origin + uv[..., :1] * self.ex + uv[..., 1:2] * self.ey

    # --- set-up ------------------------------------------------------------------------------------------------

    def _build_roi(self, local: np.ndarray) -> None:
        """Head ellipse (face + hair) in the face frame, and the image rectangle its fade-out covers."""
        s = self.unit
        jaw_u = local[JAW, 0]
        chin_v = local[8, 1]
        self.head_centre_u = float(jaw_u.mean())
        self.head_rx = 0.62 * float(jaw_u.max() - jaw_u.min()) + 0.15 * s
        top_v = min(float(local[BROWS, 1].min()), -0.2 * s) - 1.25 * s
        bottom_v = max(chin_v, 1.0 * s) + 0.05 * s  # (the max/min only matter for implausible landmarks)
        self.head_centre_v = (top_v + bottom_v) / 2
        self.head_ry = (bottom_v - top_v) / 2
        # the fade-out reaches r = FADE_END; the region of interest is that ellipse's bounding box
        self.fade_start, self.fade_end = 1.0, 1.45
        angles = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        ring = np.stack([self.head_centre_u + self.fade_end * self.head_rx * np.cos(angles),
                         self.head_centre_v + self.fade_end * self.head_ry * np.sin(angles)], axis=-1)
        ring_xy = self._to_image(ring)
        x0 = max(0, int(math.floor(ring_xy[:, 0].min())) - 2)
        y0 = max(0, int(math.floor(ring_xy[:, 1].min())) - 2)
        x1 = min(self.width, int(math.ceil(ring_xy[:, 0].max())) + 3)
        y1 = min(self.height, int(math.ceil(ring_xy[:, 1].max())) + 3)
        self.roi = (x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))

    def _build_grid(self) -> None:
        x0, y0, x1, y1 = self.roi
        roi_w, roi_h = x1 - x0, y1 - y0
        # about GRID_PER_FACE nodes per face unit, but never closer than 2.5 px (small crops)
        per_face = min(self.GRID_PER_FACE, self.unit / 2.5)
        self.grid_w = max(4, int(math.ceil(roi_w / self.unit * per_face)))
        self.grid_h = max(4, int(math.ceil(roi_h / self.unit * per_face)))
        self.grid_w, self.grid_h = min(self.grid_w, roi_w), min(self.grid_h, roi_h)
        self.grid_w, self.grid_h = max(self.grid_w, 2), max(self.grid_h, 2)
        # Node k sits where cv2.resize puts the k-th source sample, so upsampling is exact (no half-cell shift).
        self.step_x = roi_w / self.grid_w
        self.step_y = roi_h / self.grid_h
        gx = x0 + (np.arange(self.grid_w) + 0.5) * self.step_x - 0.5
        gy = y0 + (np.arange(self.grid_h) + 0.5) * self.step_y - 0.5
        self.node_xy = np.stack(np.meshgrid(gx, gy), axis=-1)  # (Gh, Gw, 2) image pixels
        self.node_uv = self._to_local(self.node_xy)  # (Gh, Gw, 2) face-frame pixels
        # pixel coordinates of the region of interest (the frame of the seam map)
        self.roi_x = np.arange(x0, x1, dtype=np.float32)[None, :]
        self.roi_y = np.arange(y0, y1, dtype=np.float32)[:, None]

    def _build_window(self, view: tuple[int, int, int, int] | None) -> None:
        """The window: the part of the region of interest that is shown, where the remap tables are built."""
        x0, y0, x1, y1 = self.roi
        self.view = (0, 0, self.width, self.height) if view is None else tuple(int(v) for v in view)
        vx0, vy0, vx1, vy1 = self.view
        if not (0 <= vx0 < vx1 <= self.width and 0 <= vy0 < vy1 <= self.height):
            raise ValueError(f"view {self.view} is not a rectangle inside the {self.width}x{self.height} image")
        wx0, wy0 = min(max(x0, vx0), x1 - 1), min(max(y0, vy0), y1 - 1)  # kept inside the region, never empty
        wx1, wy1 = max(min(x1, vx1), wx0 + 1), max(min(y1, vy1), wy0 + 1)
        self.window = (wx0, wy0, wx1, wy1)
        self._window_in_roi = (slice(wy0 - y0, wy1 - y0), slice(wx0 - x0, wx1 - x0))
        # (H, W, 2) image coordinates (x, y) of the window's pixels: remap tables are built on these, as one
        # two-channel table (one pass over memory instead of two)
        self.window_xy = np.stack(np.meshgrid(np.arange(wx0, wx1, dtype=np.float32),
                                              np.arange(wy0, wy1, dtype=np.float32)), axis=-1)

    def _head_mask(self, uv: np.ndarray) -> np.ndarray:
        du = (uv[..., 0] - self.head_centre_u) / self.head_rx
        dv = (uv[..., 1] - self.head_centre_v) / self.head_ry
        r = np.sqrt(du * du + dv * dv)
        return 1.0 - _smoothstep(self.fade_start, self.fade_end, r)

    def _border_mask(self, xy: np.ndarray) -> np.ndarray:
        """1 inside the image, fading to 0 at its edges (a displacement there would smear edge pixels)."""
        fade = max(2.0, 0.25 * self.unit)
        x, y = xy[..., 0], xy[..., 1]
        dist = np.minimum(np.minimum(x, self.width - 1 - x), np.minimum(y, self.height - 1 - y))
        return _smoothstep(0.0, fade, dist)

    def _build_bases(self, local: np.ndarray) -> None:
        s = self.unit
        uv = self.node_uv
        mask = self._head_mask(uv) * self._border_mask(self.node_xy)
        # the outermost nodes are pinned so the upsampled field is exactly zero at the region's edge
        edge = np.ones_like(mask)
        edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = 0.0
        mask *= edge
        self.node_mask = mask

        # 2.5-D depth (face units) of each node in front of the neck's rotation axis.
        jaw_u = local[JAW, 0]
        face_rx = max(0.5 * float(jaw_u.max() - jaw_u.min()), 0.3 * s)
        face_cv = 0.5 * (float(local[BROWS, 1].min()) + float(local[8, 1]))
        face_ry = max(0.5 * (float(local[8, 1]) - float(local[BROWS, 1].min())), 0.3 * s) + 0.2 * s
        fu = (uv[..., 0] - float(jaw_u.mean())) / face_rx
        fv = (uv[..., 1] - face_cv) / face_ry
        surface = np.sqrt(np.clip(1.0 - fu * fu - fv * fv, 0.0, None))
        nose = local[30]
        nose_d2 = ((uv[..., 0] - nose[0]) ** 2 + (uv[..., 1] - nose[1]) ** 2) / (0.25 * s) ** 2
        depth = (self.DEPTH_AXIS + 0.35 * surface + 0.3 * np.exp(-0.5 * nose_d2)) * s  # pixels

        per_degree = math.pi / 180.0
        pivot = np.array([float(jaw_u.mean()), float(local[8, 1]) + 0.4 * s])
        bases_local = {
            "yaw": np.stack([depth * per_degree, np.zeros_like(depth)], -1),
            "pitch": np.stack([np.zeros_like(depth), depth * per_degree], -1),
            "roll": np.stack([-(uv[..., 1] - pivot[1]) * per_degree, (uv[..., 0] - pivot[0]) * per_degree], -1),
            "shift_x": np.stack([np.full_like(depth, s), np.zeros_like(depth)], -1),
            "shift_y": np.stack([np.zeros_like(depth), np.full_like(depth, s)], -1),
        }
        self.head_names = tuple(bases_local)
        self.head_bases = np.stack([self._to_image_vectors(bases_local[n] * mask[..., None])
                                    for n in self.head_names]).astype(np.float32)  # (K, Gh, Gw, 2)

    def prepare(self) -> None:
        """Build the lazily made parts now (mouth and brow fields), so no later frame waits for them."""
        self._expression()
        self._seam_map()

    def _expression(self) -> tuple[np.ndarray, np.ndarray]:
        """(lip_shape + brow bases (2, Gh, Gw, 2), jaw basis (Gh, Gw, 2)), built on first use.

        The idle animation never needs them, so its first frame does not wait for the spline solve.
        """
        with self._expression_lock:
            if self._expression_bases is None:
                s, uv, mask = self.unit, self.node_uv, self.node_mask
                # thin-plate splines through the landmarks (face units), anchored elsewhere
                ctrl, values = _expression_controls(self.local / s, self.head_centre_u / s, self.head_centre_v / s,
                                                    self.head_rx / s, self.head_ry / s)
                inside = mask > 0  # the spline is only needed where the head mask lets it act
                fields = np.zeros(uv.shape[:2] + (len(EXPRESSION_BASES), 2))
                fields[inside] = tps(ctrl, values, uv[inside] / s) * s
                fields *= mask[..., None, None]
                named = {name: self._to_image_vectors(fields[:, :, i]).astype(np.float32)
                         for i, name in enumerate(EXPRESSION_BASES)}
                self._expression_bases = (np.stack([named["lip_shape"], named["brow"]]), named["jaw"])
            return self._expression_bases

    def _to_image_vectors(self, field_uv: np.ndarray) -> np.ndarray:
        """Rotate face-frame displacement vectors into image vectors."""
        return field_uv[..., :1] * self.ex + field_uv[..., 1:2] * self.ey

    def _build_mouth(self, local: np.ndarray) -> None:
        """The lips' midline in the face frame: the jaw layer owns everything below it."""
        upper = local[[60, 61, 62, 63, 64]]
        lower = local[[60, 67, 66, 65, 64]]
        corners_outer = local[[48, 54]]
        u_left, u_right = corners_outer[:, 0]
        if u_left > u_right:  # mirrored landmarks cannot happen with a detector, but keep the math sane
            u_left, u_right = u_right, u_left
        # Midline: average of the inner lips, continued straight to the outer corners and beyond.
        su = np.linspace(upper[0, 0], upper[-1, 0], 33)
        mid = 0.5 * (np.interp(su, *_increasing(upper)) + np.interp(su, *_increasing(lower)))
        self.seam_u = np.concatenate([[u_left - 10 * self.unit, u_left], su, [u_right, u_right + 10 * self.unit]])
        self.seam_v = np.concatenate([[local[48, 1], local[48, 1]], mid, [local[54, 1], local[54, 1]]])
        order = np.argsort(self.seam_u)
        self.seam_u, self.seam_v = self.seam_u[order], self.seam_v[order]
        self.mouth_span = (float(u_left), float(u_right))
        self.mouth_centre_u = 0.5 * (u_left + u_right)
        # Rows at and below this image row may belong to the jaw layer (the jaw basis is ~0 above the nose tip).
        guard = local[[2, 14, 31, 32, 33, 34, 35]]
        guard_xy = self._to_image(guard)
        self.jaw_top = int(max(self.roi[1], min(self.roi[3] - 1, math.floor(guard_xy[:, 1].min()))))
        # Colours for the mouth interior, from the lips themselves (so lighting and skin tone match).
        lips = self.points[[50, 51, 52, 56, 57, 58]]
        samples = [self.image[int(np.clip(round(y), 0, self.height - 1)), int(np.clip(round(x), 0, self.width - 1))]
                   for x, y in lips]
        lip = np.median(np.array(samples, dtype=np.float32), axis=0)
        self.interior_edge = (0.5 * lip * np.array([1.0, 0.8, 0.8])).astype(np.float32)
        self.interior_deep = (0.24 * lip * np.array([1.0, 0.7, 0.7]) + np.array([8, 3, 3])).astype(np.float32)
        self.interior_tongue = (0.72 * lip * np.array([1.0, 0.72, 0.75])).astype(np.float32)
        source_gap = float(np.mean(local[[67, 66, 65], 1] - local[[61, 62, 63], 1]))
        self.synthetic_teeth = source_gap < 0.04 * self.unit  # closed lips in the photo: no real teeth to show

    def _build_eyes(self, local: np.ndarray) -> None:
        self.eyes = []
        for upper_idx, lower_idx in (([36, 37, 38, 39], [36, 41, 40, 39]), ([42, 43, 44, 45], [42, 47, 46, 45])):
            upper, lower = local[upper_idx], local[lower_idx]
            width = abs(upper[-1, 0] - upper[0, 0])
            if width < 2.0:
                continue
            uu = np.linspace(min(upper[0, 0], upper[-1, 0]), max(upper[0, 0], upper[-1, 0]), 17)
            ul = np.interp(uu, *_increasing(upper))
            ll = np.maximum(np.interp(uu, *_increasing(lower)), ul)
            opening = float((ll - ul).max())
            # the lid skin that stretches down starts this far above the lid (below the brow)
            lift = max(1.5 * opening, 0.28 * width)
            eye_xy = self._to_image(np.concatenate([upper, lower]))
            margin = 0.25 * width + 0.12 * self.unit + 2
            box = (int(max(self.roi[0], math.floor(eye_xy[:, 0].min() - margin))),
                   int(max(self.roi[1], math.floor(eye_xy[:, 1].min() - lift - margin))),
                   int(min(self.roi[2], math.ceil(eye_xy[:, 0].max() + margin))),
                   int(min(self.roi[3], math.ceil(eye_xy[:, 1].max() + margin))))
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            self.eyes.append({"u": uu, "upper": ul, "lower": ll, "lift": lift, "box": box, "lash": 0.2 * opening})

    # --- rendering ---------------------------------------------------------------------------------------------

    def forward_fields(self, pose: Pose) -> tuple[np.ndarray, np.ndarray]:
        """Forward displacement (pixels) on the coarse grid: (upper layer, jaw layer), each (Gh, Gw, 2)."""
        upper = np.zeros(self.head_bases.shape[1:], dtype=np.float32)
        for name, basis in zip(self.head_names, self.head_bases):  # a few fused adds; no BLAS on this path
            weight = float(getattr(pose, name))
            if weight:
                upper += weight * basis
        jaw = max(0.0, float(pose.jaw))
        if not (pose.lip_shape or pose.brow or jaw):
            return upper, upper
        expression, jaw_basis = self._expression()
        for weight, basis in zip((float(pose.lip_shape), float(pose.brow)), expression):
            if weight:
                upper += weight * basis
        lower = upper + jaw * jaw_basis if jaw > 0 else upper
        return upper, lower

    def _invert(self, forward: np.ndarray, iterations: int = 3) -> np.ndarray:
        """Backward field b with q + b(q) = p and p + forward(p) = q, on the coarse grid (fixed-point iteration)."""
        back = -forward
        if not np.any(forward):
            return back
        gi = np.arange(self.grid_w, dtype=np.float32)[None, :]
        gj = np.arange(self.grid_h, dtype=np.float32)[:, None]
        for _ in range(iterations):
            map_x = gi + back[..., 0] / self.step_x
            map_y = gj + back[..., 1] / self.step_y
            back = -cv2.remap(forward, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        return back

    def _upsample(self, coarse: np.ndarray, rows: slice = slice(None)) -> np.ndarray:
        """The coarse field (Gh, Gw, 2) at every pixel of the window (``rows``: of the window only)."""
        x0, y0, x1, y1 = self.roi
        return cv2.resize(coarse, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)[self._window_in_roi][rows]

    def render(self, pose: Pose) -> np.ndarray:
        """The image (its view, if one was given) in ``pose``: a new array; the source is never modified."""
        vx0, vy0, vx1, vy1 = self.view
        out = self.image[vy0:vy1, vx0:vx1].copy()
        x0, y0, x1, y1 = self.window
        out[y0 - vy0:y1 - vy0, x0 - vx0:x1 - vx0] = self.render_window(pose)
        return out

    def render_window(self, pose: Pose) -> np.ndarray:
        """The window (the shown part of the region of interest) in ``pose``."""
        wy0, wy1 = self.window[1], self.window[3]
        forward_up, forward_lo = self.forward_fields(pose)
        table = self.window_xy + self._upsample(self._invert(forward_up))  # (H, W, 2) source x, y: upper layer
        jaw = max(0.0, float(pose.jaw))
        mouth = None
        top = max(0, self.jaw_top - wy0)  # the jaw layer's first row in the window
        if jaw > 0 and top < wy1 - wy0:
            rows = slice(top, wy1 - wy0)
            lower = self.window_xy[rows] + self._upsample(self._invert(forward_lo), rows)
            # the jaw layer owns a pixel when it reads the source below the lips' midline
            d_lo = self._below_seam(lower)
            box = self._mouth_box(forward_lo, top)
            mouth = (rows.start, box, lower[box], table[rows][box].copy(), d_lo[box])
            cv2.copyTo(lower, (d_lo > 0).view(np.uint8), table[rows])  # in place; 2-3x numpy's masked copy
        if pose.blink > 0:
            for eye in self.eyes:
                self._close_eyelid(eye, float(min(pose.blink, 1.0)), table)
        warped = self._sample(table)
        if mouth is not None:
            self._paint_mouth(warped, *mouth)
        return warped

    def _below_seam(self, table: np.ndarray) -> np.ndarray:
        """How far (pixels) below the lips' midline the source pixels that ``table`` (H, W, 2) reads lie."""
        return cv2.remap(self._seam_map(), table, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    def _sample(self, table: np.ndarray) -> np.ndarray:
        """The source image read (bilinearly) at the pixel coordinates of ``table`` (H, W, 2: x, y)."""
        sampled = cv2.remap(self._source, table, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        return cv2.cvtColor(sampled, cv2.COLOR_RGBA2RGB) if sampled.ndim == 3 and sampled.shape[2] == 4 else sampled

    def _seam_map(self) -> np.ndarray:
        """(image H, W) float32: how far (pixels) each source pixel lies below the lips' midline; computed over the
        region of interest and continued beyond it by its edge values (so remap tables index it directly)."""
        with self._expression_lock:
            if self._seam is None:
                dx = self.roi_x - self.origin[0]
                dy = self.roi_y - self.origin[1]
                u = dx * self.ex[0] + dy * self.ex[1]
                v = dx * self.ey[0] + dy * self.ey[1]
                seam = (v - np.interp(u, self.seam_u, self.seam_v)).astype(np.float32)
                x0, y0, x1, y1 = self.roi
                self._seam = np.pad(seam, ((y0, self.height - y1), (x0, self.width - x1)), mode="edge")
            return self._seam

    def _mouth_box(self, forward_lo: np.ndarray, top: int) -> tuple[slice, slice]:
        """Rows/columns (relative to the window's jaw band) that can show the mouth: the lips plus how far anything
        moved."""
        reach = float(np.sqrt((forward_lo ** 2).sum(-1)).max()) + 0.05 * self.unit + 2.0
        lips = self.points[48:68]
        x0, y0, x1, y1 = self.window
        c0 = max(0, int(math.floor(lips[:, 0].min() - reach)) - x0)
        c1 = min(x1 - x0, int(math.ceil(lips[:, 0].max() + reach)) - x0 + 1)
        r0 = max(0, int(math.floor(lips[:, 1].min() - reach)) - y0 - top)
        r1 = min(y1 - y0 - top, int(math.ceil(lips[:, 1].max() + reach)) - y0 - top + 1)
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))

    def _paint_mouth(self, warped: np.ndarray, band_top: int, box: tuple[slice, slice], lo: np.ndarray,
                     up: np.ndarray, d_lo: np.ndarray) -> None:
        """Where the lips part, blend in a dark interior (anti-aliased against both lips). ``lo``, ``up``: the
        jaw and the upper layer's tables over the mouth's box."""
        if d_lo.size == 0:
            return
        d_up = -self._below_seam(up)  # > 0: the upper layer reads above the midline (upper lip side)
        u = (up[..., 0] - self.origin[0]) * self.ex[0] + (up[..., 1] - self.origin[1]) * self.ex[1]
        in_span = (u > self.mouth_span[0]) & (u < self.mouth_span[1])
        if not np.any((d_lo < 0.5) & (d_up < 0.5) & in_span):
            return
        sub = (slice(band_top + box[0].start, band_top + box[0].stop), box[1])
        # both layers exactly (the merged map chose between them by a hard switch)
        lower = self._sample(lo)
        upper = self._sample(up)
        a_lo = np.clip(d_lo + 0.5, 0.0, 1.0)
        a_up = np.where(in_span, np.clip(d_up + 0.5, 0.0, 1.0), 1.0) * (1.0 - a_lo)
        a_in = np.clip(1.0 - a_lo - a_up, 0.0, 1.0)
        blended = a_lo[..., None] * lower + a_up[..., None] * upper
        gap = a_in > 0  # shade only the pixels that show the interior
        blended[gap] += a_in[gap][:, None] * self._interior_colour(-d_up[gap], -d_lo[gap], u[gap])
        warped[sub] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)

    def _interior_colour(self, below_upper: np.ndarray, above_lower: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Shade of the open mouth: lip-tinted near the lips, dark in the middle and the corners."""
        s = self.unit
        gap = np.maximum(below_upper + above_lower, 1e-3)
        depth = np.clip(np.minimum(below_upper, above_lower) / (0.07 * s), 0.0, 1.0)[..., None]
        colour = self.interior_edge * (1.0 - depth) + self.interior_deep * depth
        # the tongue shows near the lower lip once the mouth is open enough
        tongue = (np.clip(1.0 - above_lower / (0.35 * gap + 1e-3), 0.0, 1.0)
                  * np.clip((gap - 0.08 * s) / (0.1 * s), 0.0, 1.0))[..., None]
        colour = colour * (1.0 - 0.6 * tongue) + self.interior_tongue * (0.6 * tongue)
        if self.synthetic_teeth:
            teeth_h = np.minimum(0.3 * gap, 0.09 * s)
            teeth = np.clip((teeth_h - below_upper) / 1.5, 0.0, 1.0)[..., None]
            colour = colour * (1.0 - 0.75 * teeth) + np.array([200.0, 194.0, 184.0], np.float32) * (0.75 * teeth)
        half = max(0.5 * (self.mouth_span[1] - self.mouth_span[0]), 1.0)
        lateral = np.clip(np.abs(u - self.mouth_centre_u) / half, 0.0, 1.0)[..., None]
        return colour * (1.0 - 0.55 * lateral ** 2)

    def _close_eyelid(self, eye: dict, closure: float, table: np.ndarray) -> None:
        """Stretch the upper lid down over the eye, column by column in the face frame."""
        x0, y0, x1, y1 = self.window
        bx0, by0, bx1, by1 = eye["box"]
        bx0, by0, bx1, by1 = max(bx0, x0), max(by0, y0), min(bx1, x1), min(by1, y1)
        if bx1 <= bx0 or by1 <= by0:
            return  # the eye is outside the view
        sub = (slice(by0 - y0, by1 - y0), slice(bx0 - x0, bx1 - x0))
        px, py = table[sub][..., 0], table[sub][..., 1]
        dx, dy = px - self.origin[0], py - self.origin[1]
        u = dx * self.ex[0] + dy * self.ex[1]
        v = dx * self.ey[0] + dy * self.ey[1]
        upper = np.interp(u, eye["u"], eye["upper"])
        lower = np.interp(u, eye["u"], eye["lower"])
        outside = (u < eye["u"][0]) | (u > eye["u"][-1])
        lid = upper + 0.97 * closure * (lower - upper)  # where the lid edge is drawn now
        top = upper - eye["lift"]
        # The lash line (just above the landmark, which tends to sit on the iris' top) moves down unstretched;
        # only the lid skin above it stretches, so a closed eye shows a thin dark line, not a smear.
        edge = upper - 0.1 * (lower - upper)
        lash = eye["lash"]
        skin_src, skin_dst = np.maximum(edge - lash - top, 1e-3), np.maximum(lid - lash - top, 1e-3)
        covered = (v > top) & (v < lid) & ~outside
        in_skin = v < lid - lash
        new_v = np.where(in_skin, top + (v - top) * (skin_src / skin_dst), v - (lid - edge))
        new_v = np.where(covered, new_v, v)
        shift = new_v - v
        table[sub + (0,)] = px + shift * self.ey[0]
        table[sub + (1,)] = py + shift * self.ey[1]


# ---------------------------------------------------------------------------------------------------------------
# Preview-size rendering of the face crop
# ---------------------------------------------------------------------------------------------------------------

class CropRenderer:
    """Renders the face crop (``face_crop_box``) at ``size`` px in any Pose; thread-safe.

    The warp runs on the crop plus a margin of real image context, so head motion near the crop's edge shows
    image content rather than smeared edge pixels.
    """

    MARGIN = 0.125  # of the crop size

    def __init__(self, rgb: np.ndarray, points: np.ndarray, size: int = PREVIEW_SIZE):
        self.size = int(size)
        self.box = face_crop_box(points)
        self.margin = max(2, int(round(self.MARGIN * self.size)))
        crop, affine = cut_crop(rgb, self.box, self.size, self.margin)
        pts = np.asarray(points, dtype=np.float64) @ affine[:, :2].T + affine[:, 2]
        self.warper = FaceWarper(crop, pts, view=(self.margin, self.margin, self.margin + self.size,
                                                  self.margin + self.size))

    def prepare(self) -> None:
        self.warper.prepare()

    def render(self, pose: Pose) -> np.ndarray:
        return self.warper.render(pose)


_prepared = Remembered(items=4, max_bytes=32 << 20)  # the last few faces' crop renderers, set up


def prepared_crop_renderer(rgb: np.ndarray, points: np.ndarray, size: int = PREVIEW_SIZE) -> CropRenderer:
    """A prepared CropRenderer of this face; the same face at the same size (found again from the crop's pixels)
    gets the one made before. The app makes it when a photo is uploaded (the idle animation's): a click then has
    its preview renderer at hand (~30 ms, a good part of the Lite engine's time to its first frame)."""
    points = np.asarray(points, dtype=np.float64)
    key = (rgb.shape, points.tobytes(), int(size))
    renderer = _prepared.get(key)
    if renderer is not None:
        margin = max(2, int(round(CropRenderer.MARGIN * int(size))))
        crop, _ = cut_crop(rgb, face_crop_box(points), int(size), margin)
        if np.array_equal(crop, renderer.warper.image):  # the same photo, not only the same landmarks
            return renderer
    renderer = CropRenderer(rgb, points, size)
    renderer.prepare()
    _prepared.put(key, renderer, sum(value.nbytes for value in vars(renderer.warper).values()
                                     if isinstance(value, np.ndarray)))
    return renderer


# ---------------------------------------------------------------------------------------------------------------
# Expression bases (thin-plate splines in face units)
# ---------------------------------------------------------------------------------------------------------------

EXPRESSION_BASES = ("jaw", "lip_shape", "brow")


def _expression_controls(lm: np.ndarray, head_u: float, head_v: float, head_rx: float, head_ry: float):
    """Control points (N, 2) and their unit displacements (N, len(EXPRESSION_BASES), 2), all in face units."""
    n_bases = len(EXPRESSION_BASES)
    values = np.zeros((68, n_bases, 2))
    jaw, shape, brow = 0, 1, 2
    left, right = lm[48], lm[54]
    centre_u = 0.5 * (left[0] + right[0])
    half = max(0.5 * abs(right[0] - left[0]), 1e-3)

    def profile(u):  # 1 at the mouth's centre line, 0 at the corners
        return float(np.clip(1.0 - ((u - centre_u) / half) ** 2, 0.0, 1.0))

    # Jaw: both lips at a column move together (the layer split decides which lip a pixel belongs to),
    # the chin and lower jaw line follow, the corners stay.
    for i in list(range(49, 54)) + list(range(55, 60)) + [61, 62, 63, 65, 66, 67]:
        values[i, jaw] = (0.0, profile(lm[i, 0]))
    for i, weight in {8: 1.0, 7: 0.92, 9: 0.92, 6: 0.75, 10: 0.75, 5: 0.5, 11: 0.5, 4: 0.22, 12: 0.22,
                      3: 0.05, 13: 0.05}.items():
        values[i, jaw] = (0.0, weight)
    # Lip shape: the mouth stretches sideways in proportion to the distance from its centre.
    for i in range(48, 68):
        values[i, shape] = (0.14 * (lm[i, 0] - centre_u), 0.0)
    # Brows: up; the lids and the eyes stay.
    for i in BROWS:
        values[i, brow] = (0.0, -1.0)

    anchors, anchor_values = [], []

    def anchor(u, v, jaw_v=0.0, shape_u=0.0, brow_v=0.0):
        anchors.append((u, v))
        val = np.zeros((n_bases, 2))
        val[jaw] = (0.0, jaw_v)
        val[shape] = (shape_u, 0.0)
        val[brow] = (0.0, brow_v)
        anchor_values.append(val)

    # The midline continued past each corner: the jaw does not move there; the lip stretch fades out.
    for side, corner in ((-1.0, left), (1.0, right)):
        for k, fade in ((0.25, 0.55), (0.55, 0.25), (1.0, 0.0)):
            anchor(corner[0] + side * k * half, corner[1], 0.0, side * 0.14 * half * fade)
    # Neck below the chin: still (the skin between chin and neck absorbs the jaw drop).
    chin = lm[8]
    for k in (-1.0, -0.5, 0.0, 0.5, 1.0):
        anchor(chin[0] + k * 1.0, chin[1] + 0.75)
    # Forehead follows the brows a little.
    brow_top = lm[BROWS, 1].min()
    for k in (-1.0, 0.0, 1.0):
        anchor(centre_u + k * 0.6, brow_top - 0.45, brow_v=-0.5)
    # A ring around the head: nothing moves there.
    for angle in np.linspace(0, 2 * math.pi, 14, endpoint=False):
        anchor(head_u + 1.3 * head_rx * math.cos(angle), head_v + 1.3 * head_ry * math.sin(angle))

    # Eyes and nose only need to hold still: a few of their points do that (fewer controls, faster solve).
    keep = np.r_[JAW, BROWS, [27, 30, 31, 33, 35, 36, 39, 42, 45], MOUTH_OUTER, MOUTH_INNER]
    ctrl = np.concatenate([lm[keep], np.array(anchors)])
    vals = np.concatenate([values[keep], np.array(anchor_values)])
    return ctrl, vals


def _increasing(curve: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(u, v) of a curve sorted by u, for np.interp."""
    order = np.argsort(curve[:, 0], kind="stable")
    return curve[order, 0], curve[order, 1]


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)
