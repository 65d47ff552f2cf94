"""Occlusion-aware SPADE generator: the face renderer's image synthesis network.

The source image is encoded into a 3-D appearance feature volume (2-D encoder, lifted to 32 x 16 x 64 x 64 for a 256
input, refined by 3-D residual blocks). Per frame, the dense motion network turns source/driving keypoints into a
deformation of that volume and an occlusion map; the warped volume is flattened back to 2-D, masked by the
occlusion map and decoded to an image by a SPADE decoder that uses the warped features both as input and as its
label map.

The source-only half (``encode_source``) depends on nothing that changes between frames, so a clip encodes it once
and calls ``animate`` per frame; ``forward`` is the reference one-shot computation.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import DownBlock2d, ResBlock3d, SameBlock2d, SPADEResnetBlock
from .fast_conv import (DerivedTensors, SameConv2d, UpsampledConv3x3, conv2d_same, conv_precision, fast_paths_enabled,
                        low_precision_layout)
from .dense_motion import DenseMotionNetwork

DENSE_MOTION_PARAMS = dict(block_expansion=32, max_features=1024, num_blocks=5, reshape_depth=16, compress=4)


class SourceFeatures(NamedTuple):
    """What the generator needs from the source image, computed once per clip."""

    volume: torch.Tensor  # (B, 32, 16, H/4, W/4) appearance feature volume after the 3-D res-blocks
    compressed: torch.Tensor  # (B, 4, 16, H/4, W/4) its compressed copy used by the dense motion network


class GeneratorOutput(NamedTuple):
    prediction: torch.Tensor  # (B, 3, H, W) image in (0, 1)
    occlusion_map: torch.Tensor  # (B, 1, H/4, W/4)
    deformation: torch.Tensor  # (B, 16, H/4, W/4, 3)
    mask: torch.Tensor  # (B, 16, 16, H/4, W/4)


class SPADEDecoder(nn.Module):
    """256-channel warped features (also the SPADE label map) -> RGB image at 4x the resolution.

    Every SPADE's first convolution depends on the label map only, so all of them run up front, merged into one
    convolution per resolution (the up-sampled ones on the low-resolution map, see ``UpsampledConv3x3``).
    """

    def __init__(self, in_channels: int = 256, out_channels: int = 64):
        super().__init__()
        wide = 2 * in_channels
        self.fc = SameConv2d(in_channels, wide, kernel_size=3)
        for i in range(6):
            setattr(self, f"G_middle_{i}", SPADEResnetBlock(wide, wide, label_nc=in_channels))
        self.up_0 = SPADEResnetBlock(wide, in_channels, label_nc=in_channels)
        self.up_1 = SPADEResnetBlock(in_channels, out_channels, label_nc=in_channels)
        self.conv_img = SameConv2d(out_channels, 3, kernel_size=3)
        self._derived = DerivedTensors()

    def stages(self) -> list[tuple[SPADEResnetBlock, int]]:
        """(block, up-sampling of its input relative to the label map), in order."""
        return [(getattr(self, f"G_middle_{i}"), 1) for i in range(6)] + [(self.up_0, 2), (self.up_1, 4)]

    def _merged_hidden_convs(self) -> dict[int, tuple[list[tuple[int, str, int]], object]]:
        """Per scale: [(stage index, SPADE name, channels)] and one conv (weights, bias) / UpsampledConv3x3 for all."""
        merged = {}
        for scale in (1, 2, 4):
            parts, weights, biases = [], [], []
            for index, (block, block_scale) in enumerate(self.stages()):
                if block_scale != scale:
                    continue
                for name, spade in block.spades().items():
                    conv = spade.mlp_shared[0]
                    parts.append((index, name, conv.out_channels))
                    weights.append(conv.weight)
                    biases.append(conv.bias)
            weight, bias = torch.cat(weights, dim=0).contiguous(), torch.cat(biases, dim=0)
            merged[scale] = (parts, (weight, bias) if scale == 1 else UpsampledConv3x3(weight, bias, scale))
        return merged

    def hidden_maps(self, segmap: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Every SPADE's hidden map ReLU(mlp_shared(label map at the block's resolution)), per stage."""
        sources = tuple(t for block, _ in self.stages() for spade in block.spades().values()
                        for t in (spade.mlp_shared[0].weight, spade.mlp_shared[0].bias))
        merged = self._derived.get("hidden_convs", sources, self._merged_hidden_convs)
        maps: list[dict[str, torch.Tensor]] = [{} for _ in self.stages()]
        for scale, (parts, conv) in merged.items():
            # (B, sum(channels), sH, sW); reduced precision: left in that type (only convolutions read them)
            # (ReLU in place: a fresh map of this size would cost as much again in page faults)
            hidden = (conv2d_same(segmap, *conv, low_precision_out=True, negative_slope=0.0) if scale == 1
                      else F.relu_(conv(segmap, low_precision_out=True)))
            start = 0
            for index, name, channels in parts:
                maps[index][name] = hidden[:, start:start + channels]
                start += channels
        return maps

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        segmap = low_precision_layout(feature)  # (B, 256, h, w)
        hidden = self.hidden_maps(segmap) if fast_paths_enabled() else [None] * len(self.stages())
        x = self.fc(feature)  # (B, 512, h, w)
        for index, (block, scale) in enumerate(self.stages()):
            x = block(x, segmap, hidden[index], upsample=2 if scale > 1 else 1)  # up_0, up_1 double the resolution
        # x: (B, 64, 4h, 4w)
        return torch.sigmoid(self.conv_img(F.leaky_relu(x, 0.2)))


