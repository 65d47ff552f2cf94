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

from .fast_conv import (DerivedTensors, SameConv2d, SameConv3d, conv2d_same, conv3d_same, fast_paths_enabled,
                        low_precision_dtype)


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


def keypoint_gaussians(keypoints: torch.Tensor, spatial_size: tuple[int, int, int],
                       variance: float = 0.01) -> torch.Tensor:
    """Unnormalised 3-D Gaussians around each keypoint: (B, K, 3) -> (B, K, D, H, W)."""
    grid = make_coordinate_grid(spatial_size, keypoints.dtype, keypoints.device)  # (D, H, W, 3)
    b, k, _ = keypoints.shape
    offset = grid.view(1, 1, *grid.shape) - keypoints.view(b, k, 1, 1, 1, 3)  # (B, K, D, H, W, 3)
    return torch.exp(-0.5 * (offset ** 2).sum(-1) / variance)


# --------------------------------------------------------------------------------------------------------------------
# conv + norm blocks


def fold_batch_norm(conv: nn.Conv2d | nn.Conv3d, norm: nn.BatchNorm2d | nn.BatchNorm3d
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of one convolution computing eval-mode ``norm(conv(x))``, folded in float64:
    norm(y) = (y - mean) * s + beta with s = gamma / sqrt(var + eps), so weight * s and (bias - mean) * s + beta."""
    scale = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)  # (C_out,)
    bias = torch.zeros_like(scale) if conv.bias is None else conv.bias.double()
    weight = conv.weight.double() * scale.view(-1, *[1] * (conv.weight.dim() - 1))
    folded_bias = (bias - norm.running_mean.double()) * scale + norm.bias.double()
    return weight.to(conv.weight.dtype).contiguous(), folded_bias.to(conv.weight.dtype)


def conv_norm_activation(x: torch.Tensor, conv: nn.Conv2d | nn.Conv3d, norm: nn.BatchNorm2d | nn.BatchNorm3d,
                         derived: DerivedTensors, negative_slope: float = 0.0) -> torch.Tensor:
    """``leaky_relu(norm(conv(x)), negative_slope)`` (0: ReLU) for a stride-1 'same' conv.

    On the fast path (eval-mode BatchNorm, no autograd) the BatchNorm is folded into the convolution
    (``fold_batch_norm``, cached in ``derived``) and the activation is applied by the convolution as it writes its
    output: one pass over the result instead of three.
    """
    if norm.training or torch.is_grad_enabled() or not fast_paths_enabled():
        out = norm(conv(x))
        return F.leaky_relu(out, negative_slope) if negative_slope else F.relu(out)
    weight, bias = derived.get("conv_norm", (conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean,
                                             norm.running_var), lambda: fold_batch_norm(conv, norm))
    if weight.dim() == 4:
        return conv2d_same(x, weight, bias, negative_slope=negative_slope)
    return conv3d_same(x, weight, bias, negative_slope=negative_slope)


class DownBlock2d(nn.Module):
    """conv -> BatchNorm -> ReLU -> 2x2 average pooling (halves H and W)."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=kernel_size, padding=kernel_size // 2)
        self.norm = nn.BatchNorm2d(out_features, affine=True)
        self._derived = DerivedTensors()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(conv_norm_activation(x, self.conv, self.norm, self._derived), kernel_size=2)


class DownBlock3d(nn.Module):
    """conv3d -> BatchNorm -> ReLU -> (1, 2, 2) average pooling (halves H and W, keeps depth)."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int = 3):
        super().__init__()
        self.conv = SameConv3d(in_features, out_features, kernel_size=kernel_size)
        self.norm = nn.BatchNorm3d(out_features, affine=True)
        self._derived = DerivedTensors()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool3d(conv_norm_activation(x, self.conv, self.norm, self._derived), kernel_size=(1, 2, 2))


class UpBlock3d(nn.Module):
    """Nearest (1, 2, 2) up-sampling -> conv3d -> BatchNorm -> ReLU (doubles H and W, keeps depth)."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int = 3):
        super().__init__()
        self.conv = SameConv3d(in_features, out_features, kernel_size=kernel_size)
        self.norm = nn.BatchNorm3d(out_features, affine=True)
        self._derived = DerivedTensors()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")
        return conv_norm_activation(x, self.conv, self.norm, self._derived)


class SameBlock2d(nn.Module):
    """conv -> BatchNorm -> ReLU (or LeakyReLU 0.01), resolution preserved."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int = 3, lrelu: bool = False):
        super().__init__()
        self.conv = SameConv2d(in_features, out_features, kernel_size=kernel_size)
        self.norm = nn.BatchNorm2d(out_features, affine=True)
        self.lrelu = lrelu
        self._derived = DerivedTensors()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_norm_activation(x, self.conv, self.norm, self._derived, 0.01 if self.lrelu else 0.0)


class ResBlock3d(nn.Module):
    """Pre-activation residual block on a 3-D volume: x + conv(relu(bn(conv(relu(bn(x))))))."""

    def __init__(self, features: int, kernel_size: int = 3):
        super().__init__()
        self.conv1 = SameConv3d(features, features, kernel_size=kernel_size)
        self.conv2 = SameConv3d(features, features, kernel_size=kernel_size)
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
        self.conv = SameConv3d(self.out_filters, self.out_filters, kernel_size=3)
        self.norm = nn.BatchNorm3d(self.out_filters, affine=True)
        self._derived = DerivedTensors()

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        out = levels[-1]
        for block, skip in zip(self.up_blocks, reversed(levels[:-1])):
            out = torch.cat([block(out), skip], dim=1)
        return conv_norm_activation(out, self.conv, self.norm, self._derived)


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
    """The keypoint detector's predictor: a 2-D encoder, a 1x1 conv lifting channels into a 3-D volume, a 3-D
    decoder."""

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
            self.up_blocks.add_module(f"up{i}", UpBlock3d(
                min(max_features, block_expansion * 2 ** (num_blocks - i)),
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

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True):
        super().__init__()
        self.weight_orig = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight_orig, a=5 ** 0.5)
        # a consistent (u, v) pair, as one power iteration leaves it (real checkpoints overwrite all three)
        u = F.normalize(torch.randn(out_channels), dim=0)
        self.register_buffer("weight_u", u)
        self.register_buffer("weight_v", F.normalize(self.weight_orig.detach().reshape(out_channels, -1).T @ u, dim=0))
        self._derived = DerivedTensors()

    def _normalised_weight(self) -> torch.Tensor:
        w = self.weight_orig
        sigma = torch.dot(self.weight_u, torch.mv(w.reshape(w.shape[0], -1), self.weight_v))
        return w / sigma

    def effective_weight(self) -> torch.Tensor:
        return self._derived.get("weight", (self.weight_orig, self.weight_u, self.weight_v), self._normalised_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d_same(x, self.effective_weight(), self.bias)


def instance_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``F.instance_norm(x, eps=eps)`` (no affine, no running statistics) that keeps a channels-last x channels-last.

    F.instance_norm hands back a contiguous (B, C, H, W) tensor whatever its input: on the reduced-precision path,
    where the decoder's activations are channels-last, that costs two transposing copies per normalisation (and
    torch's own channels-last statistics are slow). Here the statistics are sums over the (B, H*W, C) view, in
    float32, of x minus a rough per-channel mean (the first row's): shifted so that E[d^2] - E[d]^2 does not
    cancel. Measured within 1e-6 of float64 at mean/std 10 -- far below the reduced precision's rounding, the only
    path that hands this function channels-last activations. Anything else goes to F.instance_norm.
    """
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return F.instance_norm(x, eps=eps)
    b, c, h, w = x.shape
    pixels = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view: channels-last memory is (B, H, W, C)
    shift = pixels[:, :w].mean(dim=1, keepdim=True)  # (B, 1, C)
    centered = pixels - shift
    mean = centered.mean(dim=1)  # (B, C), of x - shift
    var = (centered * centered).mean(dim=1) - mean * mean
    inv_std = torch.rsqrt(var.clamp_min_(0) + eps).view(b, c, 1, 1)
    mean = (mean + shift[:, 0]).view(b, c, 1, 1)
    return torch.addcmul(-mean * inv_std, x, inv_std)  # (x - mean) / std, channels-last


class SPADE(nn.Module):
    """Spatially-adaptive normalisation: instance-normalise x, then scale/shift by maps predicted from a label map.

    ``forward`` is the reference computation; a decoder that runs many SPADEs on one label map can compute the
    hidden maps itself (``hidden``) and call ``modulate``.
    """

    def __init__(self, norm_nc: int, label_nc: int, hidden: int = 128):
        super().__init__()
        self.mlp_shared = nn.Sequential(SameConv2d(label_nc, hidden, kernel_size=3), nn.ReLU())
        self.mlp_gamma = SameConv2d(hidden, norm_nc, kernel_size=3)
        self.mlp_beta = SameConv2d(hidden, norm_nc, kernel_size=3)
        self.norm_nc = norm_nc
        self._derived = DerivedTensors()

    def hidden(self, segmap: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """ReLU(mlp_shared(label map nearest-resized to ``size``))."""
        conv = self.mlp_shared[0]
        h, w = segmap.shape[2:]
        if (h, w) != tuple(size):
            segmap = F.interpolate(segmap, size=size, mode="nearest")
        return F.relu(conv2d_same(segmap, conv.weight, conv.bias))

    def modulate(self, normalized: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """normalized * (1 + gamma) + beta, with (1 + gamma) and beta from one convolution of the hidden map.

        Under reduced precision the result is in that type: it only feeds a convolution, which would round it to
        that type anyway (the product is computed in float32 and rounded once; ``normalized`` is rounded first).
        """
        weight, bias = self._derived.get("gamma_beta", (self.mlp_gamma.weight, self.mlp_gamma.bias,
                                                         self.mlp_beta.weight, self.mlp_beta.bias), self._gamma_beta)
        scale_shift = conv2d_same(hidden, weight, bias, low_precision_out=True)  # (B, 2 * norm_nc, H, W)
        normalized = normalized.to(scale_shift.dtype)  # mixed types would make float32 copies of both maps
        return torch.addcmul(scale_shift[:, self.norm_nc:], normalized, scale_shift[:, :self.norm_nc])

    def _gamma_beta(self):
        # the "1 +" of the scale is folded into gamma's bias
        return (torch.cat([self.mlp_gamma.weight, self.mlp_beta.weight], dim=0).contiguous(),
                torch.cat([self.mlp_gamma.bias + 1, self.mlp_beta.bias], dim=0))

    def forward(self, x: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
        return self.modulate(F.instance_norm(x, eps=1e-5), self.hidden(segmap, tuple(x.shape[2:])))


class SPADEResnetBlock(nn.Module):
    """Residual block of two SPADE -> LeakyReLU(0.2) -> spectral-norm conv stages (learned 1x1 shortcut if fin != fout).

    ``hidden``: optional precomputed SPADE hidden maps {"norm_0", "norm_1"[, "norm_s"]} at the block's resolution.
    ``upsample``: x is first nearest-upsampled by this factor (the decoder's up blocks). With a learned shortcut
    (on the fast path) x is normalised before it is up-sampled instead: nearest up-sampling repeats each value
    upsample^2 times, so the per-channel mean and variance are the same and the normalised map is the up-sampled
    normalised map (equal up to float rounding of the sums); x itself is not needed at the high resolution there.
    """

    def __init__(self, fin: int, fout: int, label_nc: int):
        super().__init__()
        self.learned_shortcut = fin != fout
        fmiddle = min(fin, fout)
        self.conv_0 = SpectralNormConv2d(fin, fmiddle, kernel_size=3)
        self.conv_1 = SpectralNormConv2d(fmiddle, fout, kernel_size=3)
        if self.learned_shortcut:
            self.conv_s = SpectralNormConv2d(fin, fout, kernel_size=1, bias=False)
        self.norm_0 = SPADE(fin, label_nc)
        self.norm_1 = SPADE(fmiddle, label_nc)
        if self.learned_shortcut:
            self.norm_s = SPADE(fin, label_nc)
        self._derived = DerivedTensors()

    def spades(self) -> dict[str, SPADE]:
        names = ("norm_0", "norm_1", "norm_s") if self.learned_shortcut else ("norm_0", "norm_1")
        return {name: getattr(self, name) for name in names}

    def forward(self, x: torch.Tensor, segmap: torch.Tensor, hidden: dict[str, torch.Tensor] | None = None,
                upsample: int = 1) -> torch.Tensor:
        if upsample > 1 and self.learned_shortcut and fast_paths_enabled() and not torch.is_grad_enabled():
            normalized = instance_norm(x)  # (B, fin, h, w), statistics of the up-sampled map
            low = low_precision_dtype(normalized)
            if low is not None:  # rounded at the low resolution: the up-sampling moves half the bytes
                normalized = normalized.to(low)
            normalized = F.interpolate(normalized, scale_factor=upsample, mode="nearest")  # (B, fin, H, W)
        else:
            if upsample > 1:
                x = F.interpolate(x, scale_factor=upsample, mode="nearest")
            normalized = instance_norm(x)  # shared by norm_0 and norm_s (same input)
        size = tuple(normalized.shape[2:])
        if hidden is None:
            hidden = {name: spade.hidden(segmap, size) for name, spade in self.spades().items()}
        if not self.learned_shortcut:
            shortcut = x
        elif fast_paths_enabled() and not torch.is_grad_enabled():
            shortcut = self._fast_learned_shortcut(normalized, hidden["norm_s"])
        else:
            shortcut = self.conv_s(self.norm_s.modulate(normalized, hidden["norm_s"]))
        dx = self.conv_0(F.leaky_relu_(self.norm_0.modulate(normalized, hidden["norm_0"]), 0.2))
        dx = self.conv_1(F.leaky_relu_(self.norm_1.modulate(instance_norm(dx), hidden["norm_1"]), 0.2))
        return dx.add_(shortcut)

    def _fast_learned_shortcut(self, normalized: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """conv_s(normalized * (1 + gamma_s) + beta_s) with the 1x1 conv_s folded into beta_s's 3x3 conv.

        conv_s is linear, so conv_s(beta_s) = conv(hidden, W_s @ W_beta) + W_s @ b_beta: a conv with fout outputs
        instead of fin (256 -> 64 channels at full resolution in up_1), one convolution shared with gamma_s.
        """
        weight, bias = self._derived.get("shortcut", (
            self.norm_s.mlp_gamma.weight, self.norm_s.mlp_gamma.bias, self.norm_s.mlp_beta.weight,
            self.norm_s.mlp_beta.bias, self.conv_s.weight_orig, self.conv_s.weight_u, self.conv_s.weight_v),
            self._shortcut_weights)
        fin = self.norm_s.norm_nc
        # (B, fin + fout, H, W): 1 + gamma_s, conv_s(beta_s); reduced precision: left in that type (promoted below)
        scale_shift = conv2d_same(hidden, weight, bias, low_precision_out=True)
        shortcut = self.conv_s(normalized.to(scale_shift.dtype) * scale_shift[:, :fin])
        return shortcut.add_(scale_shift[:, fin:])

    def _shortcut_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        spade = self.norm_s
        w_s = self.conv_s.effective_weight()[:, :, 0, 0]  # (fout, fin)
        beta_weight = torch.einsum("oc,chyx->ohyx", w_s, spade.mlp_beta.weight)  # (fout, hidden, 3, 3)
        beta_bias = w_s @ spade.mlp_beta.bias
        return (torch.cat([spade.mlp_gamma.weight, beta_weight], dim=0).contiguous(),
                torch.cat([spade.mlp_gamma.bias + 1, beta_bias], dim=0))
