"""Building blocks shared by the face renderer's networks (keypoint detector, dense motion, generator).

These are the layers of the face-vid2vid family as SadTalker's face renderer uses them: conv + BatchNorm blocks that
down- or up-sample 2-D images and 3-D feature volumes, the hourglass U-Nets, the anti-aliased down-sampler of the
keypoint detector, and the SPADE residual blocks (with spectral-normalised convolutions) of the image decoder.

Attribute names follow the official checkpoints so ``state_dict()`` keys match the stored tensors exactly.
All BatchNorms are used in eval mode only (running statistics), as at inference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def make_coordinate_grid(spatial_size: tuple[int, int, int], dtype: torch.dtype = torch.float32,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """(D, H, W, 3) grid of (x, y, z) coordinates, each axis spanning [-1, 1] as ``2 * i / (n - 1) - 1``."""
    d, h, w = spatial_size
    x = 2 * (torch.arange(w, dtype=dtype, device=device) / (w - 1)) - 1
    y = 2 * (torch.arange(h, dtype=dtype, device=device) / (h - 1)) - 1
    z = 2 * (torch.arange(d, dtype=dtype, device=device) / (d - 1)) - 1
    xx = x.view(1, 1, w).expand(d, h, w)
    yy = y.view(1, h, 1).expand(d, h, w)
    zz = z.view(d, 1, 1).expand(d, h, w)
    return torch.stack([xx, yy, zz], dim=3)  # (D, H, W, 3)


def keypoint_gaussians(keypoints: torch.Tensor, spatial_size: tuple[int, int, int], variance: float = 0.01) -> torch.Tensor:
    """Unnormalised 3-D Gaussians around each keypoint: (B, K, 3) -> (B, K, D, H, W)."""
    grid = make_coordinate_grid(spatial_size, keypoints.dtype, keypoints.device)  # (D, H, W, 3)
    b, k, _ = keypoints.shape
    offset = grid.view(1, 1, *grid.shape) - keypoints.view(b, k, 1, 1, 1, 3)  # (B, K, D, H, W, 3)
    return torch.exp(-0.5 * (offset ** 2).sum(-1) / variance)


# --------------------------------------------------------------------------------------------------------------------
# conv + norm blocks


class DownBlock2d(nn.Module):
    """conv -> BatchNorm -> ReLU -> 2x2 average pooling (halves H and W)."""

    def __init__(self, in_features: int, out_features: int, kernel_size=3, padding=1):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=kernel_size, padding=padding)
        self.norm = nn.BatchNorm2d(out_features, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.relu(self.norm(self.conv(x))), kernel_size=2)


class DownBlock3d(nn.Module):
    """conv3d -> BatchNorm -> ReLU -> (1, 2, 2) average pooling (halves H and W, keeps depth)."""

    def __init__(self, in_features: int, out_features: int, kernel_size=3, padding=1):
        super().__init__()
        self.conv = nn.Conv3d(in_features, out_features, kernel_size=kernel_size, padding=padding)
        self.norm = nn.BatchNorm3d(out_features, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool3d(F.relu(self.norm(self.conv(x))), kernel_size=(1, 2, 2))


class UpBlock3d(nn.Module):
    """Nearest (1, 2, 2) up-sampling -> conv3d -> BatchNorm -> ReLU (doubles H and W, keeps depth)."""

    def __init__(self, in_features: int, out_features: int, kernel_size=3, padding=1):
        super().__init__()
        self.conv = nn.Conv3d(in_features, out_features, kernel_size=kernel_size, padding=padding)
        self.norm = nn.BatchNorm3d(out_features, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")
        return F.relu(self.norm(self.conv(x)))


class SameBlock2d(nn.Module):
    """conv -> BatchNorm -> ReLU (or LeakyReLU 0.01), resolution preserved."""

    def __init__(self, in_features: int, out_features: int, kernel_size=3, padding=1, lrelu: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=kernel_size, padding=padding)
        self.norm = nn.BatchNorm2d(out_features, affine=True)
        self.lrelu = lrelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        return F.leaky_relu(x, 0.01) if self.lrelu else F.relu(x)


class ResBlock3d(nn.Module):
    """Pre-activation residual block on a 3-D volume: x + conv(relu(bn(conv(relu(bn(x))))))."""

    def __init__(self, features: int, kernel_size=3, padding=1):
        super().__init__()
        self.conv1 = nn.Conv3d(features, features, kernel_size=kernel_size, padding=padding)
        self.conv2 = nn.Conv3d(features, features, kernel_size=kernel_size, padding=padding)
        self.norm1 = nn.BatchNorm3d(features, affine=True)
        self.norm2 = nn.BatchNorm3d(features, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return out + x


class ResBottleneck(nn.Module):
    """ResNet bottleneck (1x1 -> 3x3 (stride) -> 1x1, BatchNorm after each) with a strided 1x1 skip when stride > 1."""

    def __init__(self, in_features: int, stride: int):
        super().__init__()
        mid = in_features // 4
        self.conv1 = nn.Conv2d(in_features, mid, kernel_size=1)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, padding=1, stride=stride)
        self.conv3 = nn.Conv2d(mid, in_features, kernel_size=1)
        self.norm1 = nn.BatchNorm2d(mid, affine=True)
        self.norm2 = nn.BatchNorm2d(mid, affine=True)
        self.norm3 = nn.BatchNorm2d(in_features, affine=True)
        self.stride = stride
        if stride != 1:
            self.skip = nn.Conv2d(in_features, in_features, kernel_size=1, stride=stride)
            self.norm4 = nn.BatchNorm2d(in_features, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = F.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        if self.stride != 1:
            x = self.norm4(self.skip(x))
        return F.relu(out + x)


# --------------------------------------------------------------------------------------------------------------------
# hourglass U-Nets


class HourglassEncoder(nn.Module):
    """3-D encoder: a stack of DownBlock3d; returns the input and every level (for the skip connections)."""

    def __init__(self, block_expansion: int, in_features: int, num_blocks: int, max_features: int):
        super().__init__()
        self.down_blocks = nn.ModuleList(
            DownBlock3d(in_features if i == 0 else min(max_features, block_expansion * 2 ** i),
                        min(max_features, block_expansion * 2 ** (i + 1)))
            for i in range(num_blocks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = [x]
        for block in self.down_blocks:
            levels.append(block(levels[-1]))
        return levels


class HourglassDecoder(nn.Module):
    """3-D decoder: UpBlock3d stack, each output concatenated with the matching encoder level, then conv + BN + ReLU."""

    def __init__(self, block_expansion: int, in_features: int, num_blocks: int, max_features: int):
        super().__init__()
        blocks = []
        for i in reversed(range(num_blocks)):
            in_filters = (1 if i == num_blocks - 1 else 2) * min(max_features, block_expansion * 2 ** (i + 1))
            out_filters = min(max_features, block_expansion * 2 ** i)
            blocks.append(UpBlock3d(in_filters, out_filters))
        self.up_blocks = nn.ModuleList(blocks)
        self.out_filters = block_expansion + in_features
        self.conv = nn.Conv3d(self.out_filters, self.out_filters, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(self.out_filters, affine=True)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        out = levels[-1]
        for block, skip in zip(self.up_blocks, reversed(levels[:-1])):
            out = torch.cat([block(out), skip], dim=1)
        return F.relu(self.norm(self.conv(out)))


class Hourglass(nn.Module):
    """3-D U-Net used by the dense motion network."""

    def __init__(self, block_expansion: int, in_features: int, num_blocks: int = 3, max_features: int = 256):
        super().__init__()
        self.encoder = HourglassEncoder(block_expansion, in_features, num_blocks, max_features)
        self.decoder = HourglassDecoder(block_expansion, in_features, num_blocks, max_features)
        self.out_filters = self.decoder.out_filters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class KeypointHourglass(nn.Module):
    """The keypoint detector's predictor: a 2-D encoder, a 1x1 conv lifting channels into a 3-D volume, a 3-D decoder."""

    def __init__(self, block_expansion: int, in_features: int, reshape_features: int, reshape_depth: int,
                 num_blocks: int = 3, max_features: int = 256):
        super().__init__()
        self.down_blocks = nn.Sequential()
        for i in range(num_blocks):
            self.down_blocks.add_module(f"down{i}", DownBlock2d(
                in_features if i == 0 else min(max_features, block_expansion * 2 ** i),
                min(max_features, block_expansion * 2 ** (i + 1))))
        in_filters = min(max_features, block_expansion * 2 ** num_blocks)
        self.conv = nn.Conv2d(in_filters, reshape_features, kernel_size=1)
        self.up_blocks = nn.Sequential()
        for i in range(num_blocks):
            self.up_blocks.add_module(f"up{i}", UpBlock3d(min(max_features, block_expansion * 2 ** (num_blocks - i)),
                                                          min(max_features, block_expansion * 2 ** (num_blocks - i - 1))))
        self.reshape_depth = reshape_depth
        self.out_filters = min(max_features, block_expansion)  # channels of the last up block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(self.down_blocks(x))  # (B, C*D, h, w)
        b, c, h, w = out.shape
        out = out.view(b, c // self.reshape_depth, self.reshape_depth, h, w)  # (B, C, D, h, w)
        return self.up_blocks(out)


class AntiAliasDownsample(nn.Module):
    """Band-limited down-sampling by an integer factor: Gaussian blur (depthwise, zero padded), then every n-th pixel.

    The Gaussian kernel is stored as the buffer ``weight`` (it is part of the official checkpoints).
    """

    def __init__(self, channels: int, scale: float):
        super().__init__()
        sigma = (1 / scale - 1) / 2
        kernel_size = 2 * round(sigma * 4) + 1
        self.pad_before = kernel_size // 2
        self.pad_after = self.pad_before - 1 if kernel_size % 2 == 0 else self.pad_before
        taps = torch.arange(kernel_size, dtype=torch.float32)
        gaussian = torch.exp(-(taps - (kernel_size - 1) / 2) ** 2 / (2 * sigma ** 2))
        kernel = gaussian[:, None] * gaussian[None, :]
        kernel = kernel / kernel.sum()
        self.register_buffer("weight", kernel.expand(channels, 1, kernel_size, kernel_size).clone())
        self.channels = channels
        self.step = int(1 / scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.pad_before, self.pad_after, self.pad_before, self.pad_after))
        x = F.conv2d(x, self.weight, groups=self.channels)
        return x[:, :, ::self.step, ::self.step]


