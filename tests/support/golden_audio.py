"""Golden checks of the audio / 3DMM side: mel features, ExpNet, PoseVAE, audio->coefficients, ReconNet, alignment.

Each check reads its inputs (and options such as pose_style / num_frames) from the case, runs our code on the
networks loaded from the synthetic official-layout files, and compares with the official outputs stored in the case.
``CASES`` maps a case kind to its check; ``tests/test_golden.py`` dispatches to it.
"""
from __future__ import annotations

import numpy as np
import torch

from support.golden import MEL_ABS_TOL, GoldenCase
from sadtalker import align, mel
from sadtalker.checkpoints import SadTalkerNetworks
from sadtalker.coefficients import CoefficientInputs, face_coefficients, predict_coefficients


def _windows(case: GoldenCase) -> torch.Tensor:
    """indiv_mels as the networks take them: (1, T, 1, 80, 16)."""
    windows = np.asarray(case["indiv_mels"], dtype=np.float32)
    return torch.from_numpy(windows.reshape(1, -1, 1, windows.shape[-2], windows.shape[-1]))


def check_mel(case: GoldenCase, nets: SadTalkerNetworks) -> None:
    features = mel.audio_features(case["wav"])
    case.check_close("num_frames", np.asarray(features.num_frames, dtype=case["num_frames"].dtype))
    case.check_close("mel", features.mel, abs_tol=MEL_ABS_TOL)
    case.check_close("indiv_mels", features.windows, abs_tol=MEL_ABS_TOL)
    if "mel_basis" in case:
        case.check_close("mel_basis", mel.mel_filterbank())


def check_audio2exp(case: GoldenCase, nets: SadTalkerNetworks) -> None:
    with torch.inference_mode():
        exp = nets.audio2exp(_windows(case), torch.from_numpy(case["ref"]), torch.from_numpy(case["ratio_gt"]))
    case.check_close("exp_coeff_pred", exp)


def check_audio2pose(case: GoldenCase, nets: SadTalkerNetworks) -> None:
    ref = torch.from_numpy(case["ref"])  # (1, T, 70)
    num_frames = int(case.option("num_frames", ref.shape[1]))
    with torch.inference_mode():
        motion = nets.audio2pose(_windows(case), ref[:, 0, 64:70], int(case.option("pose_style", 0)),
                                 torch.from_numpy(case["z"]), num_frames)
    case.check_close("pose_motion_pred", motion)
    if "pose_pred" in case:
        case.check_close("pose_pred", ref[:, :1, 64:70] + motion)


def check_audio2coeff_generate(case: GoldenCase, nets: SadTalkerNetworks) -> None:
    windows = _windows(case)[0, :, 0].numpy()  # (T, 80, 16)
    inputs = CoefficientInputs(windows=windows, ref=np.asarray(case["ref"][0], dtype=np.float32),
                               blink_ratio=np.asarray(case["ratio_gt"][0], dtype=np.float32))
    result = predict_coefficients(nets.audio2exp, nets.audio2pose, inputs, int(case.option("pose_style", 0)),
                                  noise=case["z"])
    case.check_close("coeff_3dmm", result.coeffs)


def check_recon(case: GoldenCase, nets: SadTalkerNetworks) -> None:
    with torch.inference_mode():
        coeffs = nets.face_recon(torch.from_numpy(case["image"]))
    case.check_close("coeffs", coeffs)


def check_preprocess_3dmm(case: GoldenCase, nets: SadTalkerNetworks) -> None:
    if "lm3d_std" in case:  # a constant of the official code: ours must be the same numbers
        case.check_close("lm3d_std", align.LM3D_STD, abs_tol=1e-7)
    aligned = align.align_face(case["image_rgb"], case["lm68"])
    case.check_close("trans_params", aligned.trans_params)
    case.check_close("aligned_rgb", aligned.image)
    if "lm_aligned" in case:
        case.check_close("lm_aligned", aligned.landmarks)
    # The whole per-image path (alignment + reconstruction + 73-value assembly), as the pipeline runs it.
    faces = face_coefficients(nets.face_recon, [case["image_rgb"]], [case["lm68"]])
    case.check_close("full_coeff", faces.full_3dmm)
    case.check_close("coeff_3dmm", faces.coeff_3dmm)


CASES = {
    "mel_2s": check_mel,
    "mel_odd_length": check_mel,
    "audio2exp": check_audio2exp,
    "audio2pose": check_audio2pose,
    "audio2pose_short": check_audio2pose,
    "audio2coeff_generate": check_audio2coeff_generate,
    "recon": check_recon,
    "preprocess_3dmm": check_preprocess_3dmm,
}
