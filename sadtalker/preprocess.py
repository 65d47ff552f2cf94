"""Portrait cropping for the renderer and pasting rendered frames back: the official preprocess modes.

SadTalker renders a square face crop. How the crop is cut from the portrait, what size the output video has and how
``full`` / ``extfull`` put the rendered face back into the photo follow the official code
(``Preprocesser.align_face`` / ``crop``, ``CropAndExtract.generate``, ``AnimateFromCoeff.generate``, ``paste_pic``):

* ``crop``: an FFHQ-style oriented square around eyes and mouth (the ``quad`` box), axis-aligned.
* ``extcrop``: the same square plus a 10 % border (the ``crop`` box); the output keeps the aspect of ``quad``.
* ``resize``: the whole photo squeezed to a square.
* ``full`` / ``extfull``: as ``crop`` / ``extcrop``, then every frame is put back into the photo with Poisson
  (seamless) cloning.

Official quirks kept on purpose: the bottom edge of ``quad`` is clamped with the image *width*; for ``extcrop`` the
output aspect comes from the inner ``quad`` box; the crop is cut from a copy shrunk by an integer factor when the face
is huge (``qsize`` >= 2048 px). One official bug is not kept: after that shrink the official pastes with shrunk
coordinates into the full-size photo; :attr:`CropResult.paste_box` is in full-size pixels.

Pasting back solves the same discrete Poisson problem as ``cv2.seamlessClone(NORMAL_CLONE)`` with a full-white mask,
with everything that depends only on the photo and the box computed once per clip (:class:`PasteBack`); it matches
OpenCV to within one grey level (OpenCV solves in float32 and truncates).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import scipy.fft

from core.errors import InputError, NoFaceError

Mode = Literal["crop", "extcrop", "resize", "full", "extfull"]
MODES: tuple[str, ...] = ("crop", "extcrop", "resize", "full", "extfull")

ALIGN_SIZE = 512  # the official ``xsize`` given to align_face: faces with qsize >= 4 * 512 are shrunk first
CLONE_MASK_EROSION = 3  # seamlessClone erodes its mask 3 times with a 3x3 kernel: a 3 px band keeps the photo's gradients


@dataclass(frozen=True)
class CropInfo:
    """The official ``crop_info`` triple, in the (possibly shrunk) image the crop was cut from."""

    size: tuple[int, int]  # (w, h) of the ``quad`` box (official ``crop_info[0]``); sets the output aspect
    crop: tuple[int, int, int, int] | None  # (clx, cly, crx, cry): quad bounds plus border, clamped; None for resize
    quad: tuple[float, float, float, float] | None  # (lx, ly, rx, ry) inside ``crop`` (floats, as official)

    def as_official(self) -> tuple:
        return (self.size, self.crop, None if self.quad is None else list(self.quad))


@dataclass(frozen=True)
class CropResult:
    """A portrait cropped for the renderer, and everything needed to map frames and points back."""

    image: np.ndarray  # (size, size, 3) uint8 RGB: the renderer's source image
    mode: str
    size: int  # renderer resolution (256 / 512)
    info: CropInfo
    image_shape: tuple[int, int]  # (H, W) of the original portrait
    resized_shape: tuple[int, int]  # (H, W) of the copy the crop was cut from (== image_shape unless shrunk)
    source_box: tuple[int, int, int, int]  # (x0, y0, x1, y1) really cut from the resized copy (before the square resize)
    paste_box: tuple[int, int, int, int] | None  # (x0, y0, x1, y1) in original pixels where full/extfull paste
    output_size: tuple[int, int]  # (w, h) of the official output frames of crop/extcrop/resize

    @property
    def pastes_back(self) -> bool:
        return self.mode in ("full", "extfull")

    def frame_size(self) -> tuple[int, int]:
        """(w, h) of the frames :func:`paste_back` returns: the photo for full modes, else ``output_size``."""
        if self.pastes_back:
            return (self.image_shape[1], self.image_shape[0])
        return self.output_size

    def _resized_scale(self) -> tuple[float, float]:
        return (self.resized_shape[1] / self.image_shape[1], self.resized_shape[0] / self.image_shape[0])

    def to_crop_coords(self, points: np.ndarray) -> np.ndarray:
        """Map (N, 2) x/y pixel points of the original portrait into :attr:`image` (pixel-centre convention)."""
        sx, sy = self._resized_scale()
        x0, y0, x1, y1 = self.source_box
        return _map_points(points, (sx, sy), (x0, y0), (self.size / (x1 - x0), self.size / (y1 - y0)))

    def to_frame_coords(self, points: np.ndarray) -> np.ndarray:
        """Map (N, 2) original-portrait points into the frames :func:`paste_back` returns (for the enhancer)."""
        points = np.asarray(points, dtype=np.float64)
        if self.pastes_back:
            return points.copy()
        sx, sy = self._resized_scale()
        x0, y0, x1, y1 = self.source_box
        out_w, out_h = self.output_size
        return _map_points(points, (sx, sy), (x0, y0), (out_w / (x1 - x0), out_h / (y1 - y0)))


def _map_points(points, scale1, origin, scale2) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    # pixel centres: a resize by s maps x to (x + 0.5) * s - 0.5
    x = ((points[:, 0] + 0.5) * scale1[0] - 0.5 - origin[0] + 0.5) * scale2[0] - 0.5
    y = ((points[:, 1] + 0.5) * scale1[1] - 0.5 - origin[1] + 0.5) * scale2[1] - 0.5
    return np.stack([x, y], axis=1)


@dataclass(frozen=True)
class _Alignment:
    rsize: tuple[int, int]  # (W, H) of the image the crop is cut from
    crop: tuple[int, int, int, int]
    quad: tuple[float, float, float, float]


def _align_face(lm: np.ndarray, width: int, height: int, output_size: int = ALIGN_SIZE) -> _Alignment:
    """The official FFHQ-style crop geometry (``Preprocesser.align_face``) from 68 landmarks."""
    eye_left = np.mean(lm[36:42], axis=0)
    eye_right = np.mean(lm[42:48], axis=0)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) * 0.5
    eye_to_mouth = mouth_avg - eye_avg

    # Oriented square: x points along the eyes (tilted by the eye-mouth axis), y is x turned by 90 degrees.
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    norm = np.hypot(*x)
    scale = max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    if not (np.isfinite(norm) and norm > 0 and np.isfinite(scale) and scale > 0):
        raise NoFaceError("The face landmarks are degenerate (eyes and mouth coincide); "
                          "use a clear frontal photo of one face.")
    x = x / norm * scale
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    qsize = np.hypot(*x) * 2

    shrink = int(np.floor(qsize / output_size * 0.5))
    if shrink > 1:
        rsize = (int(np.rint(float(width) / shrink)), int(np.rint(float(height) / shrink)))
        quad = quad / shrink
        qsize = qsize / shrink
    else:
        rsize = (int(np.rint(float(width))), int(np.rint(float(height))))

    border = max(int(np.rint(qsize * 0.1)), 3)
    crop = (int(np.floor(min(quad[:, 0]))), int(np.floor(min(quad[:, 1]))),
            int(np.ceil(max(quad[:, 0]))), int(np.ceil(max(quad[:, 1]))))
    crop = (max(crop[0] - border, 0), max(crop[1] - border, 0),
            min(crop[2] + border, rsize[0]), min(crop[3] + border, rsize[1]))
    quad = quad - np.array(crop[0:2])  # official: only when the crop is smaller than the image; same numbers

    q = (quad + 0.5).flatten()
    lx = max(min(q[0], q[2]), 0)
    ly = max(min(q[1], q[7]), 0)
    rx = min(max(q[4], q[6]), rsize[0])
    ry = min(max(q[3], q[5]), rsize[0])  # official quirk: clamped with the width, not the height
    return _Alignment(rsize=rsize, crop=crop, quad=(float(lx), float(ly), float(rx), float(ry)))


def _check_inputs(rgb: np.ndarray, lm68, mode: str, size: int) -> np.ndarray:
    if mode not in MODES:
        raise InputError(f"preprocess must be one of {', '.join(MODES)} (got {mode!r}).")
    if not isinstance(size, (int, np.integer)) or size < 8:
        raise InputError(f"crop size must be a whole number of pixels >= 8 (got {size!r}).")
    if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
            and rgb.shape[0] >= 1 and rgb.shape[1] >= 1):
        raise InputError(f"Expected an RGB uint8 image of shape (H, W, 3), got "
                         f"{getattr(rgb, 'shape', None)} {getattr(rgb, 'dtype', type(rgb).__name__)}.")
    if mode == "resize":
        return None
    lm = np.asarray(lm68)
    if lm.shape != (68, 2) or not np.all(np.isfinite(lm)):
        raise NoFaceError("Need 68 finite face landmarks (x, y) to crop the portrait; "
                          f"got an array of shape {lm.shape}.")
    if lm.dtype.kind != "f":
        lm = lm.astype(np.float64)
    return lm


def crop_portrait(rgb: np.ndarray, lm68: np.ndarray | None, mode: str = "crop", size: int = 256) -> CropResult:
    """Cut the renderer's source image from an RGB portrait as the official preprocess mode does.

    ``lm68``: (68, 2) x/y pixel landmarks of the face in ``rgb`` (ignored by ``resize``). The crop is resized to
    ``size`` x ``size`` with ``cv2.resize`` (bilinear), as the official code does.
    """
    lm = _check_inputs(rgb, lm68, mode, size)
    height, width = rgb.shape[:2]
    if mode == "resize":
        image = cv2.resize(rgb, (size, size))
        info = CropInfo(size=(width, height), crop=None, quad=None)
        return CropResult(image=image, mode=mode, size=size, info=info, image_shape=(height, width),
                          resized_shape=(height, width), source_box=(0, 0, width, height), paste_box=None,
                          output_size=_output_size(size, info.size))

    align = _align_face(lm, width, height)
    rw, rh = align.rsize
    resized = rgb if (rw, rh) == (width, height) else cv2.resize(rgb, (rw, rh))
    clx, cly, crx, cry = align.crop
    lx, ly, rx, ry = (int(v) for v in align.quad)
    extended = mode.startswith("ext")
    # numpy slicing clamps the ends, exactly as the official slices do ([cly:cry, clx:crx] then [ly:ry, lx:rx])
    x0, y0, x1, y1 = clx, cly, min(crx, rw), min(cry, rh)
    if not extended:
        x0, y0, x1, y1 = clx + lx, cly + ly, min(clx + rx, x1), min(cly + ry, y1)
    if x1 - x0 < 1 or y1 - y0 < 1 or rx - lx < 1 or ry - ly < 1:
        raise NoFaceError("The face is outside the picture or too small to crop; "
                          "use a photo where the whole face is visible.")
    image = cv2.resize(np.ascontiguousarray(resized[y0:y1, x0:x1]), (size, size))
    info = CropInfo(size=(rx - lx, ry - ly), crop=align.crop, quad=align.quad)

    paste_box = None
    if mode in ("full", "extfull"):
        # official paste_pic: extfull pastes over the crop box, full over the quad box
        box = (clx, cly, crx, cry) if extended else (clx + lx, cly + ly, clx + rx, cly + ry)
        if (rw, rh) != (width, height):
            # The official pastes these shrunk coordinates into the full-size photo (misplacing the face);
            # we scale them back to the photo.
            sx, sy = width / rw, height / rh
            box = (int(round(box[0] * sx)), int(round(box[1] * sy)), int(round(box[2] * sx)), int(round(box[3] * sy)))
        paste_box = box
    return CropResult(image=image, mode=mode, size=size, info=info, image_shape=(height, width),
                      resized_shape=(rh, rw), source_box=(x0, y0, x1, y1), paste_box=paste_box,
                      output_size=_output_size(size, info.size))


def _output_size(size: int, crop_size: tuple[int, int]) -> tuple[int, int]:
    """Official output frame size: width ``size``, height keeping the crop's aspect (``AnimateFromCoeff.generate``)."""
    w, h = crop_size
    return (size, max(1, int(size * h / w)))


