"""MappingNet: 3DMM coefficients of a 27-frame window -> head motion of the face renderer's keypoints.

SadTalker's bridge from the audio-driven 3DMM motion (expression 64, pose angles 3, translation 3, and for the
``full`` preprocess the 3 crop parameters) to face-vid2vid's keypoint space: head-pose logits over 66 bins of 3
degrees, a translation and per-keypoint expression offsets.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class HeadMotion(NamedTuple):
    """Head pose and expression of the renderer's keypoints for a batch of frames."""

    yaw: torch.Tensor  # (B, 66) logits over bins of 3 degrees starting at -99 degrees
    pitch: torch.Tensor  # (B, 66)
    roll: torch.Tensor  # (B, 66)
    t: torch.Tensor  # (B, 3) translation; only t_y is used by the keypoint transformation
    exp: torch.Tensor  # (B, 3 * num_kp) expression offset of every keypoint


class MappingNet(nn.Module):
    """Conv1d(k7) over the window, 3 dilated residual Conv1d layers, time average, linear heads.

    coeff_nc = 70 (``mapping_00229``, crop/extcrop/resize) or 73 (``mapping_00109``, full/extfull).
    """

    def __init__(self, coeff_nc: int = 70, descriptor_nc: int = 1024, layer: int = 3, num_kp: int = 15,
                 num_bins: int = 66):
        super().__init__()
        self.layer = layer
        self.first = nn.Sequential(nn.Conv1d(coeff_nc, descriptor_nc, kernel_size=7))
        for i in range(layer):
            setattr(self, f"encoder{i}", nn.Sequential(
                nn.LeakyReLU(0.1), nn.Conv1d(descriptor_nc, descriptor_nc, kernel_size=3, dilation=3)))
        self.fc_roll = nn.Linear(descriptor_nc, num_bins)
        self.fc_pitch = nn.Linear(descriptor_nc, num_bins)
        self.fc_yaw = nn.Linear(descriptor_nc, num_bins)
        self.fc_t = nn.Linear(descriptor_nc, 3)
        self.fc_exp = nn.Linear(descriptor_nc, 3 * num_kp)

    def forward(self, coeff_window: torch.Tensor) -> HeadMotion:
        """(B, C, 27) windows centred on B frames -> their motion."""
        descriptor = self._encode(coeff_window).mean(dim=2)  # (B, 1024, 3) -> (B, 1024)
        return self._heads(descriptor)

    def sequence(self, coeffs: torch.Tensor) -> HeadMotion:
        """(C, L) consecutive frames -> the motion of the L - 26 frames that have 13 frames of context each side.

        Equal to ``forward`` on each frame's window (every layer is a convolution over time, so a window's
        output is a slice of the sequence's output) up to float rounding, at a 20th of the work per frame.
        """
        encoded = self._encode(coeffs[None])  # (1, 1024, L - 24)
        descriptor = nn.functional.avg_pool1d(encoded, kernel_size=3, stride=1)[0].T  # (L - 26, 1024)
        return self._heads(descriptor)

    def _encode(self, coeffs: torch.Tensor) -> torch.Tensor:
        out = self.first(coeffs)  # (B, C, T) -> (B, 1024, T - 6)
        for i in range(self.layer):
            # each dilated conv shortens time by 6 (a window: 21 -> 15 -> 9 -> 3); the residual is the centre crop
            out = getattr(self, f"encoder{i}")(out) + out[:, :, 3:-3]
        return out

    def _heads(self, descriptor: torch.Tensor) -> HeadMotion:
        return HeadMotion(yaw=self.fc_yaw(descriptor), pitch=self.fc_pitch(descriptor), roll=self.fc_roll(descriptor),
                          t=self.fc_t(descriptor), exp=self.fc_exp(descriptor))
