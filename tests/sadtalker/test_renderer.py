"""Unit tests of the face renderer: layouts, fast paths vs reference computation, renderer data, streaming.

Tiny seeded networks keep these fast; faithfulness to the official networks is checked by the golden tests.
"""
from __future__ import annotations

import copy
import inspect
import platform
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sadtalker.facerender import (FaceRenderer, batch_layout, camera_pose_sequence, driving_coefficients,
                                  frame_to_uint8, gen_camera_pose, prepare_render_inputs, semantic_window)
from sadtalker.keypoints import degrees_from_bins, rotation_matrix, transform_keypoints
from sadtalker.cpu_memory import keep_freed_memory
from sadtalker.models import fast_conv
from sadtalker.models.blocks import DownBlock2d, DownBlock3d, SameBlock2d, UpBlock3d
from sadtalker.models.fast_conv import UpsampledConv3x3, conv2d_same, conv3d_same, reference_computation
from sadtalker.models.generator import OcclusionAwareSPADEGenerator
from sadtalker.models.head_pose_estimator import HeadPoseEstimator
from sadtalker.models.keypoint_detector import KeypointDetector
from sadtalker.models.mapping import HeadMotion, MappingNet
from sadtalker.synthetic import file_spec

NUM_KP = 5


# ---------------------------------------------------------------------------------------------------------------------
# official layouts


def _official_shapes(file_name: str, prefix: str = "", section: str | None = None) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for key, shape, key_section in file_spec(file_name):
        if section is not None:
            if key_section == section:
                shapes[key] = tuple(shape)
        elif key.startswith(prefix):
            shapes[key[len(prefix):]] = tuple(shape)
    return shapes


@pytest.mark.parametrize("build, file_name, prefix, section", [
    (KeypointDetector, "SadTalker_V0.0.2_256.safetensors", "kp_extractor.", None),
    (OcclusionAwareSPADEGenerator, "SadTalker_V0.0.2_256.safetensors", "generator.", None),
    (lambda: MappingNet(70), "mapping_00229-model.pth.tar", "", None),
    (lambda: MappingNet(73), "mapping_00109-model.pth.tar", "", None),
    (HeadPoseEstimator, "facevid2vid_00189-model.pth.tar", "", "he_estimator"),
])
def test_default_modules_have_the_official_keys_and_shapes(build, file_name, prefix, section):
    with torch.device("meta"):
        module = build()
    ours = {key: tuple(t.shape) for key, t in module.state_dict().items()}
    official = _official_shapes(file_name, prefix, section)
    assert sorted(set(ours) ^ set(official)) == []
    assert {k: v for k, v in ours.items() if official[k] != v} == {}