class PasteBack:
    """Turns rendered (size x size) frames into the official output frames of one crop; reuse it for every frame.

    ``crop``/``extcrop``/``resize``: the frame resized to ``crop.output_size``. ``full``/``extfull``: that frame
    resized to the paste box and Poisson-cloned into the photo (``cv2.seamlessClone`` NORMAL_CLONE semantics).
    ``method="opencv"`` calls ``cv2.seamlessClone`` itself (slower; the reference for the fast solver).
    """

    def __init__(self, original_rgb: np.ndarray | None, crop: CropResult, method: Literal["fast", "opencv"] = "fast"):
        if method not in ("fast", "opencv"):
            raise ValueError(f"method must be 'fast' or 'opencv', got {method!r}")
        self.crop = crop
        self.method = method
        self._clone: _PoissonClone | None = None
        if not crop.pastes_back:
            return
        if original_rgb is None or original_rgb.shape[:2] != crop.image_shape or original_rgb.dtype != np.uint8:
            raise InputError("paste back needs the original RGB uint8 portrait the crop was made from "
                             f"(shape {crop.image_shape + (3,)}).")
        self.original = np.ascontiguousarray(original_rgb)
        x0, y0, x1, y1 = crop.paste_box
        self.box_size = (x1 - x0, y1 - y0)  # (w, h) the frame is resized to
        self._plan = _clone_plan(crop.paste_box, crop.image_shape)
        if method == "fast" and self._plan is not None:
            self._clone = _PoissonClone(self.original, self._plan)

    def __call__(self, frame_rgb: np.ndarray) -> np.ndarray:
        if frame_rgb.dtype != np.uint8 or frame_rgb.ndim != 3 or frame_rgb.shape[2] != 3:
            raise ValueError(f"expected an RGB uint8 frame, got {frame_rgb.shape} {frame_rgb.dtype}")
        out_w, out_h = self.crop.output_size
        frame = frame_rgb if frame_rgb.shape[:2] == (out_h, out_w) else cv2.resize(frame_rgb, (out_w, out_h))
        if not self.crop.pastes_back:
            return np.ascontiguousarray(frame)
        patch = cv2.resize(frame, self.box_size)
        result = self.original.copy()
        plan = self._plan
        if plan is None:  # box too thin for a Poisson solve: nothing of the patch survives seamlessClone
            return result
        (dx, dy, w, h), (sx, sy) = plan.dest, plan.src
        source = patch[sy:sy + h, sx:sx + w]
        if self._clone is not None:
            result[dy:dy + h, dx:dx + w] = self._clone(source)
        else:
            destination = self.original[dy:dy + h, dx:dx + w]
            mask = np.full((h + 2, w + 2), 255, np.uint8)
            padded = cv2.copyMakeBorder(source, 1, 1, 1, 1, cv2.BORDER_REPLICATE)
            framed = cv2.copyMakeBorder(destination, 1, 1, 1, 1, cv2.BORDER_REPLICATE)
            cloned = cv2.seamlessClone(padded, framed, mask, ((w + 2) // 2, (h + 2) // 2), cv2.NORMAL_CLONE)
            result[dy:dy + h, dx:dx + w] = cloned[1:-1, 1:-1]
        return result


def paste_back(original_rgb: np.ndarray | None, frame_rgb: np.ndarray, crop: CropResult) -> np.ndarray:
    """One-off :class:`PasteBack` (per clip, build a ``PasteBack`` once and call it per frame)."""
    return PasteBack(original_rgb, crop)(frame_rgb)


@dataclass(frozen=True)
class _ClonePlan:
    dest: tuple[int, int, int, int]  # (x, y, w, h) in the photo that seamlessClone rewrites (its roi_d)
    src: tuple[int, int]  # (x, y) of the matching region inside the box-sized patch


def _clone_plan(box: tuple[int, int, int, int], image_shape: tuple[int, int]) -> _ClonePlan | None:
    """Where the official ``seamlessClone(p, photo, white mask, location)`` writes, as OpenCV computes it.

    OpenCV zeroes the mask's 1 px frame, so the patch minus its outer ring is placed with its centre at
    ``location``; the official ``location`` is the box centre moved inside the photo. Where OpenCV would fail
    (the box is taller or wider than the photo, possible through the clamped-with-width quirk) the region is clipped.
    """
    height, width = image_shape
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    location = (min((x0 + x1) // 2, width - w // 2), min((y0 + y1) // 2, height - h // 2))
    rw, rh = w - 2, h - 2  # roi_s = the patch minus its 1 px ring
    dx, dy = location[0] - rw // 2, location[1] - rh // 2
    sx, sy = 1, 1
    # clip to the photo (OpenCV would raise here; the official pipeline crashes)
    if dx < 0:
        sx, rw, dx = sx - dx, rw + dx, 0
    if dy < 0:
        sy, rh, dy = sy - dy, rh + dy, 0
    rw, rh = min(rw, width - dx), min(rh, height - dy)
    if rw < 3 or rh < 3:
        return None
    return _ClonePlan(dest=(dx, dy, rw, rh), src=(sx, sy))


class _PoissonClone:
    """NORMAL_CLONE with a full-white mask on a fixed destination region, as a linear solve split in two parts.

    The cloned region keeps its 1 px ring (the Dirichlet boundary). Inside, the guidance field is the patch's
    gradient except in a 3 px band along the edge (OpenCV erodes the mask there), where it is the photo's gradient.
    The solution is linear: the photo's share (its band gradients and the boundary) is solved once here, and each
    frame only adds the patch's share: one forward and one inverse DST-I, the diagonal solve in between.
    """

    def __init__(self, photo: np.ndarray, plan: _ClonePlan):
        dx, dy, w, h = plan.dest
        destination = photo[dy:dy + h, dx:dx + w].astype(np.float32).transpose(2, 0, 1)  # (3, h, w)
        self.destination_u8 = np.ascontiguousarray(photo[dy:dy + h, dx:dx + w])
        self.band = np.zeros((h, w), np.float32)  # 1 where the patch's gradients count
        e = CLONE_MASK_EROSION
        self.band[e:h - e, e:w - e] = 1.0
        # eigenvalues of the 5-point Laplacian with Dirichlet boundary, as OpenCV's filter_X/filter_Y
        fx = 2.0 * np.cos(np.pi * np.arange(1, w - 1) / (w - 1))
        fy = 2.0 * np.cos(np.pi * np.arange(1, h - 1) / (h - 1))
        self.denominator = (fx[None, :] + fy[:, None] - 4.0).astype(np.float32)
        ring = destination.copy()
        ring[:, 1:-1, 1:-1] = 0.0
        ring_laplacian = (ring[:, :-2, 1:-1] + ring[:, 2:, 1:-1] + ring[:, 1:-1, :-2] + ring[:, 1:-1, 2:]
                          - 4.0 * ring[:, 1:-1, 1:-1])
        rhs = _guided_laplacian(destination, 1.0 - self.band) - ring_laplacian
        self.constant_spectrum = scipy.fft.dstn(rhs, type=1, axes=(1, 2)) / self.denominator

    def __call__(self, source_u8: np.ndarray) -> np.ndarray:
        source = source_u8.astype(np.float32).transpose(2, 0, 1)
        spectrum = scipy.fft.dstn(_guided_laplacian(source, self.band), type=1, axes=(1, 2))
        spectrum /= self.denominator
        spectrum += self.constant_spectrum
        solution = scipy.fft.idstn(spectrum, type=1, axes=(1, 2))
        out = self.destination_u8.copy()
        # OpenCV truncates toward zero, then clips
        out[1:-1, 1:-1] = np.clip(np.trunc(solution), 0, 255).astype(np.uint8).transpose(1, 2, 0)
        return out


def _guided_laplacian(image: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Interior divergence of ``weight * forward-difference gradient`` of a (C, h, w) image, as OpenCV's cloning.

    Forward differences use reflect-101 at the far edge (``filter2D`` with [0, -1, 1]); the divergence is a
    backward difference. Only interior points (1..h-2, 1..w-2) are returned: (C, h-2, w-2).
    """
    gx = np.empty_like(image)
    gx[:, :, :-1] = image[:, :, 1:] - image[:, :, :-1]
    gx[:, :, -1] = image[:, :, -2] - image[:, :, -1]
    gy = np.empty_like(image)
    gy[:, :-1, :] = image[:, 1:, :] - image[:, :-1, :]
    gy[:, -1, :] = image[:, -2, :] - image[:, -1, :]
    gx *= weight
    gy *= weight
    return ((gx[:, 1:-1, 1:-1] - gx[:, 1:-1, :-2]) + (gy[:, 1:-1, 1:-1] - gy[:, :-2, 1:-1]))
