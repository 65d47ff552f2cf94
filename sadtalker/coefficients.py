"""Audio -> per-frame 3DMM motion coefficients (SadTalker's ``get_data`` + ``Audio2Coeff.generate``).

For a clip of T video frames the result is a (T, 70) float32 array: expression 64 (ExpNet) | angles 3 + translation 3
(PoseVAE, smoothed over time with a Savitzky-Golay filter). Inputs, as the official code builds them:

* ``windows`` (T, 80, 16): the mel window of each frame (``sadtalker.mel``), all zeros in idle mode;
* ``ref`` (T, 70): the source face's first 70 coefficients on every row; with a ``ref_eyeblink`` video its 64
  expression coefficients replace the source's (tiled / cut to T) and no blinks are added;
* ``blink_ratio`` (T, 1): a random eye-blink schedule (``use_blink``), else zeros.

Randomness (blink schedule, PoseVAE's latent ``z``) comes only from explicit seeds or explicit arrays, so a run can
be repeated exactly (``Options.seed``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from scipy.signal import savgol_filter

from .align import align_face, coeff_3dmm, recon_input
from core.errors import InputError
from .mel import AudioFeatures
from .models.audio2pose import LATENT_DIM, NUM_POSE_STYLES, num_noise_draws

NUM_MOTION_COEFFS = 70  # expression 64 | angles 3 | translation 3
POSE_SLICE = slice(64, 70)
SMOOTHING_WINDOW = 13
SMOOTHING_ORDER = 2
BLINK_SHAPE = (0.5, 0.9, 1.0, 0.9, 0.5)  # eye-closure ratio over the 5 frames of one blink


@dataclass(frozen=True)
class FaceCoefficients:
    """3DMM coefficients of images (the official first-frame / reference-video .mat contents)."""

    coeff_3dmm: np.ndarray  # (N, 73) float32: exp 64 | angles 3 | trans 3 | crop (s, tx, ty) 3
    full_3dmm: np.ndarray  # (N, 257) float32: the reconstruction net's whole output
    trans_params: np.ndarray  # (N, 5) float32: [W, H, s, tx, ty] of each alignment


@dataclass(frozen=True)
class CoefficientInputs:
    """What ExpNet and PoseVAE read (the official ``batch``), for one clip."""

    windows: np.ndarray  # (T, 80, 16) float32
    ref: np.ndarray  # (T, 70) float32
    blink_ratio: np.ndarray  # (T, 1) float32

    @property
    def num_frames(self) -> int:
        return int(self.windows.shape[0])

    def head(self, frames: int) -> "CoefficientInputs":
        """The first ``frames`` frames (ExpNet is frame-wise and PoseVAE works on 32-frame chunks after frame 0,
        so with ``frames`` = 1 + 32k and the first draws of the noise, they predict what the whole clip has there,
        apart from the pose smoothing at the cut)."""
        return CoefficientInputs(self.windows[:frames], self.ref[:frames], self.blink_ratio[:frames])


@dataclass(frozen=True)
class MotionCoefficients:
    coeffs: np.ndarray  # (T, 70) float32: what the renderer is driven by
    inputs: CoefficientInputs
    pose_noise: np.ndarray  # (draws, 1, 64) float32: the latent samples used (to repeat the run exactly)


def face_coefficients(face_recon: torch.nn.Module, frames_rgb, landmarks, batch_size: int = 8) -> FaceCoefficients:
    """Align every frame (``landmarks[i]``: (68, 2) pixels, y down, or None) and run the reconstruction net.

    As ``CropAndExtract.generate`` after landmark detection, for the source image (one frame) or a reference video.
    """
    frames = list(frames_rgb)
    marks = list(landmarks)
    if len(frames) != len(marks) or not frames:
        raise ValueError(f"need one landmark set per frame (got {len(frames)} frames, {len(marks)} landmark sets)")
    param = next(face_recon.parameters())
    full, trans = [], []
    for start in range(0, len(frames), batch_size):
        aligned = [align_face(f, m) for f, m in zip(frames[start:start + batch_size], marks[start:start + batch_size])]
        batch = torch.from_numpy(np.concatenate([recon_input(a) for a in aligned])).to(param.device, param.dtype)
        with torch.inference_mode():
            full.append(face_recon(batch).float().cpu().numpy())  # (n, 257)
        trans.extend(a.trans_params for a in aligned)
    full_3dmm = np.concatenate(full).astype(np.float32)
    trans_params = np.stack(trans).astype(np.float32)
    rows = [coeff_3dmm(full_3dmm[i:i + 1], trans_params[i]) for i in range(len(frames))]
    return FaceCoefficients(coeff_3dmm=np.concatenate(rows), full_3dmm=full_3dmm, trans_params=trans_params)


def blink_ratio_sequence(num_frames: int, rng: random.Random) -> np.ndarray:
    """(T, 1) float32 random eye blinks, the schedule of the official ``generate_blink_seq_randomly``.

    No blinks for T <= 20; otherwise blinks of 5 frames separated by gaps drawn from
    ``range(min(10, T), min(int(T / 2), 70))`` until one would run past the last frame. (For T = 21 that range is
    empty and the official code raises; here the clip just gets no blinks.)
    """
    ratio = np.zeros((num_frames, 1), dtype=np.float32)
    if num_frames <= 20:
        return ratio
    gaps = range(min(10, num_frames), min(int(num_frames / 2), 70))
    if len(gaps) == 0:
        return ratio
    frame = 0
    while frame < num_frames:
        start = frame + rng.choice(gaps)
        if start + len(BLINK_SHAPE) > num_frames - 1:
            break
        ratio[start:start + len(BLINK_SHAPE), 0] = BLINK_SHAPE
        frame = start + len(BLINK_SHAPE)
    return ratio


def tile_frames(rows: np.ndarray, num_frames: int) -> np.ndarray:
    """Repeat a (N, C) sequence from its start until it has ``num_frames`` rows (or cut it): row i = rows[i % N]."""
    rows = np.asarray(rows)
    if rows.shape[0] == 0:
        raise InputError("The reference video gave no frames with a face; choose another video.")
    return rows[np.arange(num_frames) % rows.shape[0]]


def reference_coefficients(source_coeff: np.ndarray, num_frames: int,
                           ref_eyeblink_coeffs: np.ndarray | None = None) -> np.ndarray:
    """(T, 70) float32: the source's first 70 coefficients per frame; expression from ``ref_eyeblink`` if given."""
    source = np.asarray(source_coeff, dtype=np.float32).reshape(-1)
    if source.size < NUM_MOTION_COEFFS:
        raise ValueError(f"source coefficients need at least 70 values (exp 64, angles 3, trans 3), got {source.size}")
    ref = np.repeat(source[None, :NUM_MOTION_COEFFS], num_frames, axis=0)
    if ref_eyeblink_coeffs is not None:
        ref[:, :64] = tile_frames(np.asarray(ref_eyeblink_coeffs, dtype=np.float32)[:, :64], num_frames)
    return ref


