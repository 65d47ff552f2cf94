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

The per-frame rules (analysis window, opening, lip shape, jaw, followers, emphasis, blinks) are shared with the
live sessions' causal motion (preview/streaming.py), which runs them tick by tick with running statistics.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import math
from dataclasses import dataclass, fields

import numpy as np

from core.options import FPS, SAMPLE_RATE
from core.remembered import Remembered

from .warp import Pose

SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
JAW_PEAK = 0.2  # lower-lip drop on the clip's loud syllables, in face units
VOICE_BAND = (80.0, 3000.0)  # Hz: where vowels carry their energy; fricatives (s, f) mostly fall above
SHAPE_BAND = (100.0, 4000.0)
JAW_DEAD_ZONE = 0.01  # face units (~0.4 px on a 512 px portrait)
ATTACK, RELEASE = 0.75, 0.42  # per-frame follower coefficients of the jaw (open fast, close smoothly)
OPENING_MAX = 1.2  # mouth opening (1 = the loud syllables) is capped here
SHAPE_ATTACK, SHAPE_RELEASE = 0.5, 0.35  # follower of the lip shape
VOICED_OPENING = 0.15  # frames at least this open are vowels: their centroids set the lip-shape reference
SPEAKING_OPENING = 0.1  # frames at least this open count as speaking (liveliness of the head)
ACTIVITY_ATTACK, ACTIVITY_RELEASE = 0.06, 0.03  # speaking -> liveliness over ~0.7 s, back over ~1.3 s
SPEAKING_LIVELINESS = 0.6  # the drift is this much larger while speaking
FADE_IN_S = 0.5  # the first frame is the photo itself; the drift fades in over this
ENVELOPE_ATTACK, ENVELOPE_RELEASE = 0.6, 0.3  # loudness envelope whose rises are emphasis onsets
ONSET_MIN = 0.18  # a rise of the envelope over 2 frames at least this large is an emphasis...
ONSET_SPACING = 9  # ...if it is a local peak and at least this many frames after the previous one
BROW_ONSET_MIN = 0.3  # only strong onsets may raise the brows
BROW_PEAK_S = 0.2
EVENT_FRAMES = 3 * FPS  # how long a nod/turn is followed (its tail is < 1 % after 8 peak times)
BLINK_CLOSE_S, BLINK_HOLD_S, BLINK_OPEN_S = 0.04, 0.04, 0.08  # a blink is ~160 ms; the 40 ms hold meets every frame
BLINK_MIN_GAP_S = 1.8  # gaps between blinks: this plus a gamma(2, 1.1 s): mean ~4 s, rarely under 2 s
BLINK_GAP_SHAPE, BLINK_GAP_SCALE_S = 2.0, 1.1
BLINK_FIRST_SPREAD_S = 1.6  # the first blink comes within this after ``first_after_s``
DOUBLE_BLINK_P, DOUBLE_BLINK_DELAY_S = 0.12, 0.32  # a quick double blink now and then


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
    """The clip's features per frame. The last few clips' are remembered (by their samples' content): the app
    computes them when the speech is uploaded, so the click's motion does not wait for them."""
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    key = (hashlib.sha1(memoryview(samples).cast("B")).digest(), samples.size, num_frames, sample_rate)
    features = _features.get(key)
    if features is None:
        features = _audio_features(samples, num_frames, sample_rate)
        for values in (features.rms, features.voice, features.centroid):
            values.flags.writeable = False  # shared by every motion made from this clip
        _features.put(key, features, 3 * features.rms.nbytes)
    return features


_features = Remembered(items=4, max_bytes=16 << 20)  # the last few clips' features


def _audio_features(samples: np.ndarray, num_frames: int, sample_rate: int) -> AudioFeatures:
    hop = sample_rate // FPS
    n_fft = analysis_window(sample_rate)
    padded = np.zeros(num_frames * hop + n_fft, dtype=np.float32)
    usable = min(samples.size, num_frames * hop)
    start = (n_fft - hop) // 2
    padded[start:start + usable] = samples[:usable]

    rms = np.zeros(num_frames, np.float32)
    voice = np.zeros(num_frames, np.float32)
    centroid = np.zeros(num_frames, np.float32)
    chunk = 256  # frames per FFT batch: bounded memory for long clips
    for first in range(0, num_frames, chunk):
        last = min(num_frames, first + chunk)
        idx = np.arange(first, last)
        frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[idx * hop]  # (n, n_fft) view
        rms[first:last], voice[first:last], centroid[first:last] = window_features(frames, sample_rate)
    return AudioFeatures(rms=rms, voice=voice, centroid=centroid)


