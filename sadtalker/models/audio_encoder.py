"""Audio encoder of SadTalker: the Wav2Lip-style convolutional encoder of one mel window.

Both audio-driven parts use the same architecture (with their own weights): ExpNet (audio -> expression) and
PoseVAE (audio -> head motion). One video frame's window (1, 80, 16) of the log-mel spectrogram becomes a 512-d
embedding through 13 Conv2d + BatchNorm (+ residual) + ReLU blocks.
"""
from __future__ import annotations

import torch
from torch import nn


class ConvBlock(nn.Module):
    """Conv2d -> BatchNorm2d (-> + input when ``residual``) -> ReLU. Keys: ``conv_block.0`` conv, ``conv_block.1`` BN."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int | tuple[int, int],
                 padding: int, residual: bool = False):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding),
            nn.BatchNorm2d(out_channels),
        )
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return torch.relu(out)


class AudioEncoder(nn.Sequential):
    """(N, 1, 80, 16) mel windows -> (N, 512) embeddings.

    Spatial sizes: 80x16 -> (stride 3,1) 27x16 -> (stride 3) 9x6 -> (stride 3,2) 3x3 -> (3x3 valid) 1x1 -> (1x1) 1x1.
    State-dict keys ``<block>.conv_block.{0,1}.*`` as the official ``audio_encoder`` Sequential.
    """

    def __init__(self):
        super().__init__(
            ConvBlock(1, 32, 3, 1, 1),
            ConvBlock(32, 32, 3, 1, 1, residual=True),
            ConvBlock(32, 32, 3, 1, 1, residual=True),
            ConvBlock(32, 64, 3, (3, 1), 1),
            ConvBlock(64, 64, 3, 1, 1, residual=True),
            ConvBlock(64, 64, 3, 1, 1, residual=True),
            ConvBlock(64, 128, 3, 3, 1),
            ConvBlock(128, 128, 3, 1, 1, residual=True),
            ConvBlock(128, 128, 3, 1, 1, residual=True),
            ConvBlock(128, 256, 3, (3, 2), 1),
            ConvBlock(256, 256, 3, 1, 1, residual=True),
            ConvBlock(256, 512, 3, 1, 0),
            ConvBlock(512, 512, 1, 1, 0),
        )
        # channels-last convolutions are ~25% faster on a CPU for these small maps (same values up to rounding);
        # loading a state dict keeps this layout
        self.to(memory_format=torch.channels_last)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        n = windows.shape[0]
        features = super().forward(windows.contiguous(memory_format=torch.channels_last))  # (N, 512, 1, 1)
        return features.reshape(n, -1)  # (N, 512)