def build_inputs(features: AudioFeatures, source_coeff: np.ndarray, *, use_blink: bool = True,
                 rng: random.Random | None = None, ref_eyeblink_coeffs: np.ndarray | None = None) -> CoefficientInputs:
    """The official ``get_data`` batch from audio features and the source image's coefficients (row 0 of its .mat)."""
    T = features.num_frames
    ref = reference_coefficients(source_coeff, T, ref_eyeblink_coeffs)
    if use_blink and ref_eyeblink_coeffs is None:
        ratio = blink_ratio_sequence(T, rng if rng is not None else random.Random())
    else:
        ratio = np.zeros((T, 1), dtype=np.float32)
    return CoefficientInputs(windows=np.asarray(features.windows, dtype=np.float32), ref=ref, blink_ratio=ratio)


def smooth_pose(pose: np.ndarray) -> np.ndarray:
    """Savitzky-Golay (order 2) over time of a (T, 6) pose: window 13, or the largest odd window <= T when T < 13.

    Clips of 1-2 frames are returned unchanged (the official filter would raise there).
    """
    pose = np.asarray(pose, dtype=np.float32)
    T = pose.shape[0]
    window = SMOOTHING_WINDOW if T >= SMOOTHING_WINDOW else int((T - 1) / 2) * 2 + 1
    if window <= SMOOTHING_ORDER:
        return pose.copy()
    return savgol_filter(pose, window, SMOOTHING_ORDER, axis=0).astype(np.float32)


def apply_ref_pose(coeffs: np.ndarray, ref_pose_coeffs: np.ndarray) -> np.ndarray:
    """Add a reference video's head motion (relative to its first frame) to the pose columns 64:70."""
    coeffs = np.array(coeffs, dtype=np.float32)
    ref_pose = tile_frames(np.asarray(ref_pose_coeffs, dtype=np.float32)[:, POSE_SLICE], coeffs.shape[0])
    coeffs[:, POSE_SLICE] += ref_pose - ref_pose[:1]
    return coeffs