def analysis_window(sample_rate: int = SAMPLE_RATE) -> int:
    """Samples each frame's features are computed from (centred on its hop): 1024 at 16 kHz, a 64 ms window."""
    hop = sample_rate // FPS
    return 1 << max(8, int(math.ceil(math.log2(hop * 1.6))))


@functools.lru_cache(maxsize=4)
def _spectral_bins(n_fft: int, sample_rate: int):
    window = np.hanning(n_fft).astype(np.float32)
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    voice_bins = (freqs >= VOICE_BAND[0]) & (freqs <= VOICE_BAND[1])
    shape_bins = (freqs >= SHAPE_BAND[0]) & (freqs <= SHAPE_BAND[1])
    norm = 2.0 / (n_fft * float(np.sum(window ** 2)))
    for shared in (window, freqs, voice_bins, shape_bins):  # cached for every caller: read-only
        shared.flags.writeable = False
    return window, freqs, voice_bins, shape_bins, norm


def window_features(frames: np.ndarray, sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rms, voice, centroid), each (n,), of analysis windows ``frames`` (n, analysis_window) float32.

    ``rms`` is over the window's central hop (the frame's own samples); the others over the Hann-weighted window.
    """
    n_fft = frames.shape[-1]
    hop = sample_rate // FPS
    start = (n_fft - hop) // 2
    window, freqs, voice_bins, shape_bins, norm = _spectral_bins(n_fft, sample_rate)
    raw = frames[:, start:start + hop]
    rms = np.sqrt(np.mean(raw.astype(np.float64) ** 2, axis=1))
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    voice = np.sqrt(norm * power[:, voice_bins].sum(1))
    shape_power = power[:, shape_bins]
    total = shape_power.sum(1)
    centroid = (shape_power @ freqs[shape_bins]) / np.maximum(total, 1e-20)
    return rms, voice, centroid


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
        count = int(horizon_s / BLINK_MIN_GAP_S) + 2
        gaps = BLINK_MIN_GAP_S + rng.gamma(BLINK_GAP_SHAPE, BLINK_GAP_SCALE_S, count)
        first = rng.uniform(first_after_s, first_after_s + BLINK_FIRST_SPREAD_S)
        starts = first + np.concatenate([[0.0], np.cumsum(gaps[:-1])])
        starts = starts[starts < horizon_s]
        doubles = starts[rng.random(starts.size) < DOUBLE_BLINK_P] + DOUBLE_BLINK_DELAY_S
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
            closure = np.maximum(closure, blink_closure(tau))
        return closure


class BlinkStream:
    """The blinks of ``BlinkSchedule``, drawn lazily for a clock that runs for hours: ``at(t)`` for t that never
    decreases. Holds only the blinks around t (nothing grows with t)."""

    def __init__(self, rng: np.random.Generator, start_s: float, first_after_s: float = 0.6):
        self.rng = rng
        self._started: collections.deque[float] = collections.deque(maxlen=2)  # a double blink overlaps one
        self._pending: collections.deque[float] = collections.deque()
        self._next_regular = start_s + rng.uniform(first_after_s, first_after_s + BLINK_FIRST_SPREAD_S)
        self._schedule()

    def _schedule(self) -> None:
        start = self._next_regular
        self._pending.append(start)
        if self.rng.random() < DOUBLE_BLINK_P:
            self._pending.append(start + DOUBLE_BLINK_DELAY_S)
        self._next_regular = start + BLINK_MIN_GAP_S + self.rng.gamma(BLINK_GAP_SHAPE, BLINK_GAP_SCALE_S)

    def at(self, t: float) -> float:
        if t - self._pending[0] > 60.0:  # the clock jumped: resume the pattern from t
            self._pending.clear()
            self._next_regular = t + self.rng.uniform(0.0, BLINK_MIN_GAP_S)
            self._schedule()
        while self._pending[0] <= t:
            self._started.append(self._pending.popleft())
            if not self._pending:
                self._schedule()
        return max((blink_closure_at(t - start) for start in self._started), default=0.0)


def blink_closure(tau: np.ndarray | float) -> np.ndarray:
    """Eyelid closure (0 open .. 1 closed) ``tau`` seconds after a blink started; 0 before it."""
    tau = np.asarray(tau, dtype=np.float64)
    closing = np.clip(tau / BLINK_CLOSE_S, 0.0, 1.0)
    opening = np.clip((tau - BLINK_CLOSE_S - BLINK_HOLD_S) / BLINK_OPEN_S, 0.0, 1.0)
    return np.where(tau < 0, 0.0, _ease(closing) * (1.0 - _ease(opening)))


def blink_closure_at(tau: float) -> float:
    """``blink_closure`` of one time, without numpy's per-call overhead."""
    if tau < 0.0:
        return 0.0
    closing = min(tau / BLINK_CLOSE_S, 1.0)
    opening = min(max((tau - BLINK_CLOSE_S - BLINK_HOLD_S) / BLINK_OPEN_S, 0.0), 1.0)
    return _ease(closing) * (1.0 - _ease(opening))


