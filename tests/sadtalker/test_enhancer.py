"""Face enhancer around spandrel, on synthetic weights in the official file layouts (no real checkpoints)."""
from __future__ import annotations

import copy
import os

import cv2
import numpy as np
import pytest
import torch

from sadtalker.enhancer import (FACE_TEMPLATE, BackgroundUpsampler, EnhancerWeightsMissing, FaceEnhancer,
                                five_points, load_enhancer, try_load_enhancer)
from core.errors import CheckpointError
from sadtalker.synthetic import cached_synthetic_gfpgan, seeded_state_dict, synthetic_face_frame as face_frame


def small_restoreformer_shapes() -> dict[str, torch.Size]:
    """A narrow RestoreFormer (32 channels instead of 64; spandrel reads widths from the shapes)."""
    from spandrel.architectures.RestoreFormer import RestoreFormer

    with torch.device("meta"):
        model = RestoreFormer(n_embed=32, embed_dim=32, ch=32, out_ch=3, ch_mult=(1, 2, 2, 4, 4, 8), num_res_blocks=1,
                              attn_resolutions=(16,), dropout=0.0, in_channels=3, resolution=512, z_channels=32,
                              double_z=False, enable_mid=True, head_size=8)
    return {key: value.shape for key, value in model.state_dict().items()}


def realesrgan_shapes(num_feat: int = 8, num_block: int = 1, upconvs: int = 2) -> dict[str, torch.Size]:
    """Real-ESRGAN's RRDBNet keys (basicsr naming, as in RealESRGAN_x2plus.pth) for a tiny network.

    x2plus = pixel-unshuffle by 2 (12 input channels) + two x2 up-convolutions; growth channels are 32.
    """
    grow = 32
    shapes = {"conv_first.weight": (num_feat, 12, 3, 3), "conv_first.bias": (num_feat,)}
    for block in range(num_block):
        for rdb in (1, 2, 3):
            for conv in range(1, 6):
                out = num_feat if conv == 5 else grow
                prefix = f"body.{block}.rdb{rdb}.conv{conv}"
                shapes[f"{prefix}.weight"] = (out, num_feat + (conv - 1) * grow, 3, 3)
                shapes[f"{prefix}.bias"] = (out,)
    names = ["conv_body"] + [f"conv_up{i}" for i in range(1, upconvs + 1)] + ["conv_hr"]
    for name in names:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (num_feat, num_feat, 3, 3), (num_feat,)
    shapes["conv_last.weight"], shapes["conv_last.bias"] = (3, num_feat, 3, 3), (3,)
    return {key: torch.Size(shape) for key, shape in shapes.items()}


@pytest.fixture(scope="module")
def gfpgan_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gfpgan_checkpoints")
    os.symlink(cached_synthetic_gfpgan(), folder / "GFPGANv1.4.pth")
    return str(folder)


@pytest.fixture(scope="module")
def gfpgan(gfpgan_dir):
    return load_enhancer("gfpgan", gfpgan_dir)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    """RestoreFormer (narrow) and RealESRGAN x2 (tiny) files."""
    folder = tmp_path_factory.mktemp("small_checkpoints")
    torch.save({"params_ema": seeded_state_dict(small_restoreformer_shapes(), seed=5)}, folder / "RestoreFormer.pth")
    torch.save({"params_ema": seeded_state_dict(realesrgan_shapes(), seed=2)}, folder / "RealESRGAN_x2plus.pth")
    return str(folder)


def test_gfpgan_v14_file_loads_through_spandrel(gfpgan, gfpgan_dir):
    from spandrel.architectures.GFPGAN import GFPGAN

    assert isinstance(gfpgan, FaceEnhancer) and gfpgan.architecture == "GFPGAN"
    assert isinstance(gfpgan.model, GFPGAN) and not gfpgan.model.training
    stored = torch.load(os.path.join(gfpgan_dir, "GFPGANv1.4.pth"), weights_only=True)["params_ema"]
    loaded = gfpgan.model.state_dict()
    assert loaded.keys() == stored.keys()
    for key in ("conv_body_first.weight", "stylegan_decoder.style_mlp.1.weight", "toRGB.0.weight"):
        assert torch.equal(loaded[key], stored[key])


