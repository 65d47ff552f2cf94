"""Keypoint transformation of SadTalker's face renderer (pure torch functions).

The canonical keypoints of the source face (from the keypoint detector) are posed for a frame by the head motion
that MappingNet predicts from the 3DMM coefficients: rotate by yaw/pitch/roll, translate (only t_y is used),
then add the per-keypoint expression offsets. Facts from the official ``make_animation.py``: degrees are the
softmax expectation over 66 bins of 3 degrees starting at -99, and degrees become radians with 3.14 (not pi).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .models.mapping import HeadMotion

NUM_BINS = 66
DEGREES_PER_BIN = 3.0
FIRST_BIN_DEGREES = -99.0
PI_AS_USED = 3.14  # the reference converts degrees with 3.14; using math.pi would change every rotation slightly


def degrees_from_bins(logits: torch.Tensor) -> torch.Tensor:
    """(B, 66) head-pose logits -> (B,) degrees: softmax expectation of the bin index * 3 - 99."""
    bins = torch.arange(logits.shape[1], dtype=logits.dtype, device=logits.device)
    return (F.softmax(logits, dim=1) * bins).sum(dim=1) * DEGREES_PER_BIN + FIRST_BIN_DEGREES


def rotation_matrix(yaw: torch.Tensor, pitch: torch.Tensor, roll: torch.Tensor) -> torch.Tensor:
    """(B,) degrees each -> (B, 3, 3) rotation ``P(pitch) @ Y(yaw) @ R(roll)`` (about x, y, z respectively)."""
    yaw, pitch, roll = (a / 180 * PI_AS_USED for a in (yaw, pitch, roll))
    one, zero = torch.ones_like(yaw), torch.zeros_like(yaw)

    def matrix(*rows):  # 9 tensors of shape (B,) -> (B, 3, 3)
        return torch.stack(rows, dim=1).view(-1, 3, 3)

    cp, sp = torch.cos(pitch), torch.sin(pitch)
    cy, sy = torch.cos(yaw), torch.sin(yaw)
    cr, sr = torch.cos(roll), torch.sin(roll)
    pitch_mat = matrix(one, zero, zero, zero, cp, -sp, zero, sp, cp)
    yaw_mat = matrix(cy, zero, sy, zero, one, zero, -sy, zero, cy)
    roll_mat = matrix(cr, -sr, zero, sr, cr, zero, zero, zero, one)
    return pitch_mat @ yaw_mat @ roll_mat


def head_pose_degrees(motion: HeadMotion, yaw: torch.Tensor | None = None, pitch: torch.Tensor | None = None,
                      roll: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(yaw, pitch, roll) in degrees, (B,) each: from the logits, or the given overrides (degrees) where not None."""
    return (degrees_from_bins(motion.yaw) if yaw is None else yaw.to(motion.yaw.dtype),
            degrees_from_bins(motion.pitch) if pitch is None else pitch.to(motion.pitch.dtype),
            degrees_from_bins(motion.roll) if roll is None else roll.to(motion.roll.dtype))


def transform_keypoints(kp_canonical: torch.Tensor, motion: HeadMotion, yaw: torch.Tensor | None = None,
                        pitch: torch.Tensor | None = None, roll: torch.Tensor | None = None) -> torch.Tensor:
    """Pose canonical keypoints (B, K, 3) by ``motion``; yaw/pitch/roll (B,) degrees replace the predicted angles.

    ``kp = R @ kp_canonical + (0, t_y, 0) + exp``. Inputs are not modified.
    """
    return pose_keypoints(kp_canonical, *head_pose_degrees(motion, yaw, pitch, roll), motion.t, motion.exp)


def pose_keypoints(kp_canonical: torch.Tensor, yaw: torch.Tensor, pitch: torch.Tensor, roll: torch.Tensor,
                   t: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
    """The transformation from head pose in degrees (B,) each, translation (B, 3) and expression offsets (B, 3K):
    ``kp = R @ kp_canonical + (0, t_y, 0) + exp`` (B, K, 3). Inputs are not modified."""
    rot = rotation_matrix(yaw, pitch, roll)  # (B, 3, 3)
    kp = kp_canonical @ rot.transpose(1, 2)  # (B, K, 3): each keypoint rotated
    only_ty = torch.tensor([0.0, 1.0, 0.0], dtype=t.dtype, device=t.device)
    kp = kp + (t * only_ty).unsqueeze(1)  # t_x and t_z are dropped (zeroed) as in the reference
    return kp + exp.view(exp.shape[0], -1, 3)
