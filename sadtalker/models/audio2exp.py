"""ExpNet (SadTalker's audio-to-expression network; official ``SimpleWrapperV2`` run by ``Audio2Exp.test``).

For every video frame independently: the audio encoder embeds the frame's mel window (512), which is concatenated
with the reference expression (the source face's 64 expression coefficients, or a blink-reference video's) and the
eye-blink ratio (1); one linear layer maps the 577 values to the frame's 64 expression coefficients.
The official code runs 10 frames per call; since nothing mixes frames (eval-mode BatchNorm), any grouping gives the
same result, so frames are processed in larger groups for speed.
"""
from __future__ import annotations

import torch
from torch import nn

from .audio_encoder import AudioEncoder

NUM_EXP = 64  # expression coefficients of the 3DMM (Deep3DFaceRecon / BFM)
AUDIO_DIM = 512


class ExpNet(nn.Module):
    """(B, T, 1, 80, 16) mel windows + (B, T, >=64) reference + (B, T, 1) blink ratio -> (B, T, 64) expression."""

    frames_per_call = 16  # bounds activation memory; 16 was fastest on a 2-core CPU (channels-last; 64+ slower)

    def __init__(self):
        super().__init__()
        self.audio_encoder = AudioEncoder()
        self.mapping1 = nn.Linear(AUDIO_DIM + NUM_EXP + 1, NUM_EXP)

    def forward(self, windows: torch.Tensor, ref: torch.Tensor, blink_ratio: torch.Tensor) -> torch.Tensor:
        B, T = windows.shape[:2]
        windows = windows.reshape(B * T, 1, windows.shape[-2], windows.shape[-1])  # (B*T, 1, 80, 16)
        ref = ref[..., :NUM_EXP].reshape(B * T, NUM_EXP)  # (B*T, 64)
        ratio = blink_ratio.reshape(B * T, 1)  # (B*T, 1)
        out = []
        for start in range(0, B * T, self.frames_per_call):
            part = slice(start, start + self.frames_per_call)
            audio = self.audio_encoder(windows[part])  # (n, 512)
            out.append(self.mapping1(torch.cat([audio, ref[part], ratio[part]], dim=1)))  # (n, 64)
        return torch.cat(out, dim=0).reshape(B, T, NUM_EXP)
