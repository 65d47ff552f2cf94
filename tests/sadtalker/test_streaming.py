"""Streaming SadTalker motion for live sessions: audio features as audio arrives (equal to file mode's), the motion
networks on chunks, continuity (no jump at PoseVAE window boundaries, nor between idle and speech)."""
from __future__ import annotations

import numpy as np
import pytest

from sadtalker import mel


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """Amplitude-modulated tones with a near-silent gap: a mel spectrogram with structure (not just noise)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000.0
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t)
    wav = envelope * (0.3 * np.sin(2 * np.pi * 180.0 * t) + 0.1 * np.sin(2 * np.pi * 1200.0 * t))
    wav += 0.02 * rng.standard_normal(t.size)
    wav[int(0.4 * t.size):int(0.5 * t.size)] *= 0.01
    return wav.astype(np.float32)


def stream_windows(wav: np.ndarray, pieces: list[int], lookahead_check: bool = True) -> np.ndarray:
    features = mel.StreamingAudioFeatures()
    out, position = [], 0
    for size in pieces:
        features.push(wav[position:position + size])
        position = min(position + size, wav.size)
        windows = features.windows()
        out.append(windows)
        if lookahead_check:  # bounded look-ahead: every frame whose window's audio has arrived is out
            complete = (position - mel.WINDOW_LOOKAHEAD_SAMPLES) // mel.SAMPLES_PER_VIDEO_FRAME
            assert features.frames_out >= complete, (position, features.frames_out)
    features.push(wav[position:])
    out.append(features.windows())
    features.finish()
    out.append(features.windows())
    return np.concatenate(out), features


@pytest.mark.parametrize("length", [640 * 60, 640 * 60 + 333])
def test_streaming_windows_equal_the_file_mode_features(length):
    wav = speech_like(length / 16000)[:length]
    rng = np.random.default_rng(length)
    pieces = list(rng.integers(1, 3200, size=40))  # ragged pieces, some shorter than a mel hop
    streamed, features = stream_windows(wav, pieces)
    padded = np.pad(wav, (0, -length % 640))  # a live utterance keeps its last partial frame, zero-padded
    file_mode = mel.audio_features(padded)
    assert features.num_frames == file_mode.num_frames == streamed.shape[0]
    np.testing.assert_allclose(streamed, file_mode.windows, rtol=0, atol=1e-5)
    if length % 640 == 0:
        np.testing.assert_allclose(streamed, mel.audio_features(wav).windows, rtol=0, atol=1e-5)


def test_the_window_look_ahead_is_what_the_rows_need():
    assert mel.WINDOW_LOOKAHEAD_SAMPLES == 1480
    wav = speech_like(2.0, seed=3)
    features = mel.StreamingAudioFeatures()
    end_of_12 = 640 * 13  # frame 12's last mel row (47) reaches sample 9800: 1480 after the frame's end
    features.push(wav[:end_of_12 + 1480 - 1])
    assert features.windows().shape[0] == 12  # frames 0..11; frame 12 needs one more sample
    features.push(wav[end_of_12 + 1480 - 1:end_of_12 + 1480])
    assert features.windows().shape[0] == 1
