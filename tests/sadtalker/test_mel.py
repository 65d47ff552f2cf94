"""Mel features and per-frame windows: edge cases beyond the golden cases (which pin the official values)."""
from __future__ import annotations

import numpy as np
import pytest

from sadtalker import mel
from core.errors import InputError


def test_window_starts_truncate_toward_zero_like_python_int():
    expected = [int(80.0 * ((i - 2) / 25.0)) for i in range(400)]
    assert mel.window_starts(400).tolist() == expected
    assert expected[:5] == [-6, -3, 0, 3, 6]


def test_frame_count_cut_and_pad():
    rng = np.random.default_rng(1)
    wav = rng.standard_normal(640 * 7 + 639).astype(np.float32) * 0.1
    features = mel.audio_features(wav)
    assert features.num_frames == 7
    assert features.mel.shape == (80, 1 + 640 * 7 // 200)
    assert features.windows.shape == (7, 80, 16) and features.windows.dtype == np.float32
    # The partial frame is cut before the spectrogram: identical to computing it on the cut signal.
    np.testing.assert_array_equal(features.mel, mel.melspectrogram(wav[: 640 * 7]))


def test_windows_are_clamped_slices_of_the_spectrogram():
    wav = np.random.default_rng(2).standard_normal(640 * 10).astype(np.float32)
    features = mel.audio_features(wav)
    T = features.mel.shape[1]
    for i, start in enumerate(mel.window_starts(10)):
        rows = np.clip(np.arange(start, start + 16), 0, T - 1)
        np.testing.assert_array_equal(features.windows[i], features.mel[:, rows])


def test_tone_lands_in_the_right_band_and_silence_is_the_floor():
    t = np.arange(16000) / 16000.0
    tone = (0.5 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)
    spec = mel.melspectrogram(tone)
    band = int(np.argmax(spec[:, 40]))
    fb = mel.mel_filterbank()
    centre_hz = np.argmax(fb, axis=1) * 16000 / 800
    assert abs(centre_hz[band] - 1000.0) < 60.0
    silent = mel.melspectrogram(np.zeros(3200, np.float32))
    assert np.all(silent == -4.0)  # 1e-5 floor -> -100 dB - 20 dB -> clipped to the minimum
    assert spec.max() <= 4.0 and spec.min() >= -4.0


def test_filterbank_is_slaney_normalised():
    fb = mel.mel_filterbank().astype(np.float64)
    assert fb.shape == (80, 401) and mel.mel_filterbank().dtype == np.float32
    centres = np.argmax(fb, axis=1)
    assert np.all(np.diff(centres) >= 0) and centres[0] > 0 and centres[-1] * 20 <= 7600
    area_hz = fb.sum(axis=1) * (16000 / 800)  # each triangle has unit area in Hz (wide filters integrate well)
    np.testing.assert_allclose(area_hz[40:], 1.0, rtol=0.02)


def test_too_short_audio_and_idle_features():
    with pytest.raises(InputError, match="shorter than one video frame"):
        mel.audio_features(np.zeros(639, np.float32))
    idle = mel.idle_features(2.0)
    assert idle.num_frames == 50 and idle.windows.shape == (50, 80, 16) and not idle.windows.any()
    with pytest.raises(InputError):
        mel.idle_features(0.01)