# --------------------------------------------------------------------------------------------------------------------
# SPADE decoder blocks


class SpectralNormConv2d(nn.Module):
    """Conv2d whose weight is divided by its spectral norm, evaluated as at inference (no power iteration).

    Stores ``weight_orig``, ``weight_u``, ``weight_v`` (and ``bias``) as torch's spectral_norm does, so the official
    keys load unchanged; the effective weight is ``weight_orig / sigma`` with
    ``sigma = u . (W v)``, W = weight_orig flattened to (out, in*kh*kw).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0, dilation: int = 1,
                 bias: bool = True):
        super().__init__()
        self.weight_orig = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        fan = in_channels * kernel_size * kernel_size
        self.register_buffer("weight_u", F.normalize(torch.randn(out_channels), dim=0))
        self.register_buffer("weight_v", F.normalize(torch.randn(fan), dim=0))
        nn.init.kaiming_uniform_(self.weight_orig, a=5 ** 0.5)
        self.padding = padding
        self.dilation = dilation

    def effective_weight(self) -> torch.Tensor:
        w = self.weight_orig
        sigma = torch.dot(self.weight_u, torch.mv(w.reshape(w.shape[0], -1), self.weight_v))
        return w / sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.effective_weight(), self.bias, padding=self.padding, dilation=self.dilation)


def conv3x3_of_upsampled(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: int) -> torch.Tensor:
    """``conv2d(nearest_upsample(x, scale), weight, padding=1)`` computed on the low-resolution input.

    With nearest up-sampling by an integer ``scale``, output pixel (s*i + p) only sees low-resolution pixels i-1, i,
    i+1; per axis, phase p = 0 reads {i-1, i}, phase s-1 reads {i, i+1} and the phases between read only {i}. So the
    3x3 taps that land on the same low-resolution pixel are summed into a smaller kernel per phase, and each group of
    phases with the same footprint is one small convolution: the same result with 2.25x (s=2) / 4x (s=4) fewer
    multiply-adds. Zero padding maps exactly (the padded ring of the up-sampled image is the padded ring of ``x``).
    """
    assert weight.shape[-2:] == (3, 3) and scale >= 2
    b, c_in, h, w = x.shape
    c_out = weight.shape[0]
    # Per axis: phase -> (first low-res offset, [[taps summed into low-res offset 0], [.. offset 1]]).
    first, last = (-1, [[0], [1, 2]]), (0, [[0, 1], [2]])
    middle = (0, [[0, 1, 2]])
    phases = [first] + [middle] * (scale - 2) + [last]
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for py, (oy, ty) in enumerate(phases):
        for px, (ox, tx) in enumerate(phases):
            groups.setdefault((oy, len(ty), ox, len(tx)), []).append((py, px))
    x_pad = F.pad(x, (1, 1, 1, 1))
    out = x.new_empty(b, c_out, h, scale, w, scale)  # viewed as (B, C, H*s, W*s) at the end
    for (oy, ny, ox, nx), members in groups.items():
        kernels = []
        for py, px in members:
            rows = phases[py][1]
            cols = phases[px][1]
            k = torch.stack([torch.stack([weight[:, :, r][:, :, :, c].sum(dim=(2, 3)) for c in cols], dim=-1)
                             for r in rows], dim=-2)  # (C_out, C_in, ny, nx)
            kernels.append(k)
        kernel = torch.cat(kernels, dim=0)  # (len(members) * C_out, C_in, ny, nx)
        window = x_pad[:, :, 1 + oy:1 + oy + h + ny - 1, 1 + ox:1 + ox + w + nx - 1]
        result = F.conv2d(window, kernel, None if bias is None else bias.repeat(len(members)))
        result = result.view(b, len(members), c_out, h, w)
        for m, (py, px) in enumerate(members):
            out[:, :, :, py, :, px] = result[:, m]
    return out.view(b, c_out, h * scale, w * scale)


class SPADE(nn.Module):
    """Spatially-adaptive normalisation: instance-normalise x, then scale/shift by maps predicted from a label map."""

    def __init__(self, norm_nc: int, label_nc: int, hidden: int = 128):
        super().__init__()
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, hidden, kernel_size=3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, norm_nc, kernel_size=3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden, norm_nc, kernel_size=3, padding=1)

    def modulation(self, segmap: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma, beta) at ``size`` from the label map (nearest up-sampled to ``size`` first, as the reference)."""
        conv = self.mlp_shared[0]
        h, w = segmap.shape[2:]
        if (h, w) == tuple(size):
            hidden = conv(segmap)
        elif size[0] % h == 0 and size[0] // h == size[1] // w and size[1] % w == 0:
            hidden = conv3x3_of_upsampled(segmap, conv.weight, conv.bias, size[0] // h)
        else:
            hidden = conv(F.interpolate(segmap, size=size, mode="nearest"))
        hidden = F.relu(hidden)
        return self.mlp_gamma(hidden), self.mlp_beta(hidden)

    def forward(self, x: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
        normalized = F.instance_norm(x, eps=1e-5)
        gamma, beta = self.modulation(segmap, tuple(x.shape[2:]))
        return torch.addcmul(beta, normalized, 1 + gamma)


class SPADEResnetBlock(nn.Module):
    """Residual block of two SPADE -> LeakyReLU(0.2) -> spectral-norm conv stages (learned 1x1 shortcut if fin != fout)."""

    def __init__(self, fin: int, fout: int, label_nc: int):
        super().__init__()
        self.learned_shortcut = fin != fout
        fmiddle = min(fin, fout)
        self.conv_0 = SpectralNormConv2d(fin, fmiddle, kernel_size=3, padding=1)
        self.conv_1 = SpectralNormConv2d(fmiddle, fout, kernel_size=3, padding=1)
        if self.learned_shortcut:
            self.conv_s = SpectralNormConv2d(fin, fout, kernel_size=1, bias=False)
        self.norm_0 = SPADE(fin, label_nc)
        self.norm_1 = SPADE(fmiddle, label_nc)
        if self.learned_shortcut:
            self.norm_s = SPADE(fin, label_nc)

    def forward(self, x: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
        shortcut = self.conv_s(self.norm_s(x, segmap)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, segmap), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, segmap), 0.2))
        return shortcut + dx
