"""Streaming SadTalker motion for live sessions: audio features as audio arrives (equal to file mode's), the motion
networks on chunks, continuity (no jump at PoseVAE window boundaries, nor between idle and speech)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.audio import load_audio
from core.image import load_image
from core.landmarks import shared_detector
from live.session import SpeechQueue
from sadtalker import mel
from sadtalker.pipeline import SadTalkerPipeline
from sadtalker.streaming import POSE_DELAY, POSE_HOP, RELEASE_TICKS, SadTalkerFace, SpeechMotion, keypoints_of
from sadtalker.synthetic import cached_official_layout
from support.paths import EXAMPLE_AUDIO, EXAMPLE_IMAGE

SEQ_OVERLAP = 32 - POSE_HOP  # frames two consecutive PoseVAE windows share


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


# ------------------------------------------------------------------------------------------------ the motion networks


@pytest.fixture(autouse=True)
def one_torch_thread():
    """As the face's motion worker runs (small batches: one core is faster than two waiting on each other, above
    all on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipeline():
    directory = cached_official_layout(legacy=False)  # synthetic weights in the official files' layout
    return SadTalkerPipeline.from_checkpoints(directory, detector=shared_detector(directory))


def speech_motion(pipeline, rng_seed=0, use_blink=False) -> SpeechMotion:
    nets = pipeline.networks(256)
    source = np.random.default_rng(7).normal(0, 0.3, 70).astype(np.float32)
    return SpeechMotion(nets.audio2exp, nets.audio2pose, nets.mapping_crop, source, "crop",
                        np.random.default_rng(rng_seed), use_blink=use_blink)


def run_in_chunks(motion: SpeechMotion, wav: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Feed ``wav`` in chunks; (motion vectors, generated coefficients) of every frame."""
    vectors, coefficients = [], []
    for start in range(0, wav.size + 1, chunk):
        if start >= wav.size:
            motion.finish()
        else:
            motion.push(wav[start:start + chunk])
        out = motion.motion()
        if len(out):
            vectors.append(out)
            coefficients.append(motion.coefficients)
    motion.finish()
    vectors.append(motion.motion())
    coefficients.append(motion.coefficients[:len(vectors[-1])])
    return np.concatenate(vectors), np.concatenate(coefficients)


def test_streamed_expression_is_file_modes_expnet(pipeline):
    """ExpNet is frame-wise: chunk by chunk, each frame's expression is what the file mode computes for it."""
    wav = load_audio(str(EXAMPLE_AUDIO))[:16000 * 3]
    motion = speech_motion(pipeline)
    vectors, coefficients = run_in_chunks(motion, wav, 3200)  # 200 ms chunks
    features = mel.audio_features(wav)
    assert len(vectors) == len(coefficients) == features.num_frames
    nets = pipeline.networks(256)
    T = features.num_frames
    with torch.inference_mode():
        expected = nets.audio2exp(torch.from_numpy(features.windows)[None, :, None],
                                  torch.from_numpy(motion.source[:64]).expand(1, T, 64), torch.zeros(1, T, 1))[0]
    np.testing.assert_allclose(coefficients[:, :64], expected.numpy(), rtol=0, atol=1e-4 * float(expected.abs().max()))
    assert np.isfinite(vectors).all() and vectors.shape[1] == 51


def test_pose_windows_hand_over_without_a_jump(pipeline):
    """PoseVAE windows (one every POSE_HOP frames) cross-fade: the pose changes no more at a hand-over than between
    any two frames, while the windows themselves disagree by far more (a switch would jump)."""
    wav = speech_like(6.0, seed=4)
    motion = speech_motion(pipeline, rng_seed=1)
    disagreement = []
    original = motion._run_pose_windows

    def spy(last):
        before = dict(motion._windows)
        original(last)
        for j, window in motion._windows.items():
            if j - 1 in before:  # the overlap of consecutive windows: the same frames, another decoder call
                disagreement.append(np.abs(window[:SEQ_OVERLAP] - before[j - 1][POSE_HOP:]).max())

    motion._run_pose_windows = spy
    _, coefficients = run_in_chunks(motion, wav, 3200)
    pose = coefficients[:, 64:70]
    steps = np.abs(np.diff(pose, axis=0)).max(axis=1)  # step[f] = pose[f + 1] - pose[f]
    handover = [f for f in range(POSE_DELAY, len(steps)) if (f - POSE_DELAY) % POSE_HOP == 0]
    assert len(handover) >= 12
    typical = np.percentile(steps[POSE_DELAY:], 95)
    assert steps[handover].max() <= 1.5 * typical, (steps[handover].max(), typical)
    assert np.median(disagreement) > 3 * typical  # without the cross-fade, every hand-over would be a jump
    assert np.abs(pose[:POSE_DELAY - POSE_HOP - 6 + 1] - motion.source[64:70]).max() == 0  # starts at the photo's pose


def face_ticks(face: SadTalkerFace, plan: list) -> tuple[list[np.ndarray], list[bool]]:
    """Run a face tick by tick as a session does. ``plan``: ("idle", ticks) | ("speech", samples, final) pushes.
    Returns each tick's driving keypoints and whether it showed speech."""
    queue = SpeechQueue(face.lookahead_frames, face.context_frames)
    keypoints, speaking = [], []
    tick = 0
    for step in plan:
        if step[0] == "speech":
            queue.push(step[1], step[2])
            continue
        for _ in range(step[1]):
            speech, _ = queue.take()
            if speech is not None:
                face.scheduled(speech)
            frame = face.frame(tick / 25, speech)
            assert frame.shape == (128, 128, 3) and frame.dtype == np.uint8
            keypoints.append(keypoints_of(face._kp_canonical, face.last_motion)[0].numpy())
            speaking.append(speech is not None)
            tick += 1
    return keypoints, speaking


def test_a_face_goes_idle_speech_underrun_speech_idle_without_a_jump(pipeline):
    rgb = load_image(str(EXAMPLE_IMAGE))
    points = pipeline.detector.detect(rgb).points
    face = SadTalkerFace(pipeline, rgb, points, size=128, seed=3)
    try:
        assert face.renderer_name == "keypoint-preview" and "CPU" in face.renderer_note
        wav = load_audio(str(EXAMPLE_AUDIO))
        half = wav.size // 2
        keypoints, speaking = face_ticks(face, [("idle", 30), ("speech", wav[:half], False), ("idle", 90),
                                                ("speech", wav[half:], True), ("idle", 140)])
    finally:
        face.close()
    switches = [i for i in range(1, len(speaking)) if speaking[i] != speaking[i - 1]]
    assert len(switches) == 4, switches  # idle -> speech -> (underrun) idle -> speech -> idle
    change = np.array([np.abs(b - a).max() for a, b in zip(keypoints, keypoints[1:])])  # change[i]: tick i -> i+1
    speaking_change = change[[i for i in range(len(change)) if speaking[i] and speaking[i + 1]]]
    typical = np.percentile(speaking_change, 95)
    for i in switches:
        assert change[i - 3:i + 3].max() <= 1.5 * typical, (i, change[i - 3:i + 3], typical)
    # idle is the photo at rest (blinks, a slow sway): once released, the keypoints barely move
    assert change[switches[-1] + RELEASE_TICKS:].max() < 0.05 * typical
