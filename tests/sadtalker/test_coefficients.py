"""Audio -> coefficients: blinks, reference rows, smoothing, ref pose, seeded noise, edge lengths.

The golden case ``audio2coeff_generate`` pins the official numbers; these tests cover the options and edge cases.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from sadtalker import coefficients as co
from sadtalker import mel
from sadtalker.checkpoints import load_networks
from core.errors import InputError
from sadtalker.models.audio2pose import num_noise_draws
from sadtalker.synthetic import cached_official_layout as synthetic_checkpoint_dir


@pytest.fixture(scope="module")
def audio_nets():
    return load_networks(synthetic_checkpoint_dir(legacy=False), parts=["audio2exp", "audio2pose"])


def _official_blinks(num_frames: int, rng: random.Random) -> np.ndarray:
    """The schedule as the reference README describes it (independent transcription for comparison)."""
    ratio = np.zeros((num_frames, 1))
    if num_frames <= 20:
        return ratio
    frame_id = 0
    while frame_id in range(num_frames):
        start = rng.choice(range(min(10, num_frames), min(int(num_frames / 2), 70)))
        if frame_id + start + 5 <= num_frames - 1:
            ratio[frame_id + start:frame_id + start + 5, 0] = [0.5, 0.9, 1.0, 0.9, 0.5]
            frame_id = frame_id + start + 5
        else:
            break
    return ratio


@pytest.mark.parametrize("num_frames", [22, 40, 141, 250, 1000])
def test_blink_schedule_follows_the_official_rule(num_frames):
    ours = co.blink_ratio_sequence(num_frames, random.Random(5))
    np.testing.assert_array_equal(ours, _official_blinks(num_frames, random.Random(5)).astype(np.float32))
    assert ours.shape == (num_frames, 1) and ours.dtype == np.float32
    if num_frames >= 141:
        assert ours.sum() > 0


def test_blink_schedule_short_clips_have_none():
    for T in (1, 5, 20, 21):  # 21: the official gap range is empty (it would raise); no blinks here
        assert not co.blink_ratio_sequence(T, random.Random(0)).any()


def test_reference_rows_and_eyeblink_tiling():
    source = np.arange(73, dtype=np.float32)
    ref = co.reference_coefficients(source, 4)
    assert ref.shape == (4, 70) and np.all(ref == source[:70])
    blink_video = np.stack([np.full(70, 100.0 + i, np.float32) for i in range(3)])
    ref = co.reference_coefficients(source, 7, blink_video)
    np.testing.assert_array_equal(ref[:, 0], [100, 101, 102, 100, 101, 102, 100])
    np.testing.assert_array_equal(ref[:, 64:], np.broadcast_to(source[64:70], (7, 6)))  # pose stays the source's
    features = mel.idle_features(1.2)
    inputs = co.build_inputs(features, source, use_blink=True, rng=random.Random(1), ref_eyeblink_coeffs=blink_video)
    assert not inputs.blink_ratio.any()  # blinks come from the reference video instead
    assert not co.build_inputs(features, source, use_blink=False).blink_ratio.any()
    assert co.build_inputs(mel.idle_features(10.0), source, rng=random.Random(1)).blink_ratio.any()


def test_smoothing_windows_and_short_clips():
    t = np.arange(30, dtype=np.float32)[:, None]
    quadratic = np.repeat(0.01 * t ** 2 - 0.2 * t + 1.0, 6, axis=1)
    np.testing.assert_allclose(co.smooth_pose(quadratic), quadratic, atol=1e-4)  # order-2 filter keeps quadratics
    noisy = quadratic + np.random.default_rng(0).standard_normal(quadratic.shape).astype(np.float32)
    assert np.std(co.smooth_pose(noisy) - quadratic) < 0.6 * np.std(noisy - quadratic)
    for T in (1, 2):
        pose = np.random.default_rng(T).standard_normal((T, 6)).astype(np.float32)
        np.testing.assert_array_equal(co.smooth_pose(pose), pose)
    pose = np.random.default_rng(3).standard_normal((6, 6)).astype(np.float32)  # T < 13: window 5
    from scipy.signal import savgol_filter
    np.testing.assert_allclose(co.smooth_pose(pose), savgol_filter(pose, 5, 2, axis=0), atol=1e-6)


def test_ref_pose_adds_relative_motion():
    coeffs = np.zeros((5, 70), np.float32)
    video = np.zeros((2, 70), np.float32)
    video[:, 64:70] = [[1.0] * 6, [3.0] * 6]
    out = co.apply_ref_pose(coeffs, video)
    np.testing.assert_array_equal(out[:, 64], [0, 2, 0, 2, 0])
    assert not out[:, :64].any()


def test_noise_draw_counts():
    assert [num_noise_draws(T) for T in (1, 2, 20, 33, 34, 65, 66)] == [0, 1, 1, 1, 2, 2, 3]
    g = torch.Generator().manual_seed(3)
    noise = co.draw_pose_noise(34, g)
    assert noise.shape == (2, 1, 64)
    g2 = torch.Generator().manual_seed(3)
    np.testing.assert_array_equal(noise[1].numpy(), (torch.randn(1, 64, generator=g2), torch.randn(1, 64, generator=g2))[1].numpy())


def test_seeded_runs_repeat_and_differ_by_seed(audio_nets):
    wav = np.random.default_rng(4).standard_normal(int(16000 * 1.4)).astype(np.float32) * 0.2
    features = mel.audio_features(wav)  # 35 frames: one full pose chunk of 32 + a remainder of 2
    source = np.random.default_rng(5).standard_normal(73).astype(np.float32) * 0.2
    run = lambda seed, style=0: co.audio_to_coefficients(  # noqa: E731
        audio_nets.audio2exp, audio_nets.audio2pose, features, source, pose_style=style, seed=seed)
    a, b = run(7), run(7)
    assert a.coeffs.shape == (35, 70) and a.coeffs.dtype == np.float32 and np.isfinite(a.coeffs).all()
    np.testing.assert_array_equal(a.coeffs, b.coeffs)
    assert a.pose_noise.shape == (2, 1, 64)
    assert not np.array_equal(run(8).coeffs[:, 64:], a.coeffs[:, 64:])  # other noise, other motion
    # Replaying the recorded noise with another style: only the style differs from run a.
    styled = co.predict_coefficients(audio_nets.audio2exp, audio_nets.audio2pose, a.inputs, 12, noise=a.pose_noise)
    assert not np.array_equal(styled.coeffs[:, 64:], a.coeffs[:, 64:])
    np.testing.assert_array_equal(styled.coeffs[:, :64], a.coeffs[:, :64])  # expression does not depend on style
    replay = co.predict_coefficients(audio_nets.audio2exp, audio_nets.audio2pose, a.inputs, 0, noise=a.pose_noise)
    np.testing.assert_array_equal(replay.coeffs, a.coeffs)


def test_one_frame_clip_keeps_the_source_pose(audio_nets):
    features = mel.audio_features(np.zeros(640, np.float32))
    source = np.linspace(-1, 1, 70).astype(np.float32)
    result = co.audio_to_coefficients(audio_nets.audio2exp, audio_nets.audio2pose, features, source, seed=0)
    assert result.coeffs.shape == (1, 70) and result.pose_noise.shape == (0, 1, 64)
    np.testing.assert_allclose(result.coeffs[0, 64:], source[64:70], atol=1e-6)


def test_ref_pose_video_and_invalid_style(audio_nets):
    features = mel.idle_features(0.6)
    source = np.zeros(70, np.float32)
    video = np.random.default_rng(6).standard_normal((9, 70)).astype(np.float32)
    plain = co.audio_to_coefficients(audio_nets.audio2exp, audio_nets.audio2pose, features, source, seed=1)
    moved = co.audio_to_coefficients(audio_nets.audio2exp, audio_nets.audio2pose, features, source, seed=1,
                                     ref_pose_coeffs=video)
    offset = co.tile_frames(video[:, 64:70], 15) - video[:1, 64:70]
    np.testing.assert_allclose(moved.coeffs[:, 64:], plain.coeffs[:, 64:] + offset, atol=1e-6)
    with pytest.raises(InputError, match="pose style"):
        co.predict_coefficients(audio_nets.audio2exp, audio_nets.audio2pose, plain.inputs, 46)


def test_face_coefficients_batches_frames_independently():
    nets = load_networks(synthetic_checkpoint_dir(legacy=False), parts=["face_recon"])
    rng = np.random.default_rng(9)
    frames = [rng.integers(0, 256, (120, 100, 3), dtype=np.uint8) for _ in range(3)]
    base = np.array([[30, 40]] * 68, np.float32)
    base[36:42], base[42:48], base[48], base[54], base[30] = (35, 40), (65, 40), (38, 80), (62, 80), (50, 60)
    marks = [base + i for i in range(2)] + [None]  # the last frame had no detection: standard landmarks
    together = co.face_coefficients(nets.face_recon, frames, marks, batch_size=2)
    assert together.coeff_3dmm.shape == (3, 73) and together.full_3dmm.shape == (3, 257)
    for i in range(3):
        alone = co.face_coefficients(nets.face_recon, frames[i:i + 1], marks[i:i + 1])
        np.testing.assert_allclose(together.full_3dmm[i], alone.full_3dmm[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(together.trans_params[i], alone.trans_params[0])
    np.testing.assert_array_equal(together.coeff_3dmm[:, 70:], together.trans_params[:, 2:])