class OcclusionAwareSPADEGenerator(nn.Module):
    def __init__(self, image_channel: int = 3, feature_channel: int = 32, num_kp: int = 15, block_expansion: int = 64,
                 max_features: int = 512, num_down_blocks: int = 2, reshape_channel: int = 32, reshape_depth: int = 16,
                 num_resblocks: int = 6, estimate_occlusion_map: bool = True, dense_motion_params: dict | None = None):
        super().__init__()
        params = DENSE_MOTION_PARAMS if dense_motion_params is None else dense_motion_params
        self.dense_motion_network = DenseMotionNetwork(num_kp=num_kp, feature_channel=feature_channel,
                                                       estimate_occlusion_map=estimate_occlusion_map, **params)
        self.first = SameBlock2d(image_channel, block_expansion, kernel_size=3)
        blocks = []
        for i in range(num_down_blocks):
            blocks.append(DownBlock2d(min(max_features, block_expansion * 2 ** i),
                                      min(max_features, block_expansion * 2 ** (i + 1))))
        self.down_blocks = nn.ModuleList(blocks)
        self.second = nn.Conv2d(min(max_features, block_expansion * 2 ** num_down_blocks), max_features, kernel_size=1)
        self.reshape_channel = reshape_channel
        self.reshape_depth = reshape_depth
        self.resblocks_3d = nn.Sequential()
        for i in range(num_resblocks):
            self.resblocks_3d.add_module(f"3dr{i}", ResBlock3d(reshape_channel, kernel_size=3))
        decoder_in = block_expansion * 2 ** num_down_blocks
        self.third = SameBlock2d(max_features, decoder_in, kernel_size=3, lrelu=True)
        self.fourth = SameConv2d(decoder_in, decoder_in, kernel_size=1)
        self.decoder = SPADEDecoder(in_channels=decoder_in)

    def encode_source(self, source_image: torch.Tensor) -> SourceFeatures:
        """(B, 3, H, W) RGB in [0, 1] -> the source feature volume (and its compressed copy)."""
        out = self.first(source_image)  # (B, 64, H, W)
        for block in self.down_blocks:
            out = block(out)  # -> (B, 128, H/2, W/2) -> (B, 256, H/4, W/4)
        out = self.second(out)  # (B, 512, h, w)
        b, c, h, w = out.shape
        volume = out.view(b, self.reshape_channel, self.reshape_depth, h, w)  # (B, 32, 16, h, w)
        volume = self.resblocks_3d(volume)
        return SourceFeatures(volume=volume, compressed=self.dense_motion_network.compress_source(volume))

    def animate(self, source: SourceFeatures, kp_source: torch.Tensor, kp_driving: torch.Tensor,
                with_motion: bool = False):
        """One image per driving pose: keypoints (B, K, 3); ``source`` from ``encode_source`` (batch 1 or B).

        Returns the (B, 3, H, W) prediction, or a GeneratorOutput when ``with_motion``.
        """
        motion = self.dense_motion_network.motion(source.compressed, kp_driving, kp_source)
        b = kp_driving.shape[0]
        volume = source.volume.expand(b, -1, -1, -1, -1)
        warped = F.grid_sample(volume, motion.deformation, align_corners=False)  # (B, 32, 16, h, w)
        _, c, d, h, w = warped.shape
        with conv_precision(None):  # the decoder's input and every SPADE's label map: kept float32 (cheap here)
            out = self.fourth(self.third(warped.reshape(b, c * d, h, w)))  # (B, 512, h, w) -> (B, 256, h, w)
        occlusion_map = motion.occlusion_map
        if occlusion_map is not None:
            if occlusion_map.shape[2:] != out.shape[2:]:
                occlusion_map = F.interpolate(occlusion_map, size=out.shape[2:], mode="bilinear", align_corners=False)
            out = out * occlusion_map
        prediction = self.decoder(out)
        if with_motion:
            return GeneratorOutput(prediction=prediction, occlusion_map=motion.occlusion_map,
                                   deformation=motion.deformation, mask=motion.mask)
        return prediction

    def forward(self, source_image: torch.Tensor, kp_driving: torch.Tensor, kp_source: torch.Tensor) -> GeneratorOutput:
        """The reference call: source image (B, 3, H, W), driving and source keypoints (B, K, 3)."""
        return self.animate(self.encode_source(source_image), kp_source, kp_driving, with_motion=True)
