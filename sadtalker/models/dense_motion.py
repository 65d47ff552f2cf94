"""Dense motion network: sparse keypoint motion -> dense 3-D deformation field + occlusion map.

For each of the K keypoints (plus the identity, for the background) a 3-D motion ``z -> z - kp_driving + kp_source``
is applied to a compressed copy of the source feature volume; an hourglass looks at those K+1 warped volumes together
with the difference of the driving and source keypoint Gaussians and predicts a softmax mask that blends the K+1
motions into one deformation, and an occlusion map for the generator.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Hourglass, keypoint_gaussians, make_coordinate_grid
from .fast_conv import DerivedTensors, SameConv3d, convolve, fast_paths_enabled, low_precision_layout


class DenseMotion(NamedTuple):
    deformation: torch.Tensor  # (B, D, H, W, 3) sampling grid into the source volume, (x, y, z) in [-1, 1]
    occlusion_map: torch.Tensor  # (B, 1, H, W) in (0, 1)
    mask: torch.Tensor  # (B, K+1, D, H, W) softmax weights of the identity and the K keypoint motions


class DenseMotionNetwork(nn.Module):
    def __init__(self, block_expansion: int = 32, num_blocks: int = 5, max_features: int = 1024, num_kp: int = 15,
                 feature_channel: int = 32, reshape_depth: int = 16, compress: int = 4,
                 estimate_occlusion_map: bool = True):
        super().__init__()
        self.hourglass = Hourglass(block_expansion=block_expansion, in_features=(num_kp + 1) * (compress + 1),
                                   max_features=max_features, num_blocks=num_blocks)
        self.mask = SameConv3d(self.hourglass.out_filters, num_kp + 1, kernel_size=7)
        self.compress = nn.Conv3d(feature_channel, compress, kernel_size=1)
        self.norm = nn.BatchNorm3d(compress, affine=True)
        self.occlusion = (nn.Conv2d(self.hourglass.out_filters * reshape_depth, 1, kernel_size=7, padding=3)
                          if estimate_occlusion_map else None)
        self.num_kp = num_kp
        self._derived = DerivedTensors()

    def _occlusion_logits(self, flat: torch.Tensor) -> torch.Tensor:
        """The occlusion conv (1792 -> 1 channel, 7x7). A single output channel makes the direct convolution slow;
        on the fast path it is a 1x1 convolution to one map per kernel tap (a plain matrix product) followed by
        the sum of the 49 shifted maps: the same sum, reordered."""
        conv = self.occlusion
        k = conv.kernel_size[0]
        if not fast_paths_enabled() or torch.is_grad_enabled() or conv.out_channels != 1:
            return conv(flat)
        taps_weight = self._derived.get("taps", (conv.weight,), lambda: conv.weight[0].permute(1, 2, 0)
                                        .reshape(k * k, -1, 1, 1).contiguous())  # (k*k, C, 1, 1)
        b, _, h, w = flat.shape
        taps = F.pad(convolve(flat, taps_weight, None), (k // 2,) * 4)  # (B, k*k, H + k - 1, W + k - 1)
        out = conv.bias.view(1, 1, 1, 1).expand(b, 1, h, w).clone()
        for i in range(k):
            for j in range(k):
                out += taps[:, i * k + j:i * k + j + 1, i:i + h, j:j + w]
        return out

    def compress_source(self, feature: torch.Tensor) -> torch.Tensor:
        """Source volume (B, C, D, H, W) -> compressed (B, compress, D, H, W); depends on the source only."""
        return F.relu(self.norm(self.compress(feature)))

    def forward(self, feature: torch.Tensor, kp_driving: torch.Tensor, kp_source: torch.Tensor) -> DenseMotion:
        """The reference computation: source volume (B, C, D, H, W), keypoints (B, K, 3) each."""
        return self.motion(self.compress_source(feature), kp_driving, kp_source)

    def motion(self, compressed: torch.Tensor, kp_driving: torch.Tensor, kp_source: torch.Tensor) -> DenseMotion:
        """Dense motion from an already compressed source volume (batch 1 or B) and (B, K, 3) keypoints."""
        b = kp_driving.shape[0]
        d, h, w = compressed.shape[2:]
        k1 = self.num_kp + 1
        identity = make_coordinate_grid((d, h, w), compressed.dtype, compressed.device)  # (D, H, W, 3)
        keypoint_motion = (identity.view(1, 1, d, h, w, 3) - kp_driving.view(b, self.num_kp, 1, 1, 1, 3)
                           + kp_source.view(b, self.num_kp, 1, 1, 1, 3))  # (B, K, D, H, W, 3)
        sparse_motion = torch.cat([identity.expand(b, 1, d, h, w, 3), keypoint_motion], dim=1)  # (B, K+1, D, H, W, 3)

        # Warp the compressed source by each of the K+1 motions: stacking the motions along depth samples the same
        # volume K+1 times in one call (no copies of the volume).
        source = compressed.expand(b, -1, -1, -1, -1)
        warped = F.grid_sample(source, sparse_motion.reshape(b, k1 * d, h, w, 3), align_corners=False)
        c = warped.shape[1]
        warped = warped.view(b, c, k1, d, h, w).transpose(1, 2)  # (B, K+1, c, D, H, W)

        # (B, K, D, H, W)
        heatmap = keypoint_gaussians(kp_driving, (d, h, w)) - keypoint_gaussians(kp_source, (d, h, w))
        if fast_paths_enabled():
            # Far from its keypoint a Gaussian underflows through subnormal numbers (below ~1.2e-38), and every
            # product of a subnormal takes the CPU's slow path: the hourglass convolutions reading this map ran
            # several times slower. As zeros they change the results by less than 1e-37.
            heatmap = heatmap.masked_fill_(heatmap.abs() < torch.finfo(heatmap.dtype).tiny, 0)
        heatmap = torch.cat([heatmap.new_zeros(b, 1, d, h, w), heatmap], dim=1).unsqueeze(2)  # (B, K+1, 1, D, H, W)
        hourglass_in = torch.cat([heatmap, warped], dim=2).view(b, k1 * (c + 1), d, h, w)  # (B, (K+1)*(c+1), D, H, W)

        prediction = self.hourglass(low_precision_layout(hourglass_in))  # (B, 112, D, H, W)
        mask = F.softmax(self.mask(prediction), dim=1)  # (B, K+1, D, H, W)
        blend = torch.where(mask < 1e-3, torch.zeros_like(mask), mask)  # tiny weights dropped, not renormalised
        deformation = (sparse_motion * blend.unsqueeze(-1)).sum(dim=1)  # (B, D, H, W, 3)

        occlusion_map = None
        if self.occlusion is not None:
            flat = prediction.reshape(b, -1, h, w)  # (B, 112*D, H, W)
            occlusion_map = torch.sigmoid(self._occlusion_logits(flat))  # (B, 1, H, W)
        return DenseMotion(deformation=deformation, occlusion_map=occlusion_map, mask=mask)