def _ease(x: np.ndarray) -> np.ndarray:
    return x * x * (3.0 - 2.0 * x)


def _impulse(tau: np.ndarray, peak_s: float) -> np.ndarray:
    """0 before the event, eases in to 1 at ``peak_s``, then settles back (no jump in speed at the start)."""
    x = np.clip(tau / peak_s, 0.0, None)
    return np.where(tau > 0, x * x * np.exp(2.0 * (1.0 - x)), 0.0)


def _impulse_at(tau: float, peak_s: float) -> float:
    """``_impulse`` of one time, without numpy's per-call overhead."""
    if tau <= 0.0:
        return 0.0
    x = tau / peak_s
    return x * x * math.exp(2.0 * (1.0 - x))


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
    return opening_from_voice(voice, *loudness_gate(*loudness_levels(voice)))


def loudness_levels(voice: np.ndarray, percentile=np.percentile) -> tuple[float, float]:
    """(noise, reference) of voice-band loudness values: the 10th percentile of all of them (pauses), and the 90th
    of the active ones (above 5 % of the peak): the loud syllables. ``percentile(values, q)``: numpy's, or one as
    defined but faster on short arrays (the streaming motion's, per tick)."""
    peak = float(voice.max())
    active = voice[voice > 0.05 * peak]
    return float(percentile(voice, 10)), float(percentile(active, 90))


def loudness_gate(noise: float, reference: float) -> tuple[float, float]:
    """(gate, reference) of the voice-band loudness: below the gate the mouth is closed, at the reference (the
    loud syllables, ~90th percentile of the active frames) it is open 1. ``noise``: the quiet frames' level."""
    gate = max(1e-4, 2.0 * noise, 0.08 * reference)
    if reference <= gate * 1.5:
        reference = gate * 1.5
    return gate, reference


def opening_from_voice(voice: np.ndarray | float, gate: float, reference: float) -> np.ndarray:
    """Target mouth opening in [0, OPENING_MAX] of a voice-band loudness (compressed: quiet syllables still show)."""
    opening = np.clip((voice - gate) / (reference - gate), 0.0, 1.3) ** 0.75
    return np.minimum(opening, OPENING_MAX)


def lip_shape_target(centroid: np.ndarray | float, median: float, spread: float,
                     opening: np.ndarray | float) -> np.ndarray:
    """Lip shape in [-1, 1] (before smoothing): the centroid against the voice's median, in units of its spread;
    only as much as the mouth is open (a closed mouth has no vowel shape)."""
    return np.tanh((centroid - median) / (1.5 * spread)) * np.clip(opening / 0.35, 0.0, 1.0)


def jaw_drop(jaw_open: np.ndarray | float, lip_shape: np.ndarray | float) -> np.ndarray:
    """The Pose's jaw (face units) from the smoothed opening; rounded vowels drop the jaw a little more."""
    rounding = np.clip(-lip_shape, 0.0, 1.0)
    jaw = JAW_PEAK * jaw_open * (1.0 + 0.15 * rounding)
    # The follower's tail decays forever; below a fraction of a pixel the lips are simply closed.
    return np.maximum(jaw - JAW_DEAD_ZONE, 0.0) * (JAW_PEAK / (JAW_PEAK - JAW_DEAD_ZONE))


@dataclass(frozen=True)
class Emphasis:
    """The head's answer to one emphasis (a loudness onset): a nod, maybe a turn with a tilt, maybe a brow raise.

    Amplitudes already include the onset's strength; 0 = that part was not drawn.
    """

    nod_deg: float = 0.0
    nod_peak_s: float = 0.2
    yaw_deg: float = 0.0
    roll_deg: float = 0.0
    turn_peak_s: float = 0.3
    brow: float = 0.0  # face units

    @classmethod
    def draw(cls, rng: np.random.Generator, strength: float) -> "Emphasis":
        weight = min(1.0, float(strength) / 0.5)
        parts = {}
        if rng.random() < 0.85:
            parts["nod_deg"] = rng.uniform(1.5, 3.5) * weight
            parts["nod_peak_s"] = rng.uniform(0.14, 0.22)
        if rng.random() < 0.5:
            parts["turn_peak_s"] = rng.uniform(0.25, 0.4)
            parts["yaw_deg"] = float(rng.choice([-1.0, 1.0]) * rng.uniform(1.0, 2.5) * weight)
            parts["roll_deg"] = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.5) * weight)
        if strength > BROW_ONSET_MIN and rng.random() < 0.5:
            parts["brow"] = rng.uniform(0.03, 0.06) * weight
        return cls(**parts)

    def at(self, tau: float) -> tuple[float, float, float, float]:
        """(pitch, yaw, roll, brow) ``tau`` seconds after the onset (scalar: the streaming motion's per-tick path)."""
        if tau <= 0.0:
            return 0.0, 0.0, 0.0, 0.0
        turn = _impulse_at(tau, self.turn_peak_s)
        return (self.nod_deg * _impulse_at(tau, self.nod_peak_s), self.yaw_deg * turn, self.roll_deg * turn,
                self.brow * _impulse_at(tau, BROW_PEAK_S))


