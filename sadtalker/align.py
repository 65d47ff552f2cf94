"""3DMM input alignment (Deep3DFaceRecon's ``align_img`` as SadTalker's ``CropAndExtract`` uses it).

Five points (eye centres, nose tip, mouth corners) taken from 68 landmarks are fitted by least squares to the
5 standard 3-D landmarks of the Basel face model (a scaled orthographic projection, 8 unknowns). The image is then
resized by ``102 / scale`` with PIL bicubic and a 224x224 crop is taken around the fitted face centre, so the face
sits where the reconstruction net expects it. ``trans_params = [W, H, s, tx, ty]``; its last three values are
appended to the 70 coefficients of a frame (the 73-value layout used by the ``full`` modes).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

TARGET_SIZE = 224
RESCALE_FACTOR = 102.0

# The 5 standard 3-D landmarks (x, y, z): left eye, right eye, nose tip, mouth left, mouth right, derived by the same
# 5-point rule from the official ``src/config/similarity_Lm3D_all.mat`` (key ``lm``).
LM3D_STD = np.array([
    [-0.3114865720272064, 0.29036077857017517, 0.13377952575683594],
    [0.30979886651039124, 0.289720356464386, 0.1317952573299408],
    [0.003253498813137412, -0.04617932438850403, 0.5524424314498901],
    [-0.25216928124427795, -0.3813391625881195, 0.22405731678009033],
    [0.24846619367599487, -0.38128235936164856, 0.22235769033432007],
], dtype=np.float32)
LM3D_STD.setflags(write=False)


@dataclass(frozen=True)
class AlignedFace:
    trans_params: np.ndarray  # (5,) float32: [W, H, s, tx, ty] of the original frame
    image: np.ndarray  # (224, 224, 3) uint8 RGB, the reconstruction net's input (÷255)
    landmarks: np.ndarray  # (68, 2) float32 landmarks in the aligned crop (y up, as the 3DMM convention)


def five_points(lm68: np.ndarray) -> np.ndarray:
    """(5, 2) float32: [centre of eye 36/39, centre of eye 42/45, nose 30, mouth 48, mouth 54]."""
    lm = np.asarray(lm68, dtype=np.float32)
    return np.stack([lm[[36, 39]].mean(0), lm[[42, 45]].mean(0), lm[30], lm[48], lm[54]])


def fit_scale_translation(points_2d: np.ndarray, points_3d: np.ndarray = LM3D_STD) -> tuple[float, float, float]:
    """Least-squares scaled orthographic fit: returns (scale, tx, ty) with u = R1·X + tx, v = R2·X + ty."""
    n = points_3d.shape[0]
    A = np.zeros((2 * n, 8))
    A[0::2, 0:3] = points_3d
    A[0::2, 3] = 1.0
    A[1::2, 4:7] = points_3d
    A[1::2, 7] = 1.0
    b = np.asarray(points_2d, dtype=np.float32).reshape(2 * n).astype(np.float64)  # u0, v0, u1, v1, ...
    k = np.linalg.lstsq(A, b, rcond=None)[0]
    scale = (np.linalg.norm(k[0:3]) + np.linalg.norm(k[4:7])) / 2.0
    return float(scale), float(k[3]), float(k[7])


def standard_landmarks(width: int, height: int) -> np.ndarray:
    """(5, 2) stand-in points when no landmarks were found: the standard face spread over the frame (official rule)."""
    xy = (LM3D_STD[:, :2].astype(np.float64) + 1.0) / 2.0
    return np.concatenate([xy[:, :1] * width, xy[:, 1:2] * height], axis=1)


def align_face(image_rgb: np.ndarray, lm68: np.ndarray | None) -> AlignedFace:
    """Align a frame for the reconstruction net.

    ``image_rgb`` (H, W, 3) uint8; ``lm68`` (68, 2) landmarks in pixels with y pointing DOWN (as detectors give
    them), or None when detection failed (then the standard 5 points are used, as the official code does).
    """
    image = Image.fromarray(np.ascontiguousarray(image_rgb))
    w0, h0 = image.size
    if lm68 is None:
        lm = standard_landmarks(w0, h0)
        points = lm
    else:
        lm = np.array(lm68, dtype=np.float32).reshape(-1, 2)
        lm[:, 1] = h0 - 1 - lm[:, 1]  # to the 3DMM convention: y up
        points = five_points(lm)
    scale, tx, ty = fit_scale_translation(points)
    s = RESCALE_FACTOR / scale

    w, h = int(w0 * s), int(h0 * s)
    left = int(w / 2 - TARGET_SIZE / 2 + (tx - w0 / 2) * s)  # int(): truncation toward zero, as numpy astype
    up = int(h / 2 - TARGET_SIZE / 2 + (h0 / 2 - ty) * s)
    resized = image.resize((w, h), resample=Image.BICUBIC)
    crop = resized.crop((left, up, left + TARGET_SIZE, up + TARGET_SIZE))  # outside the image: black

    lm = lm.astype(np.float64)
    aligned_lm = np.stack([lm[:, 0] - tx + w0 / 2, lm[:, 1] - ty + h0 / 2], axis=1) * s
    aligned_lm = aligned_lm - np.array([w / 2 - TARGET_SIZE / 2, h / 2 - TARGET_SIZE / 2])
    trans_params = np.array([w0, h0, s, tx, ty], dtype=np.float32)
    return AlignedFace(trans_params=trans_params, image=np.asarray(crop, dtype=np.uint8),
                       landmarks=aligned_lm.astype(np.float32))


def recon_input(aligned: AlignedFace) -> np.ndarray:
    """(1, 3, 224, 224) float32 in [0, 1] for ReconNet."""
    return (aligned.image.astype(np.float64) / 255.0).astype(np.float32).transpose(2, 0, 1)[None]


def coeff_3dmm(full_coeff: np.ndarray, trans_params: np.ndarray) -> np.ndarray:
    """(B, 73) per-image coefficients: expression 64 | angles 3 | translation 3 | crop (s, tx, ty) 3."""
    full = np.asarray(full_coeff, dtype=np.float32).reshape(-1, 257)
    crop = np.broadcast_to(np.asarray(trans_params, dtype=np.float32)[2:], (full.shape[0], 3))
    return np.concatenate([full[:, 80:144], full[:, 224:227], full[:, 254:257], crop], axis=1)
