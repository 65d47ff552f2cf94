"""Canonical keypoint detector (face-vid2vid's KPDetector as SadTalker configures it).

The source image is down-sampled 4x (anti-aliased), an hourglass predicts a 3-D volume of 15 keypoint heatmaps
(16 x 64 x 64 for a 256 input), and each keypoint is the expectation of the (x, y, z) grid under its softmax
(temperature 0.1). No Jacobians (``estimate_jacobian: False``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import AntiAliasDownsample, KeypointHourglass, make_coordinate_grid
from .fast_conv import reference_computation


class KeypointDetector(nn.Module):
    def __init__(self, block_expansion: int = 32, num_kp: int = 15, image_channel: int = 3, max_features: int = 1024,
                 reshape_channel: int = 16384, reshape_depth: int = 16, num_blocks: int = 5, temperature: float = 0.1,
                 scale_factor: float = 0.25):
        super().__init__()
        self.predictor = KeypointHourglass(block_expansion, in_features=image_channel, max_features=max_features,
                                           reshape_features=reshape_channel, reshape_depth=reshape_depth,
                                           num_blocks=num_blocks)
        self.kp = nn.Conv3d(self.predictor.out_filters, num_kp, kernel_size=3, padding=1)
        self.temperature = temperature
        self.scale_factor = scale_factor
        if scale_factor != 1:
            self.down = AntiAliasDownsample(image_channel, scale_factor)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> canonical keypoints (B, num_kp, 3), (x, y, z) in [-1, 1].

        Always computed the reference way (no fast convolutions): it runs once per clip, and every frame's
        keypoints, hence the whole video, shift with last-bit changes here.
        """
        with reference_computation():
            return self._keypoints(image)

    def _keypoints(self, image: torch.Tensor) -> torch.Tensor:
        if self.scale_factor != 1:
            image = self.down(image)  # (B, 3, H/4, W/4)
        logits = self.kp(self.predictor(image))  # (B, K, D, h, w)
        b, k = logits.shape[:2]
        heatmap = F.softmax(logits.view(b, k, -1) / self.temperature, dim=2)  # (B, K, D*h*w)
        heatmap = heatmap.view(*logits.shape, 1)  # (B, K, D, h, w, 1)
        grid = make_coordinate_grid(tuple(logits.shape[2:]), logits.dtype, logits.device)  # (D, h, w, 3)
        # expectation of the grid; an elementwise product + sum (not a matmul) reproduces the reference's rounding,
        # which matters: the generator amplifies keypoint differences
        return (heatmap * grid).sum(dim=(2, 3, 4))  # (B, K, 3)
