"""Motion of a talking head at 25 fps: from speech audio (jaw, lip shape, nods on emphasis, blinks), or idle.

Everything a frame needs is a ``Pose`` (preview/warp.py). The motion of a whole clip is a handful of float arrays
(a 5-minute clip is 7,500 frames: ~300 kB), computed once; frames are rendered from it one at a time.

* Mouth: the loudness of the voice band (80-3000 Hz) per frame, gated against the noise floor and normalised to
  the clip's loud syllables, drives the jaw through an attack/release follower (opens within a frame, closes over
  ~3 frames: no chatter on every pitch period, no lag at onsets). Silence gives exactly zero: mouth as in the photo.
* Lip shape: the spectral centroid of voiced frames relative to the clip's own median: bright vowels ("ee") stretch
  the lips, dark ones ("oo") round them.
* Head: slow random drift (a few incommensurate sines per axis, livelier while speaking) plus nods, turns and brow
  raises triggered by emphasis (loudness onsets), each with its own seeded amplitude and timing, so it never repeats.
* Blinks: every ~2-6 s (seeded), ~160 ms, sometimes a double blink.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from core.options import FPS, SAMPLE_RATE

from .warp import Pose

SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
JAW_PEAK = 0.2  # lower-lip drop on the clip's loud syllables, in face units
VOICE_BAND = (80.0, 3000.0)  # Hz: where vowels carry their energy; fricatives (s, f) mostly fall above
SHAPE_BAND = (100.0, 4000.0)
JAW_DEAD_ZONE = 0.01  # face units (~0.4 px on a 512 px portrait)
ATTACK, RELEASE = 0.75, 0.42  # per-frame follower coefficients of the jaw (open fast, close smoothly)
EVENT_FRAMES = 3 * FPS  # how long a nod/turn is followed (its tail is < 1 % after 8 peak times)
BLINK_CLOSE_S, BLINK_HOLD_S, BLINK_OPEN_S = 0.04, 0.04, 0.08  # a blink is ~160 ms; the 40 ms hold meets every frame


# ---------------------------------------------------------------------------------------------------------------
# Audio features
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AudioFeatures:
    """Per video frame (frame i covers samples [640 i, 640 (i+1)) at 16 kHz)."""

    rms: np.ndarray  # (T,) RMS of the raw signal
    voice: np.ndarray  # (T,) RMS within VOICE_BAND
    centroid: np.ndarray  # (T,) spectral centroid within SHAPE_BAND, Hz


def audio_features(samples: np.ndarray, num_frames: int, sample_rate: int = SAMPLE_RATE) -> AudioFeatures:
    hop = sample_rate // FPS
    n_fft = 1 << max(8, int(math.ceil(math.log2(hop * 1.6))))  # 1024 at 16 kHz: a 64 ms window centred on the frame
    padded = np.zeros(num_frames * hop + n_fft, dtype=np.float32)
    usable = min(samples.size, num_frames * hop)
    start = (n_fft - hop) // 2
    padded[start:start + usable] = samples[:usable]
    window = np.hanning(n_fft).astype(np.float32)
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    voice_bins = (freqs >= VOICE_BAND[0]) & (freqs <= VOICE_BAND[1])
    shape_bins = (freqs >= SHAPE_BAND[0]) & (freqs <= SHAPE_BAND[1])
    norm = 2.0 / (n_fft * float(np.sum(window ** 2)))

    rms = np.zeros(num_frames, np.float32)
    voice = np.zeros(num_frames, np.float32)
    centroid = np.zeros(num_frames, np.float32)
    chunk = 256  # frames per FFT batch: bounded memory for long clips
    for first in range(0, num_frames, chunk):
        last = min(num_frames, first + chunk)
        idx = np.arange(first, last)
        frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[idx * hop]  # (n, n_fft) view
        raw = frames[:, start:start + hop]
        rms[first:last] = np.sqrt(np.mean(raw.astype(np.float64) ** 2, axis=1))
        power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
        voice[first:last] = np.sqrt(norm * power[:, voice_bins].sum(1))
        shape_power = power[:, shape_bins]
        total = shape_power.sum(1)
        centroid[first:last] = (shape_power @ freqs[shape_bins]) / np.maximum(total, 1e-20)
    return AudioFeatures(rms=rms, voice=voice, centroid=centroid)


# ---------------------------------------------------------------------------------------------------------------
# Shared building blocks (used by the audio-driven motion and by the idle animation)
# ---------------------------------------------------------------------------------------------------------------

class HeadDrift:
    """Slow, never-repeating head sway: per axis a sum of sines with seeded frequencies and phases."""

    # axis -> (typical amplitude, lowest Hz, highest Hz); degrees or face units
    AXES = {"pitch": (1.5, 0.08, 0.5), "yaw": (1.8, 0.05, 0.35), "roll": (1.0, 0.05, 0.3),
            "shift_x": (0.012, 0.04, 0.2), "shift_y": (0.008, 0.18, 0.3)}

    def __init__(self, rng: np.random.Generator):
        self.terms = {}
        for axis, (amplitude, lo, hi) in self.AXES.items():
            freqs = rng.uniform(lo, hi, 3)
            phases = rng.uniform(0, 2 * math.pi, 3)
            weights = rng.uniform(0.5, 1.0, 3)
            weights *= amplitude * math.sqrt(2.0) / math.sqrt(float(np.sum(weights ** 2)))  # std ~ amplitude
            self.terms[axis] = (freqs, phases, weights)

    def at(self, t: np.ndarray | float) -> dict[str, np.ndarray]:
        t = np.asarray(t, dtype=np.float64)
        return {axis: np.sum(w * np.sin(2 * math.pi * f * t[..., None] + p), axis=-1)
                for axis, (f, p, w) in self.terms.items()}


class BlinkSchedule:
    """Blink start times (seeded) and the eyelid closure at any time."""

    def __init__(self, rng: np.random.Generator, horizon_s: float, first_after_s: float = 0.6):
        count = int(horizon_s / 1.8) + 2  # gaps are at least 1.8 s
        gaps = 1.8 + rng.gamma(2.0, 1.1, count)  # mean gap ~4 s, rarely under 2 s
        starts = rng.uniform(first_after_s, first_after_s + 1.6) + np.concatenate([[0.0], np.cumsum(gaps[:-1])])
        starts = starts[starts < horizon_s]
        doubles = starts[rng.random(starts.size) < 0.12] + 0.32  # a quick double blink now and then
        self.times = np.sort(np.concatenate([starts, doubles[doubles < horizon_s]]))

    def at(self, t: np.ndarray | float) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        if self.times.size == 0:
            return np.zeros(t.shape)
        latest = np.searchsorted(self.times, t, side="right") - 1  # the last blink that started by t
        closure = np.zeros(t.shape)
        for back in (0, 1):  # the one before may still be open in a double blink
            index = latest - back
            tau = np.where(index >= 0, t - self.times[np.clip(index, 0, None)], -1.0)
            closure = np.maximum(closure, self._profile(tau))
        return closure

    @staticmethod
    def _profile(tau: np.ndarray) -> np.ndarray:
        closing = np.clip(tau / BLINK_CLOSE_S, 0.0, 1.0)
        opening = np.clip((tau - BLINK_CLOSE_S - BLINK_HOLD_S) / BLINK_OPEN_S, 0.0, 1.0)
        return np.where(tau < 0, 0.0, _ease(closing) * (1.0 - _ease(opening)))


def _ease(x: np.ndarray) -> np.ndarray:
    return x * x * (3.0 - 2.0 * x)


def _impulse(tau: np.ndarray, peak_s: float) -> np.ndarray:
    """0 before the event, eases in to 1 at ``peak_s``, then settles back (no jump in speed at the start)."""
    x = np.clip(tau / peak_s, 0.0, None)
    return np.where(tau > 0, x * x * np.exp(2.0 * (1.0 - x)), 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Audio-driven motion of a whole clip
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Motion:
    """Per-frame pose arrays, each (num_frames,) float32."""

    jaw: np.ndarray
    lip_shape: np.ndarray
    blink: np.ndarray
    brow: np.ndarray
    pitch: np.ndarray
    yaw: np.ndarray
    roll: np.ndarray
    shift_x: np.ndarray
    shift_y: np.ndarray
    fps: int = FPS

    @property
    def num_frames(self) -> int:
        return int(self.jaw.shape[0])

    def pose(self, index: int) -> Pose:
        return Pose(**{f.name: float(getattr(self, f.name)[index]) for f in fields(Pose)})


def mouth_opening(features: AudioFeatures) -> np.ndarray:
    """Target mouth opening per frame in [0, 1.2] (before smoothing); exactly 0 in silence."""
    voice = features.voice.astype(np.float64)
    peak = float(voice.max()) if voice.size else 0.0
    if peak < 1e-4:  # silence (below -80 dBFS)
        return np.zeros_like(voice)
    active = voice[voice > 0.05 * peak]
    reference = float(np.percentile(active, 90))
    noise = float(np.percentile(voice, 10))
    gate = max(1e-4, 2.0 * noise, 0.08 * reference)
    if reference <= gate * 1.5:
        reference = gate * 1.5
    opening = np.clip((voice - gate) / (reference - gate), 0.0, 1.3) ** 0.75
    return np.minimum(opening, 1.2)


def follow(target: np.ndarray, attack: float, release: float) -> np.ndarray:
    """Attack/release envelope follower (per-frame coefficients)."""
    out = np.empty_like(target)
    value = 0.0
    for i, x in enumerate(target):
        value += (attack if x > value else release) * (x - value)
        out[i] = value
    return out


def motion_from_audio(samples: np.ndarray, num_frames: int, seed: int, use_blink: bool = True,
                      sample_rate: int = SAMPLE_RATE) -> Motion:
    """The motion of a clip of ``num_frames`` frames from its audio (mono float32). Same seed, same motion."""
    rng = np.random.default_rng(seed)
    features = audio_features(samples, num_frames, sample_rate)
    times = np.arange(num_frames) / FPS

    # Mouth
    opening = mouth_opening(features)
    jaw_open = follow(opening, ATTACK, RELEASE)
    voiced = opening > 0.15
    if voiced.sum() >= 3:
        c = features.centroid.astype(np.float64)
        median = float(np.median(c[voiced]))
        spread = float(np.median(np.abs(c[voiced] - median))) + 1.0
        shape = np.tanh((c - median) / (1.5 * spread)) * np.clip(opening / 0.35, 0.0, 1.0)
    else:
        shape = np.zeros(num_frames)
    shape = follow(shape, 0.5, 0.35)
    rounding = np.clip(-shape, 0.0, 1.0)
    jaw = JAW_PEAK * jaw_open * (1.0 + 0.15 * rounding)
    # The follower's tail decays forever; below a fraction of a pixel the lips are simply closed.
    jaw = np.maximum(jaw - JAW_DEAD_ZONE, 0.0) * (JAW_PEAK / (JAW_PEAK - JAW_DEAD_ZONE))

    # Speech activity (slow) scales the head's drift: livelier while talking, calm in pauses.
    activity = follow((opening > 0.1).astype(np.float64), 0.06, 0.03)
    drift = HeadDrift(rng).at(times)
    fade_in = _ease(np.clip(times / 0.5, 0.0, 1.0))  # frame 0 is the photo itself
    liveliness = fade_in * (1.0 + 0.6 * activity)
    head = {axis: values * liveliness for axis, values in drift.items()}
    brow = np.zeros(num_frames)

    # Emphasis: onsets of loudness -> a nod (down and back), sometimes a small turn/tilt and a brow raise.
    envelope = follow(opening, 0.6, 0.3)
    onset = np.maximum(0.0, envelope - np.concatenate([[0.0, 0.0], envelope[:-2]]))
    last = -1e9
    for i in range(1, num_frames - 1):
        strength = onset[i]
        if strength < 0.18 or strength < onset[i - 1] or strength < onset[i + 1] or i - last < 9:
            continue
        last = i
        span = slice(i, min(num_frames, i + EVENT_FRAMES))  # an event has settled (< 1 %) after ~3 s
        tau = times[span] - times[i]
        weight = min(1.0, strength / 0.5)
        if rng.random() < 0.85:
            head["pitch"][span] += rng.uniform(1.5, 3.5) * weight * _impulse(tau, rng.uniform(0.14, 0.22))
        if rng.random() < 0.5:
            turn = _impulse(tau, rng.uniform(0.25, 0.4))
            head["yaw"][span] += rng.choice([-1.0, 1.0]) * rng.uniform(1.0, 2.5) * weight * turn
            head["roll"][span] += rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.5) * weight * turn
        if strength > 0.3 and rng.random() < 0.5:
            brow[span] += rng.uniform(0.03, 0.06) * weight * _impulse(tau, 0.2)

    blink = BlinkSchedule(rng, num_frames / FPS).at(times) if use_blink else np.zeros(num_frames)
    as32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    return Motion(jaw=as32(jaw), lip_shape=as32(shape), blink=as32(blink), brow=as32(brow),
                  pitch=as32(head["pitch"]), yaw=as32(head["yaw"]), roll=as32(head["roll"]),
                  shift_x=as32(head["shift_x"]), shift_y=as32(head["shift_y"]))


# ---------------------------------------------------------------------------------------------------------------
# Idle motion (no audio): gentle nodding, sway and blinks, at any time t
# ---------------------------------------------------------------------------------------------------------------

class IdleMotion:
    """Pose at any time t >= 0; t = 0 is the photo itself, motion fades in over the first half second."""

    NOD_DEG, NOD_HZ = 2.0, 0.42  # an attentive, listening nod

    def __init__(self, seed: int | None = None, use_blink: bool = True, horizon_s: float = 3600.0):
        rng = np.random.default_rng(seed)
        self.drift = HeadDrift(rng)
        self.blinks = BlinkSchedule(rng, horizon_s, first_after_s=0.4) if use_blink else None

    def pose(self, t: float) -> Pose:
        t = max(0.0, float(t))
        fade_in = float(_ease(np.clip(t / 0.5, 0.0, 1.0)))
        drift = {axis: float(v) * fade_in for axis, v in self.drift.at(t).items()}
        nod = self.NOD_DEG * 0.5 * (1.0 - math.cos(2 * math.pi * self.NOD_HZ * t))
        blink = float(self.blinks.at(t)) if self.blinks is not None else 0.0
        return Pose(blink=blink, pitch=drift["pitch"] + fade_in * nod, yaw=drift["yaw"], roll=drift["roll"],
                    shift_x=drift["shift_x"], shift_y=drift["shift_y"])