def test_gfpgan_restores_the_face_and_keeps_the_rest(gfpgan):
    frame, lm = face_frame()
    out = gfpgan.enhance(frame, lm)
    assert out.shape == (512, 512, 3) and out.dtype == np.uint8
    upscaled = cv2.resize(frame, (512, 512), interpolation=cv2.INTER_LANCZOS4)
    changed = np.any(out != upscaled, axis=2)
    # the face square (about 4 eye distances wide, x2 upscale) is replaced; the frame's border is untouched
    assert changed[:40].sum() == 0 and changed[-40:].sum() == 0 and changed[:, :40].sum() == 0
    assert changed[:, -40:].sum() == 0
    eyes_mouth = (five_points(lm) * 2 + 0.5).astype(int)
    for x, y in eyes_mouth:
        assert changed[y, x]
    centre = np.abs(out[200:320, 200:320].astype(int) - upscaled[200:320, 200:320]).mean()
    assert centre > 10  # random weights: the restored face differs a lot from the input


@pytest.mark.parametrize("upscale", [2, 1])
def test_alignment_and_paste_geometry(gfpgan, upscale):
    """With the network replaced by identity, the warp and its inverse must give back the (upscaled) frame."""
    frame, lm = face_frame()
    identity = copy.copy(gfpgan)
    identity.restore_face = lambda face: face  # geometry only; the real network runs in the test above
    identity.upscale = upscale
    identity._geometries = {}
    size = 256 * upscale
    geometry = identity._geometry(np.asarray(lm, dtype=np.float64), frame.shape[:2])
    mapped = cv2.transform(five_points(lm)[None], geometry.affine)[0]
    assert np.abs(mapped - FACE_TEMPLATE).max() < 0.5  # the five points land on the FFHQ template
    aligned = cv2.warpAffine(frame, geometry.affine, (512, 512))
    assert aligned[240, 193].tolist() == pytest.approx([40, 30, 30], abs=25)  # template left eye is an eye
    out = identity.enhance(frame, lm)
    assert out.shape == (size, size, 3)
    upscaled = frame if upscale == 1 else cv2.resize(frame, (size, size), interpolation=cv2.INTER_LANCZOS4)
    x0, y0, x1, y1 = geometry.window
    assert 0 < x0 < x1 < size and 0 < y0 < y1 < size
    difference = np.abs(out[y0:y1, x0:x1].astype(int) - upscaled[y0:y1, x0:x1])
    assert difference.mean() < 4  # only resampling differs: the face is put back exactly where it was


def test_restoreformer_with_realesrgan_background(small_dir):
    enhancer = load_enhancer("RestoreFormer", small_dir, background="realesrgan")
    assert enhancer.architecture == "RestoreFormer" and isinstance(enhancer.background, BackgroundUpsampler)
    assert enhancer.background.scale == 2
    frame, lm = face_frame()
    out = enhancer.enhance(frame, lm)
    assert out.shape == (512, 512, 3) and out.dtype == np.uint8
    background = enhancer.background(frame, outscale=2)
    assert background.shape == (512, 512, 3)
    changed = np.any(out != background, axis=2)
    assert changed[:40].sum() == 0 and changed[:, -40:].sum() == 0  # outside the face: the RealESRGAN frame
    assert np.abs(out[200:320, 200:320].astype(int) - background[200:320, 200:320]).mean() > 10


