"""Head pose and expression estimator (face-vid2vid's HEEstimator), a ResNet-style image network.

SadTalker never calls it at inference (MappingNet predicts the same quantities from 3DMM coefficients) and the
v0.0.2 safetensors files do not hold it; only the legacy ``facevid2vid_00189-model.pth.tar`` does. Kept for
completeness and for checking that file. Note the official head wiring: yaw comes from ``fc_roll`` and roll from
``fc_yaw``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ResBottleneck
from .mapping import HeadMotion


def _bottleneck_stack(prefix: str, count: int, features: int) -> nn.Sequential:
    """Stride-1 bottlenecks named as in the official checkpoint (``b1_0``, ``b1_1``, ...)."""
    stack = nn.Sequential()
    for i in range(count):
        stack.add_module(f"{prefix}{i}", ResBottleneck(features, stride=1))
    return stack


class HeadPoseEstimator(nn.Module):
    def __init__(self, block_expansion: int = 64, num_kp: int = 15, image_channel: int = 3, num_bins: int = 66):
        super().__init__()
        self.conv1 = nn.Conv2d(image_channel, block_expansion, kernel_size=7, padding=3, stride=2)
        self.norm1 = nn.BatchNorm2d(block_expansion, affine=True)
        self.conv2 = nn.Conv2d(block_expansion, 256, kernel_size=1)
        self.norm2 = nn.BatchNorm2d(256, affine=True)
        self.block1 = _bottleneck_stack("b1_", 3, 256)
        self.conv3 = nn.Conv2d(256, 512, kernel_size=1)
        self.norm3 = nn.BatchNorm2d(512, affine=True)
        self.block2 = ResBottleneck(512, stride=2)
        self.block3 = _bottleneck_stack("b3_", 3, 512)
        self.conv4 = nn.Conv2d(512, 1024, kernel_size=1)
        self.norm4 = nn.BatchNorm2d(1024, affine=True)
        self.block4 = ResBottleneck(1024, stride=2)
        self.block5 = _bottleneck_stack("b5_", 5, 1024)
        self.conv5 = nn.Conv2d(1024, 2048, kernel_size=1)
        self.norm5 = nn.BatchNorm2d(2048, affine=True)
        self.block6 = ResBottleneck(2048, stride=2)
        self.block7 = _bottleneck_stack("b7_", 2, 2048)
        self.fc_roll = nn.Linear(2048, num_bins)
        self.fc_pitch = nn.Linear(2048, num_bins)
        self.fc_yaw = nn.Linear(2048, num_bins)
        self.fc_t = nn.Linear(2048, 3)
        self.fc_exp = nn.Linear(2048, 3 * num_kp)

    def forward(self, image: torch.Tensor) -> HeadMotion:
        """(B, 3, H, W) RGB in [0, 1] -> head motion logits (same layout as MappingNet's output)."""
        out = F.max_pool2d(F.relu(self.norm1(self.conv1(image))), kernel_size=3, stride=2, padding=1)
        out = self.block1(F.relu(self.norm2(self.conv2(out))))
        out = self.block3(self.block2(F.relu(self.norm3(self.conv3(out)))))
        out = self.block5(self.block4(F.relu(self.norm4(self.conv4(out)))))
        out = self.block7(self.block6(F.relu(self.norm5(self.conv5(out)))))
        feature = out.mean(dim=(2, 3))  # (B, 2048) global average
        return HeadMotion(yaw=self.fc_roll(feature), pitch=self.fc_pitch(feature), roll=self.fc_yaw(feature),
                          t=self.fc_t(feature), exp=self.fc_exp(feature))
