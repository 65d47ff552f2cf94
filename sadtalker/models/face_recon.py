"""3DMM reconstruction net (Deep3DFaceRecon's ``ReconNetWrapper('resnet50', use_last_fc=False)`` used by SadTalker).

A ResNet-50 backbone (torchvision layout, without its classifier) turns an aligned 224x224 RGB face in [0, 1] into
2048 pooled features; seven 1x1 convolutions give the 257 coefficients of the Basel face model:
identity 80 | expression 64 | texture 80 | angles 3 (pitch, yaw, roll, radians) | lighting 27 (SH) | tx, ty 2 | tz 1.
"""
from __future__ import annotations

import torch
from torch import nn

# Sizes of the seven output heads, in the order the 257 coefficients are laid out.
HEAD_SIZES = (80, 64, 80, 3, 27, 2, 1)
EXP_SLICE = slice(80, 144)
ANGLE_SLICE = slice(224, 227)
TRANS_SLICE = slice(254, 257)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1x1 -> 3x3 (stride here) -> 1x1 (x4 channels), identity or projected shortcut."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50Features(nn.Module):
    """(B, 3, H, W) -> (B, 2048, 1, 1) average-pooled features; keys as torchvision's resnet50 minus ``fc``."""

    def __init__(self, blocks: tuple[int, int, int, int] = (3, 4, 6, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels = 64
        for index, (width, count) in enumerate(zip((64, 128, 256, 512), blocks)):
            stride = 1 if index == 0 else 2
            downsample = nn.Sequential(
                nn.Conv2d(channels, width * Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(width * Bottleneck.expansion),
            )
            layers = [Bottleneck(channels, width, stride, downsample)]
            channels = width * Bottleneck.expansion
            layers += [Bottleneck(channels, width) for _ in range(count - 1)]
            setattr(self, f"layer{index + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, 56, 56) for 224 input
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 2048, 7, 7)
        return self.avgpool(x)  # (B, 2048, 1, 1)


class ReconNet(nn.Module):
    """(B, 3, 224, 224) RGB in [0, 1] -> (B, 257) 3DMM coefficients."""

    def __init__(self):
        super().__init__()
        self.backbone = ResNet50Features()
        self.final_layers = nn.ModuleList(nn.Conv2d(2048, size, 1, bias=True) for size in HEAD_SIZES)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = self.backbone(image)  # (B, 2048, 1, 1)
        return torch.cat([head(features) for head in self.final_layers], dim=1).flatten(1)  # (B, 257)