def test_background_upsampler_tiles_like_realesrganer(small_dir):
    enhancer = load_enhancer("RestoreFormer", small_dir, background="realesrgan")
    upsampler = enhancer.background
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)  # odd sizes: reflected to even, cropped back
    out = upsampler(small, outscale=2)
    assert out.shape == (74, 106, 3)
    with torch.inference_mode():
        x = torch.from_numpy(small).permute(2, 0, 1)[None].float() / 255
        x = torch.nn.functional.pad(x, (0, 1, 0, 1), mode="reflect")
        direct = upsampler.model(x)[:, :, :74, :106].clamp(0, 1)
    expected = (direct * 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(out, expected)
    wide = rng.integers(0, 256, (24, 430, 3), dtype=np.uint8)  # two tiles of at most 400 px, 10 px overlap
    tiled = upsampler(wide, outscale=2)
    assert tiled.shape == (48, 860, 3)
    with torch.inference_mode():
        whole = upsampler.model(torch.from_numpy(wide).permute(2, 0, 1)[None].float() / 255).clamp(0, 1)
    whole = (whole * 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    # tiles are stitched at the right places: equal to one pass up to float rounding (other conv algorithms)
    assert np.abs(tiled.astype(int) - whole).max() <= 1
    assert upsampler(wide, outscale=1).shape == (24, 430, 3)  # official: Lanczos down to outscale


def test_missing_weights_message_and_fallback(tmp_path, small_dir):
    with pytest.raises(EnhancerWeightsMissing) as caught:
        load_enhancer("gfpgan", str(tmp_path))
    message = str(caught.value)
    assert "GFPGANv1.4.pth" in message and str(tmp_path) in message
    assert "curl -L -o" in message and "releases/download/v1.3.0/GFPGANv1.4.pth" in message
    assert isinstance(caught.value, CheckpointError)

    enhancer, warnings = try_load_enhancer("gfpgan", str(tmp_path))
    assert enhancer is None and len(warnings) == 1 and "without face enhancement" in warnings[0]
    # face weights present, background weights missing: enhance the face, warn about the background
    os.symlink(os.path.join(small_dir, "RestoreFormer.pth"), tmp_path / "RestoreFormer.pth")
    enhancer, warnings = try_load_enhancer("RestoreFormer", str(tmp_path), background="realesrgan")
    assert enhancer is not None and enhancer.background is None
    assert len(warnings) == 1 and "RealESRGAN_x2plus.pth" in warnings[0] and "background" in warnings[0]
    assert try_load_enhancer(None, str(tmp_path)) == (None, [])
    # the official download script's folder is found too
    (tmp_path / "gfpgan" / "weights").mkdir(parents=True)
    os.symlink(os.path.join(small_dir, "RealESRGAN_x2plus.pth"),
               tmp_path / "gfpgan" / "weights" / "RealESRGAN_x2plus.pth")
    enhancer, warnings = try_load_enhancer("RestoreFormer", str(tmp_path), background="realesrgan")
    assert enhancer.background is not None and warnings == []


def test_damaged_or_wrong_files_give_a_clear_error(tmp_path, small_dir):
    source = os.path.join(small_dir, "RestoreFormer.pth")
    with open(source, "rb") as handle:
        data = handle.read()
    (tmp_path / "RestoreFormer.pth").write_bytes(data[: len(data) // 3])  # truncated download
    with pytest.raises(CheckpointError, match=r"RestoreFormer\.pth.*download it again"):
        load_enhancer("RestoreFormer", str(tmp_path))
    (tmp_path / "RestoreFormer.pth").write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(CheckpointError, match="download it again"):
        try_load_enhancer("RestoreFormer", str(tmp_path))  # damaged files are errors even in try_load
    # a different model under the expected name
    os.replace(tmp_path / "RestoreFormer.pth", tmp_path / "unused")
    os.symlink(os.path.join(small_dir, "RealESRGAN_x2plus.pth"), tmp_path / "GFPGANv1.4.pth")
    with pytest.raises(CheckpointError, match="holds a ESRGAN model, not GFPGAN"):
        load_enhancer("gfpgan", str(tmp_path))
    # a x4 ESRGAN where the x2 background model belongs (three up-convolutions + unshuffle 2 = x4)
    os.symlink(source, tmp_path / "RestoreFormer.pth")
    torch.save({"params_ema": seeded_state_dict(realesrgan_shapes(upconvs=3), seed=3)},
               tmp_path / "RealESRGAN_x2plus.pth")
    with pytest.raises(CheckpointError, match="x4 ESRGAN"):
        load_enhancer("RestoreFormer", str(tmp_path), background="realesrgan")
    # a state dict of the right architecture with a wrong shape
    state = seeded_state_dict(small_restoreformer_shapes(), seed=5)
    state["decoder.conv_out.weight"] = state["decoder.conv_out.weight"][:, :16]
    os.remove(tmp_path / "RestoreFormer.pth")
    torch.save({"params_ema": state}, tmp_path / "RestoreFormer.pth")
    with pytest.raises(CheckpointError, match="RestoreFormer.pth"):
        load_enhancer("RestoreFormer", str(tmp_path))


def test_five_points_and_tiny_faces(small_dir):
    lm = np.zeros((68, 2))
    lm[36:42], lm[42:48], lm[30], lm[48], lm[54] = (10, 20), (30, 20), (20, 30), (12, 40), (28, 40)
    np.testing.assert_array_equal(five_points(lm), [[10, 20], [30, 20], [20, 30], [12, 40], [28, 40]])
    with pytest.raises(ValueError, match="68"):
        five_points(lm[:10])
    enhancer = load_enhancer("RestoreFormer", small_dir)
    frame = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    tiny = lm * 0.1  # eyes 2 px apart: GFPGANer leaves such faces alone
    np.testing.assert_array_equal(enhancer.enhance(frame, tiny),
                                  cv2.resize(frame, (128, 128), interpolation=cv2.INTER_LANCZOS4))