# ---------------------------------------------------------------------------------------------------------------------
# fast paths compute the reference result


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_upsampled_conv_equals_conv_of_nearest_upsampling(scale):
    g = torch.Generator().manual_seed(scale)
    x = torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64)
    weight = torch.randn(4, 5, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(4, generator=g, dtype=torch.float64)
    expected = F.conv2d(F.interpolate(x, scale_factor=scale, mode="nearest"), weight, bias, padding=1)
    ours = UpsampledConv3x3(weight, bias, scale)(x)
    assert ours.shape == expected.shape
    assert torch.allclose(ours, expected, rtol=0, atol=1e-12)


def test_fast_same_convolution_matches_plain_convolution():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 24, 20, generator=g)
    weight = torch.randn(8, 16, 3, 3, generator=g) / 12
    bias = torch.randn(8, generator=g)
    with torch.inference_mode():
        fast = conv2d_same(x, weight, bias)
        with reference_computation():
            plain = conv2d_same(x, weight, bias)
    expected = F.conv2d(x, weight, bias, padding=1)
    assert torch.equal(plain, expected)
    assert (fast - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.parametrize("kernel", [3, 7])
def test_fast_3d_convolution_matches_plain_convolution(kernel):
    g = torch.Generator().manual_seed(kernel)
    x = torch.randn(2, 64, 4, 64, 64, generator=g)  # wide enough for the slice-by-slice fast path
    weight = torch.randn(6, 64, kernel, kernel, kernel, generator=g) / (64 * kernel ** 3) ** 0.5
    bias = torch.randn(6, generator=g)
    with torch.inference_mode():
        fast = conv3d_same(x, weight, bias)
        expected = F.conv3d(x, weight, bias, padding=kernel // 2)
    assert fast.shape == expected.shape
    assert (fast - expected).abs().max() <= 1e-4 * expected.abs().max()


def small_bands(monkeypatch) -> None:
    """Winograd bands of ~200 kB with no least size: a test map spans several bands."""
    monkeypatch.setattr(fast_conv, "WINOGRAD_BAND_BYTES", 200_000)
    monkeypatch.setattr(fast_conv, "WINOGRAD_MIN_BAND_TILES", 1)


def conv_parameters(g: torch.Generator, c_in: int, c_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 3x3 convolution's weight (unit output variance) and bias."""
    return torch.randn(c_out, c_in, 3, 3, generator=g) / (9 * c_in) ** 0.5, torch.randn(c_out, generator=g)


@pytest.mark.parametrize("shape", [(1, 8, 24, 64, 72), (2, 8, 16, 58, 38)])
def test_winograd_convolution_in_bands_is_within_float32_rounding_of_float64(shape, monkeypatch):
    # (B, C_in, C_out, H, W): several bands of tile rows, sizes that are not whole tiles, a batch
    b, c_in, c_out, h, w = shape
    small_bands(monkeypatch)
    g = torch.Generator().manual_seed(h)
    x = torch.randn(b, c_in, h, w, generator=g)
    weight, bias = conv_parameters(g, c_in, c_out)
    assert 36 * 4 * max(c_in, c_out) * b * -(-h // 4) * -(-w // 4) > 2 * 200_000  # more than two bands
    with torch.inference_mode():
        ours = conv2d_same(x, weight, bias)
    expected = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    assert ours.shape == expected.shape and ours.is_contiguous()
    assert (ours - expected).abs().max() <= 2e-5 * expected.abs().max()


@pytest.mark.parametrize("shape", [(1, 8, 24, 64, 72), (2, 8, 16, 58, 38)])
def test_winograd_convolution_of_a_channels_last_slice_is_within_float32_rounding_of_float64(shape, monkeypatch):
    # the SPADE hidden maps: a channel slice of a channels-last map, read in place (channels innermost)
    b, c_in, c_out, h, w = shape
    small_bands(monkeypatch)
    g = torch.Generator().manual_seed(w)
    wide = torch.randn(b, 3 * c_in, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    x = wide[:, c_in:2 * c_in]
    assert x.stride(1) == 1 and not x.is_contiguous()
    weight, bias = conv_parameters(g, c_in, c_out)
    with torch.inference_mode():
        ours = conv2d_same(x, weight, bias, negative_slope=0.2)
    expected = F.leaky_relu(F.conv2d(x.double(), weight.double(), bias.double(), padding=1), 0.2)
    assert ours.shape == expected.shape and ours.is_contiguous()
    assert (ours - expected).abs().max() <= 2e-5 * expected.abs().max()


@pytest.mark.parametrize("shape", [(1, 16, 24, 6, 40, 36), (2, 8, 16, 3, 17, 16), (1, 32, 48, 5, 4, 4),
                                   (1, 24, 16, 4, 8, 6)])
def test_winograd_3d_convolution_is_within_float32_rounding_of_float64(shape, monkeypatch):
    # (B, C_in, C_out, D, H, W): the depth taps summed in the Winograd domain, zero-padded depth ends, bands,
    # maps of one tile and of a part tile (the hourglass's innermost levels)
    b, c_in, c_out, d, h, w = shape
    small_bands(monkeypatch)
    g = torch.Generator().manual_seed(d)
    x = torch.randn(b, c_in, d, h, w, generator=g)
    weight = torch.randn(c_out, c_in, 3, 3, 3, generator=g) / (27 * c_in) ** 0.5
    bias = torch.randn(c_out, generator=g)
    with torch.inference_mode():
        ours = conv3d_same(x, weight, bias)
    expected = F.conv3d(x.double(), weight.double(), bias.double(), padding=1)
    assert ours.shape == expected.shape and ours.is_contiguous()
    assert (ours - expected).abs().max() <= 2e-5 * expected.abs().max()


@pytest.mark.parametrize("build, shape", [
    (lambda: DownBlock3d(12, 20), (1, 12, 3, 16, 20)),
    (lambda: UpBlock3d(24, 16), (2, 24, 2, 4, 6)),
    (lambda: SameBlock2d(8, 24, lrelu=True), (2, 8, 20, 16)),
    (lambda: SameBlock2d(8, 24), (1, 8, 20, 16)),
    (lambda: DownBlock2d(6, 16), (1, 6, 24, 16)),
])
def test_batch_norm_folded_into_the_conv_with_fused_activation_matches_float64(build, shape):
    block = build().eval()
    g = torch.Generator().manual_seed(len(shape) * shape[1])
    with torch.no_grad():  # running statistics and affine parameters far from the identity
        block.norm.running_mean.copy_(torch.randn(block.norm.num_features, generator=g))
        block.norm.running_var.copy_(torch.rand(block.norm.num_features, generator=g) * 3 + 0.05)
        block.norm.weight.copy_(torch.randn(block.norm.num_features, generator=g))
        block.norm.bias.copy_(torch.randn(block.norm.num_features, generator=g))
    x = torch.randn(*shape, generator=g)
    with torch.inference_mode():
        ours = block(x)
        with reference_computation():
            expected = copy.deepcopy(block).double()(x.double())
    assert ours.shape == expected.shape and ours.dtype == torch.float32
    assert (ours - expected).abs().max() <= 2e-5 * expected.abs().max()
    leaky = isinstance(block, SameBlock2d) and block.lrelu
    assert bool((ours < 0).any()) == leaky and bool((ours == 0).any()) != leaky  # ReLU / LeakyReLU applied


def test_keep_freed_memory_takes_effect_with_glibc():
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert keep_freed_memory()


def test_channels_last_instance_norm_matches_and_keeps_the_layout():
    from sadtalker.models.blocks import instance_norm

    g = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 8, 12, 10, generator=g) * 3 + 30).contiguous(memory_format=torch.channels_last)
    ours = instance_norm(x)
    expected = F.instance_norm(x.double(), eps=1e-5)
    assert ours.is_contiguous(memory_format=torch.channels_last) and not ours.is_contiguous()
    assert (ours - expected).abs().max() < 1e-5


def _tiny_networks(seed: int = 0):
    torch.manual_seed(seed)
    kp = KeypointDetector(block_expansion=4, num_kp=NUM_KP, max_features=16, reshape_channel=64, reshape_depth=4,
                          num_blocks=2)
    generator = OcclusionAwareSPADEGenerator(
        feature_channel=4, num_kp=NUM_KP, block_expansion=8, max_features=32, num_down_blocks=2, reshape_channel=4,
        reshape_depth=8, num_resblocks=1,
        dense_motion_params=dict(block_expansion=4, max_features=16, num_blocks=2, reshape_depth=8, compress=2))
    mapping = MappingNet(70, descriptor_nc=16, num_kp=NUM_KP)
    mapping_still = MappingNet(73, descriptor_nc=16, num_kp=NUM_KP)
    for net in (kp, generator, mapping, mapping_still):
        for name, buffer in net.named_buffers():  # BatchNorm statistics away from the identity
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
        net.eval()
    return kp, generator, mapping, mapping_still


def _keypoints(batch: int, seed: int) -> torch.Tensor:
    return torch.rand(batch, NUM_KP, 3, generator=torch.Generator().manual_seed(seed)) * 1.6 - 0.8


def test_generator_split_and_fast_paths_match_the_reference_forward():
    _, generator, _, _ = _tiny_networks()
    source = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    kp_source, kp_driving = _keypoints(1, 4), _keypoints(3, 5)
    with torch.inference_mode():
        with reference_computation():
            reference = generator(source.expand(3, -1, -1, -1), kp_driving, kp_source.expand(3, -1, -1))
        features = generator.encode_source(source)  # once, batch 1, reused for the 3 frames
        out = generator.animate(features, kp_source.expand(3, -1, -1), kp_driving, with_motion=True)
    assert out.prediction.shape == (3, 3, 32, 32)
    assert out.deformation.shape == (3, 8, 8, 8, 3) and out.occlusion_map.shape == (3, 1, 8, 8)
    assert out.mask.shape == (3, NUM_KP + 1, 8, 8, 8)
    assert (out.prediction - reference.prediction).abs().max() < 1e-4
    assert (out.deformation - reference.deformation).abs().max() < 1e-5
    # the frames differ from each other: the driving keypoints matter
    assert (out.prediction[0] - out.prediction[1]).abs().max() > 1e-3


def test_derived_weights_follow_in_place_weight_changes():
    _, generator, _, _ = _tiny_networks()
    source = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    kp = _keypoints(1, 4)
    with torch.inference_mode():
        before = generator(source, kp, kp).prediction
    with torch.no_grad():
        generator.decoder.G_middle_0.conv_0.weight_orig.mul_(3.0)
        generator.decoder.up_1.norm_0.mlp_shared[0].weight.mul_(-1.0)
        generator.decoder.G_middle_2.norm_1.mlp_gamma.bias.add_(0.5)
    with torch.inference_mode():
        after = generator(source, kp, kp).prediction
        with reference_computation():
            reference = generator(source, kp, kp).prediction
    assert (after - before).abs().max() > 1e-3
    assert (after - reference).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# keypoint transformation


def test_degrees_from_bins_and_rotation():
    logits = torch.full((2, 66), -1e4)
    logits[0, 33] = 0.0  # all mass on bin 33 -> 33*3 - 99 = 0 degrees
    logits[1, 40] = 0.0  # 21 degrees
    assert torch.allclose(degrees_from_bins(logits), torch.tensor([0.0, 21.0]))
    rot = rotation_matrix(torch.tensor([30.0]), torch.tensor([-20.0]), torch.tensor([10.0]))
    assert torch.allclose(rot[0] @ rot[0].T, torch.eye(3), atol=1e-6)
    # yaw alone rotates about y with 3.14 as pi: x -> (cos a, 0, -sin a)
    a = 90.0 / 180 * 3.14
    yaw_only = rotation_matrix(torch.tensor([90.0]), torch.tensor([0.0]), torch.tensor([0.0]))[0]
    assert torch.allclose(yaw_only[:, 0], torch.tensor([np.cos(a), 0.0, -np.sin(a)], dtype=torch.float32), atol=1e-7)


def test_transform_keypoints_uses_only_ty_and_leaves_inputs_alone():
    g = torch.Generator().manual_seed(0)
    motion = HeadMotion(*(torch.randn(2, n, generator=g) for n in (66, 66, 66, 3, 3 * NUM_KP)))
    saved = [t.clone() for t in motion]
    canonical = torch.randn(2, NUM_KP, 3, generator=g)
    posed = transform_keypoints(canonical, motion)
    for before, after in zip(saved, motion):
        assert torch.equal(before, after)
    shifted = motion._replace(t=motion.t + torch.tensor([5.0, 0.0, 7.0]))  # t_x, t_z ignored
    assert torch.allclose(transform_keypoints(canonical, shifted), posed)
    lifted = motion._replace(t=motion.t + torch.tensor([0.0, 1.0, 0.0]))
    up = torch.tensor([0.0, 1.0, 0.0]).expand(2, NUM_KP, 3)
    assert torch.allclose(transform_keypoints(canonical, lifted) - posed, up, atol=1e-6)
    overridden = transform_keypoints(canonical, motion, yaw=torch.tensor([10.0, -5.0]))
    assert not torch.allclose(overridden, posed)


# ---------------------------------------------------------------------------------------------------------------------
# renderer data


def test_camera_pose_sequences():
    assert camera_pose_sequence([7], 4).tolist() == [7, 7, 7, 7]
    assert camera_pose_sequence([0, 25, -10], 7).tolist() == [0, 10, 20, 25, 15, 5, -5]
    assert camera_pose_sequence([0, 10], 3).tolist() == [0, 5, 5]  # short path padded with its last value
    assert camera_pose_sequence([5, 5, 15], 3).tolist() == [5, 10, 10]  # repeated value: no division by zero
    assert camera_pose_sequence([3, 9], 1).tolist() == [3]
    assert gen_camera_pose([0, 25, -10], 7, 3).shape == (3, 3)
    assert gen_camera_pose([0, 25, -10], 7, 3).reshape(-1)[7:].tolist() == [-5, -5]


def test_windows_batch_layout_and_coefficients():
    coeffs = np.arange(5 * 2, dtype=np.float32).reshape(5, 2)
    window = semantic_window(coeffs, 1)
    assert window.shape == (2, 27)
    assert window[0, :14].tolist() == [0.0] * 13 + [2.0] and window[0, -1] == 8.0  # clamped at both ends
    layout = batch_layout(np.arange(5), 2)
    assert layout.tolist() == [[0, 1, 2], [3, 4, 4]]

    generated = np.ones((3, 70), dtype=np.float32)
    source = np.arange(73, dtype=np.float32)
    crop = driving_coefficients(generated, source[:70], "crop", expression_scale=2.0)
    assert crop.shape == (3, 70) and np.all(crop[:, :64] == 2.0) and np.all(crop[:, 64:] == 1.0)
    full_still = driving_coefficients(generated, source, "extfull", still=True, expression_scale=0.5)
    assert full_still.shape == (3, 73) and np.all(full_still[:, :64] == 0.5)
    assert np.all(full_still[:, 64:] == source[64:])
    assert np.all(generated == 1.0)  # input untouched


def test_prepare_render_inputs_rejects_bad_shapes():
    photo = np.zeros((32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="generated coefficients"):
        prepare_render_inputs(photo, np.zeros((1, 73)), np.zeros((4, 10)))
    with pytest.raises(ValueError, match="source crop"):
        prepare_render_inputs(np.zeros((32, 32)), np.zeros((1, 73)), np.zeros((4, 70)))
    with pytest.raises(ValueError, match="73 values"):
        prepare_render_inputs(photo, np.zeros((1, 70)), np.zeros((4, 70)), preprocess="full")


# ---------------------------------------------------------------------------------------------------------------------
# the renderer streams frames in video order


def _clip(frames: int = 5, preprocess: str = "crop", **options):
    rng = np.random.default_rng(7)
    photo = (rng.random((40, 40, 3)) * 255).astype(np.uint8)  # resized to 32 like a crop of another size
    source = np.concatenate([rng.normal(0, 0.6, 64), rng.normal(0, 0.15, 6), [1.1, 120.0, 130.0]])[None]
    generated = np.concatenate([rng.normal(0, 0.6, (frames, 64)), rng.normal(0, 0.15, (frames, 6))], axis=1)
    return prepare_render_inputs(photo, source, generated, preprocess=preprocess, size=32, **options)


def test_renderer_yields_frames_one_at_a_time_in_video_order():
    kp, generator, mapping, mapping_still = _tiny_networks()
    renderer = FaceRenderer(kp, generator, mapping, mapping_still)
    inputs = _clip(5, input_yaw=[-10, 10])
    driven = []
    animate = generator.animate

    def recording_animate(features, kp_source, kp_driving, with_motion=False):
        driven.append(kp_driving.clone())
        return animate(features, kp_source, kp_driving, with_motion)

    generator.animate = recording_animate
    stream = renderer.frames(inputs, batch_size=2)
    assert inspect.isgenerator(stream)
    first = next(stream)
    assert first.shape == (32, 32, 3) and first.dtype == np.float32
    assert len(driven) == 1  # only the first batch of 2 has been rendered so far
    frames = [first, *stream]
    assert len(frames) == 5 and all(0 <= f.min() and f.max() <= 1 for f in frames)

    # the keypoint-only path gives exactly the keypoints the generator was driven by
    keypoints = renderer.keypoints(inputs, batch_size=2)
    assert keypoints.driving.shape == (5, NUM_KP, 3) and keypoints.source.shape == (NUM_KP, 3)
    assert np.array_equal(torch.cat(driven).numpy(), keypoints.driving)
    fast = renderer.keypoints(inputs)  # MappingNet on larger chunks: equal up to float rounding
    assert np.allclose(fast.driving, keypoints.driving, atol=1e-5) and np.allclose(fast.source, keypoints.source,
                                                                                  atol=1e-5)

    # one frame at a time gives the same video; so does starting in the middle
    generator.animate = animate
    single = list(renderer.frames(inputs, batch_size=1))
    assert max(float(np.abs(a - b).max()) for a, b in zip(frames, single)) < 1e-4
    tail = list(renderer.frames(inputs, batch_size=1, start=3))
    assert len(tail) == 2 and np.allclose(tail[0], single[3], atol=1e-6)
    assert frame_to_uint8(single[0]).dtype == np.uint8


def test_renderer_workers_render_side_by_side_in_order_and_restore_threads():
    kp, generator, mapping, mapping_still = _tiny_networks()
    renderer = FaceRenderer(kp, generator, mapping, mapping_still)
    inputs = _clip(7, input_yaw=[-10, 10])
    threads = torch.get_num_threads()
    single = list(renderer.frames(inputs, batch_size=1))
    for batch_size in (1, 2):
        side_by_side = list(renderer.frames(inputs, batch_size=batch_size, workers=3))
        assert len(side_by_side) == 7
        assert max(float(np.abs(a - b).max()) for a, b in zip(single, side_by_side)) < 1e-4  # same order, same video
    assert torch.get_num_threads() == threads

    stream = renderer.frames(inputs, workers=2)
    next(stream)
    stream.close()  # cancel with frames in flight
    assert torch.get_num_threads() == threads
    with pytest.raises(ValueError, match="workers"):
        next(renderer.frames(inputs, workers=0))


def test_renderer_uses_the_73_channel_mapping_for_full():
    kp, generator, mapping, mapping_still = _tiny_networks()
    inputs = _clip(3, preprocess="full", still=True)
    assert inputs.channels == 73
    frames = list(FaceRenderer(kp, generator, mapping, mapping_still).frames(inputs))
    assert len(frames) == 3
    with pytest.raises(ValueError, match="no MappingNet for 73"):
        next(FaceRenderer(kp, generator, mapping).frames(inputs))


@pytest.mark.parametrize("precision", [torch.bfloat16, torch.float16])
def test_reduced_precision_renders_close_to_float32_and_keeps_the_networks_float32(precision):
    kp, generator, mapping, mapping_still = _tiny_networks()
    inputs = _clip(3, input_yaw=[-10, 10])
    exact = np.stack(list(FaceRenderer(kp, generator, mapping, mapping_still).frames(inputs)))
    reduced = np.stack(list(FaceRenderer(kp, generator, mapping, mapping_still, precision=precision).frames(inputs)))
    error = np.abs(reduced - exact) / np.abs(exact).max()
    assert reduced.dtype == np.float32 and error.mean() < 1e-2, error.mean()  # ~a grey level, as on real weights
    assert error.mean() > 0  # the convolutions really ran in reduced precision
    assert all(p.dtype == torch.float32 for net in (kp, generator, mapping) for p in net.parameters())
    with pytest.raises(ValueError, match="precision"):
        FaceRenderer(kp, generator, mapping, precision=torch.float64)