def draw_pose_noise(num_frames: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(draws, 1, 64) standard-normal latent samples for PoseVAE, one ``randn(1, 64)`` per decoder call."""
    draws = num_noise_draws(num_frames)
    if draws == 0:
        return torch.zeros(0, 1, LATENT_DIM)
    return torch.stack([torch.randn(1, LATENT_DIM, generator=generator) for _ in range(draws)])


def _check_pose_style(pose_style: int) -> int:
    if isinstance(pose_style, bool) or int(pose_style) != pose_style or not 0 <= int(pose_style) < NUM_POSE_STYLES:
        raise InputError(f"pose style must be a whole number from 0 to {NUM_POSE_STYLES - 1} (got {pose_style!r}).")
    return int(pose_style)


def predict_coefficients(audio2exp: torch.nn.Module, audio2pose: torch.nn.Module, inputs: CoefficientInputs,
                         pose_style: int, *, noise: np.ndarray | torch.Tensor | None = None,
                         generator: torch.Generator | None = None,
                         ref_pose_coeffs: np.ndarray | None = None) -> MotionCoefficients:
    """(T, 70) coefficients as ``Audio2Coeff.generate`` writes them to its .mat (``coeff_3dmm``).

    ``noise`` (draws, 1, 64) is PoseVAE's latent input; when None it is drawn from ``generator``.
    """
    style = _check_pose_style(pose_style)
    T = inputs.num_frames
    if noise is None:
        noise = draw_pose_noise(T, generator)
    noise = torch.as_tensor(np.asarray(noise, dtype=np.float32))
    param = next(audio2exp.parameters())
    device, dtype = param.device, param.dtype
    windows = torch.from_numpy(inputs.windows).to(device, dtype)[None, :, None]  # (1, T, 1, 80, 16)
    ref = torch.from_numpy(inputs.ref).to(device, dtype)[None]  # (1, T, 70)
    ratio = torch.from_numpy(inputs.blink_ratio).to(device, dtype)[None]  # (1, T, 1)
    with torch.inference_mode():
        exp = audio2exp(windows, ref, ratio)  # (1, T, 64)
        motion = audio2pose(windows, ref[:, 0, POSE_SLICE], style, noise.to(device, dtype), T)  # (1, T, 6)
        pose = ref[:, :1, POSE_SLICE] + motion  # (1, T, 6)
    exp_np = exp[0].float().cpu().numpy()
    pose_np = smooth_pose(pose[0].float().cpu().numpy())
    coeffs = np.concatenate([exp_np, pose_np], axis=1).astype(np.float32)  # (T, 70)
    if ref_pose_coeffs is not None:
        coeffs = apply_ref_pose(coeffs, ref_pose_coeffs)
    return MotionCoefficients(coeffs=coeffs, inputs=inputs, pose_noise=noise.numpy())


def audio_to_coefficients(audio2exp: torch.nn.Module, audio2pose: torch.nn.Module, features: AudioFeatures,
                          source_coeff: np.ndarray, *, pose_style: int = 0, use_blink: bool = True,
                          seed: int | None = None, ref_eyeblink_coeffs: np.ndarray | None = None,
                          ref_pose_coeffs: np.ndarray | None = None) -> MotionCoefficients:
    """The whole audio-to-coefficients step with the official options; ``seed`` fixes blinks and pose noise."""
    inputs, noise = draw_motion_inputs(features, source_coeff, use_blink=use_blink, seed=seed,
                                       ref_eyeblink_coeffs=ref_eyeblink_coeffs)
    return predict_coefficients(audio2exp, audio2pose, inputs, pose_style, noise=noise,
                                ref_pose_coeffs=ref_pose_coeffs)


def draw_motion_inputs(features: AudioFeatures, source_coeff: np.ndarray, *, use_blink: bool = True,
                       seed: int | None = None,
                       ref_eyeblink_coeffs: np.ndarray | None = None) -> tuple[CoefficientInputs, torch.Tensor]:
    """ExpNet/PoseVAE inputs of a clip and PoseVAE's noise, with the random parts (blinks, noise) drawn once."""
    rng = random.Random(seed)
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else rng.getrandbits(63))
    inputs = build_inputs(features, source_coeff, use_blink=use_blink, rng=rng,
                          ref_eyeblink_coeffs=ref_eyeblink_coeffs)
    return inputs, draw_pose_noise(inputs.num_frames, generator)
