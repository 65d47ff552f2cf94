"""PoseVAE (SadTalker's audio-to-head-pose network; official ``Audio2Pose`` test path, the CVAE decoder).

Head motion is predicted in chunks of 32 frames. Per chunk, the decoder takes the reference pose (the source face's
3 angles + 3 translations), a latent sample ``z`` shifted by the learned bias of the chosen pose style (46 styles),
and the 32 audio embeddings mapped to 6 values each; an MLP makes a (32, 6) draft that a small 2-D ResUNet refines.
The output is the motion relative to the first frame. Training-only parts stored in the official checkpoint
(``netG.encoder``, ``netD_motion``) are not built here.

Chunking (frame 0 is the reference, its motion is 0; frames 1..T-1 are predicted):
* one ``z`` per full chunk of 32 frames, using those frames' windows;
* if (T-1) % 32 != 0, one more ``z``: the decoder sees the *last* 32 windows (left-padded by repeating the first
  embedding when fewer than 32 exist) and the last (T-1) % 32 predictions are kept.
"""
from __future__ import annotations

import torch
from torch import nn

from .audio_encoder import AudioEncoder

SEQ_LEN = 32  # frames per decoder call
LATENT_DIM = 64
NUM_POSE_STYLES = 46
POSE_DIM = 6  # pitch, yaw, roll (radians) + tx, ty, tz
AUDIO_DIM = 512
AUDIO_OUT_DIM = 6  # per-frame audio features fed to the decoder MLP


class ResidualConv(nn.Module):
    """Pre-activation residual block: BN-ReLU-Conv(stride)-BN-ReLU-Conv, plus a Conv(stride)-BN shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int | tuple[int, int], padding: int):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
            nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=padding),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
        )
        self.conv_skip = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_block(x) + self.conv_skip(x)


class Upsample(nn.Module):
    """Learned up-sampling along time: a transposed convolution."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int], stride: tuple[int, int]):
        super().__init__()
        self.upsample = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=kernel, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(x)