def follow(target: np.ndarray, attack: float, release: float) -> np.ndarray:
    """Attack/release envelope follower (per-frame coefficients)."""
    out = np.empty_like(target)
    value = 0.0
    for i, x in enumerate(target):
        value = follow_step(value, x, attack, release)
        out[i] = value
    return out


def follow_step(value: float, target: float, attack: float, release: float) -> float:
    """One frame of ``follow``: towards ``target`` by ``attack`` of the way when rising, else by ``release``."""
    return value + (attack if target > value else release) * (target - value)


def motion_from_audio(samples: np.ndarray, num_frames: int, seed: int, use_blink: bool = True,
                      sample_rate: int = SAMPLE_RATE) -> Motion:
    """The motion of a clip of ``num_frames`` frames from its audio (mono float32). Same seed, same motion."""
    rng = np.random.default_rng(seed)
    features = audio_features(samples, num_frames, sample_rate)
    times = np.arange(num_frames) / FPS

    # Mouth
    opening = mouth_opening(features)
    jaw_open = follow(opening, ATTACK, RELEASE)
    voiced = opening > VOICED_OPENING
    if voiced.sum() >= 3:
        c = features.centroid.astype(np.float64)
        median = float(np.median(c[voiced]))
        spread = float(np.median(np.abs(c[voiced] - median))) + 1.0
        shape = lip_shape_target(c, median, spread, opening)
    else:
        shape = np.zeros(num_frames)
    shape = follow(shape, SHAPE_ATTACK, SHAPE_RELEASE)
    jaw = jaw_drop(jaw_open, shape)

    # Speech activity (slow) scales the head's drift: livelier while talking, calm in pauses.
    activity = follow((opening > SPEAKING_OPENING).astype(np.float64), ACTIVITY_ATTACK, ACTIVITY_RELEASE)
    drift = HeadDrift(rng).at(times)
    fade_in = _ease(np.clip(times / FADE_IN_S, 0.0, 1.0))  # frame 0 is the photo itself
    liveliness = fade_in * (1.0 + SPEAKING_LIVELINESS * activity)
    head = {axis: values * liveliness for axis, values in drift.items()}
    brow = np.zeros(num_frames)

    # Emphasis: onsets of loudness -> a nod (down and back), sometimes a small turn/tilt and a brow raise.
    envelope = follow(opening, ENVELOPE_ATTACK, ENVELOPE_RELEASE)
    onset = np.maximum(0.0, envelope - np.concatenate([[0.0, 0.0], envelope[:-2]]))
    last = -1e9
    for i in range(1, num_frames - 1):
        strength = onset[i]
        if (strength < ONSET_MIN or strength < onset[i - 1] or strength < onset[i + 1]
                or i - last < ONSET_SPACING):
            continue
        last = i
        span = slice(i, min(num_frames, i + EVENT_FRAMES))  # an event has settled (< 1 %) after ~3 s
        tau = times[span] - times[i]
        emphasis = Emphasis.draw(rng, strength)
        if emphasis.nod_deg:
            head["pitch"][span] += emphasis.nod_deg * _impulse(tau, emphasis.nod_peak_s)
        if emphasis.yaw_deg:
            turn = _impulse(tau, emphasis.turn_peak_s)
            head["yaw"][span] += emphasis.yaw_deg * turn
            head["roll"][span] += emphasis.roll_deg * turn
        if emphasis.brow:
            brow[span] += emphasis.brow * _impulse(tau, BROW_PEAK_S)

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
        fade_in = float(_ease(np.clip(t / FADE_IN_S, 0.0, 1.0)))
        drift = {axis: float(v) * fade_in for axis, v in self.drift.at(t).items()}
        nod = self.NOD_DEG * 0.5 * (1.0 - math.cos(2 * math.pi * self.NOD_HZ * t))
        blink = float(self.blinks.at(t)) if self.blinks is not None else 0.0
        return Pose(blink=blink, pitch=drift["pitch"] + fade_in * nod, yaw=drift["yaw"], roll=drift["roll"],
                    shift_x=drift["shift_x"], shift_y=drift["shift_y"])