class ResUnet(nn.Module):
    """(B, 1, 32, 6) -> (B, 1, 32, 6) in (0, 1): a U-Net over (time, pose value), halving time 3 times (32 -> 4)."""

    def __init__(self, channels: int = 1, filters: tuple[int, int, int, int] = (32, 64, 128, 256)):
        super().__init__()
        f0, f1, f2, f3 = filters
        self.input_layer = nn.Sequential(
            nn.Conv2d(channels, f0, kernel_size=3, padding=1),
            nn.BatchNorm2d(f0),
            nn.ReLU(),
            nn.Conv2d(f0, f0, kernel_size=3, padding=1),
        )
        self.input_skip = nn.Sequential(nn.Conv2d(channels, f0, kernel_size=3, padding=1))
        self.residual_conv_1 = ResidualConv(f0, f1, stride=(2, 1), padding=1)
        self.residual_conv_2 = ResidualConv(f1, f2, stride=(2, 1), padding=1)
        self.bridge = ResidualConv(f2, f3, stride=(2, 1), padding=1)
        self.upsample_1 = Upsample(f3, f3, kernel=(2, 1), stride=(2, 1))
        self.up_residual_conv1 = ResidualConv(f3 + f2, f2, stride=1, padding=1)
        self.upsample_2 = Upsample(f2, f2, kernel=(2, 1), stride=(2, 1))
        self.up_residual_conv2 = ResidualConv(f2 + f1, f1, stride=1, padding=1)
        self.upsample_3 = Upsample(f1, f1, kernel=(2, 1), stride=(2, 1))
        self.up_residual_conv3 = ResidualConv(f1 + f0, f0, stride=1, padding=1)
        self.output_layer = nn.Sequential(nn.Conv2d(f0, 1, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.input_layer(x) + self.input_skip(x)  # (B, 32, 32, 6)
        x2 = self.residual_conv_1(x1)  # (B, 64, 16, 6)
        x3 = self.residual_conv_2(x2)  # (B, 128, 8, 6)
        x4 = self.bridge(x3)  # (B, 256, 4, 6)
        x5 = self.up_residual_conv1(torch.cat([self.upsample_1(x4), x3], dim=1))  # (B, 128, 8, 6)
        x6 = self.up_residual_conv2(torch.cat([self.upsample_2(x5), x2], dim=1))  # (B, 64, 16, 6)
        x7 = self.up_residual_conv3(torch.cat([self.upsample_3(x6), x1], dim=1))  # (B, 32, 32, 6)
        return self.output_layer(x7)  # (B, 1, 32, 6)


class PoseDecoder(nn.Module):
    """CVAE decoder: (ref pose, z, style, 32 audio embeddings) -> (B, 32, 6) motion relative to the first frame."""

    def __init__(self):
        super().__init__()
        self.resunet = ResUnet()
        in_size = POSE_DIM + LATENT_DIM + SEQ_LEN * AUDIO_OUT_DIM  # 6 + 64 + 192 = 262
        self.MLP = nn.Sequential()
        self.MLP.add_module("L0", nn.Linear(in_size, 128))
        self.MLP.add_module("A0", nn.ReLU())
        self.MLP.add_module("L1", nn.Linear(128, SEQ_LEN * POSE_DIM))
        self.MLP.add_module("sigmoid", nn.Sigmoid())
        self.pose_linear = nn.Linear(POSE_DIM, POSE_DIM)
        self.linear_audio = nn.Linear(AUDIO_DIM, AUDIO_OUT_DIM)
        self.classbias = nn.Parameter(torch.zeros(NUM_POSE_STYLES, LATENT_DIM))  # one latent offset per pose style

    def forward(self, ref_pose: torch.Tensor, z: torch.Tensor, style: torch.Tensor,
                audio_emb: torch.Tensor) -> torch.Tensor:
        B = z.shape[0]
        audio = self.linear_audio(audio_emb).reshape(B, -1)  # (B, 32, 512) -> (B, 32, 6) -> (B, 192)
        z = z + self.classbias[style]  # (B, 64)
        draft = self.MLP(torch.cat([ref_pose, z, audio], dim=-1))  # (B, 192)
        draft = draft.reshape(B, 1, SEQ_LEN, POSE_DIM)  # (B, 1, 32, 6)
        refined = self.resunet(draft).squeeze(1)  # (B, 32, 6)
        return self.pose_linear(refined)  # (B, 32, 6)


class _DecoderOnlyCVAE(nn.Module):
    """Holds the CVAE decoder under the official name ``netG.decoder`` (the encoder is training-only)."""

    def __init__(self):
        super().__init__()
        self.decoder = PoseDecoder()


class SequenceAudioEncoder(nn.Module):
    """(B, T, 1, 80, 16) -> (B, T, 512); keys ``audio_encoder.*`` as the official wrapper."""

    frames_per_call = 16  # see ExpNet.frames_per_call

    def __init__(self):
        super().__init__()
        self.audio_encoder = AudioEncoder()

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        B, T = windows.shape[:2]
        flat = windows.reshape(B * T, 1, windows.shape[-2], windows.shape[-1])  # (B*T, 1, 80, 16)
        emb = [self.audio_encoder(flat[i:i + self.frames_per_call]) for i in range(0, B * T, self.frames_per_call)]
        return torch.cat(emb, dim=0).reshape(B, T, AUDIO_DIM)


def num_noise_draws(num_frames: int) -> int:
    """How many latent samples ``z`` PoseVAE uses for a clip of ``num_frames`` (one per decoder call)."""
    n = max(num_frames - 1, 0)
    return n // SEQ_LEN + (1 if n % SEQ_LEN else 0)


class PoseVAE(nn.Module):
    """Audio -> head-pose motion (official Audio2Pose at test time). State-dict keys: ``audio_encoder.audio_encoder.*``
    and ``netG.decoder.*`` (the official section also stores ``netG.encoder.*`` / ``netD_motion.*``, unused)."""

    def __init__(self):
        super().__init__()
        self.audio_encoder = SequenceAudioEncoder()
        self.netG = _DecoderOnlyCVAE()

    def forward(self, windows: torch.Tensor, ref_pose: torch.Tensor, pose_style: int, noise: torch.Tensor,
                num_frames: int | None = None) -> torch.Tensor:
        """Motion (B, T, 6) relative to frame 0 (row 0 is zeros).

        windows (B, T, 1, 80, 16); ref_pose (B, 6) = the reference frame's angles + translation;
        noise (num_noise_draws(T), B, 64): the i-th decoder call's ``z`` (the official code draws it with torch.randn).
        """
        B, T = windows.shape[:2]
        T = T if num_frames is None else int(num_frames)
        n = T - 1  # frames predicted (frame 0 is the reference)
        full, rest = divmod(max(n, 0), SEQ_LEN)
        draws = full + (1 if rest else 0)
        if noise.shape[0] != draws or noise.shape[-1] != LATENT_DIM:
            raise ValueError(f"PoseVAE needs noise of shape ({draws}, {B}, {LATENT_DIM}) for {T} frames, "
                             f"got {tuple(noise.shape)}")
        zero = ref_pose.new_zeros(B, 1, POSE_DIM)
        if draws == 0:
            return zero
        emb = self.audio_encoder(windows[:, 1:T])  # (B, n, 512): frame-wise, so chunks can be sliced from it
        chunks = [emb[:, i * SEQ_LEN:(i + 1) * SEQ_LEN] for i in range(full)]
        if rest:
            last = emb[:, -SEQ_LEN:]
            if last.shape[1] < SEQ_LEN:  # short clip: repeat the first embedding on the left
                pad = last[:, :1].expand(B, SEQ_LEN - last.shape[1], AUDIO_DIM)
                last = torch.cat([pad, last], dim=1)
            chunks.append(last)
        # All decoder calls in one batch (eval mode: samples are independent): (draws*B, 32, 512), chunk-major.
        audio = torch.cat(chunks, dim=0)
        z = noise.reshape(draws * B, LATENT_DIM).to(audio.dtype)
        ref = ref_pose.repeat(draws, 1)  # (draws*B, 6)
        style = torch.full((draws * B,), int(pose_style), dtype=torch.long, device=audio.device)
        motion = self.netG.decoder(ref, z, style, audio).reshape(draws, B, SEQ_LEN, POSE_DIM)
        pieces = [zero] + [motion[i] for i in range(full)]
        if rest:
            pieces.append(motion[full][:, -rest:])
        return torch.cat(pieces, dim=1)  # (B, T, 6)
