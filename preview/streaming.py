"""Causal motion of a face that is always on: it idles, speaks speech as it arrives in 40 ms frames, idles again.

File mode (``motion_from_audio``) sees the whole clip before the first frame. Here each display tick sees the cue of
the speech frame it shows and at most ``LOOKAHEAD_FRAMES`` cues after it (120 ms); nothing else is known of the
future, and no statistic of a whole clip exists. The per-frame rules are file mode's (shared from preview/motion.py);
what changes is where their references come from:

* Loudness: the mouth's gate and reference are file mode's rule (``loudness_levels``: pauses = 10th percentile,
  loud syllables = 90th percentile of the active frames) applied to the speech frames heard in the last
  ``LOUDNESS_HISTORY`` (15 s of speech, across utterances; idle time does not count) plus the look-ahead. A prior
  worth a few frames takes part in the percentiles: ``PRIOR_LOUD_FRAMES`` frames at a quiet speaking level and
  ``PRIOR_SILENT_FRAMES`` silent ones. It decides nothing once a second or two of speech at any ordinary level has
  been heard, but keeps a first quiet sound (a breath) from being taken for a loud syllable; with the look-ahead
  already inside the percentiles, the first syllable of the first utterance opens the mouth fully.
* Lip shape: the centroid against a running median and spread of the voiced frames' centroids (last ~10 s of
  vowels), blended with a typical voice's by the evidence (a prior worth ``PRIOR_VOICED_FRAMES`` vowels).
* Emphasis: file mode's peak test on the loudness envelope's onsets, with the next frame's cue as its look-ahead.
* Continuity: a tick without cues (idle, a pause, an underrun) is silence for every follower, so the mouth closes
  through its release and reopens through its attack, the liveliness of the drift eases down, and nothing jumps.
  For its first ``RESUME_TICKS`` ticks, speech opens the jaw by at most ``MAX_OPEN_STEP`` per tick: speech
  resuming mid-vowel after an underrun would otherwise snap the mouth open in one frame (file mode never sees such
  a cut; an utterance's own onset rises more slowly than that anyway).
* Idle: ``IdleMotion``'s drift and listening nod (same seed and t - t0: the same head motion), the nod weighted by a
  slow follower that fades it out while speaking and back in a second after the speech stopped.
* Nothing grows with the session's time: ring buffers of fixed size, blinks drawn lazily, emphases dropped once
  settled.
"""
from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.options import FPS, SAMPLE_RATE

from .motion import (ACTIVITY_ATTACK, ACTIVITY_RELEASE, ATTACK, ENVELOPE_ATTACK, ENVELOPE_RELEASE, EVENT_FRAMES,
                     FADE_IN_S, ONSET_MIN, ONSET_SPACING, RELEASE, SAMPLES_PER_FRAME, SHAPE_ATTACK, SHAPE_RELEASE,
                     SPEAKING_LIVELINESS, SPEAKING_OPENING, VOICED_OPENING, BlinkStream, Emphasis, HeadDrift,
                     IdleMotion, analysis_window, follow_step, jaw_drop, lip_shape_target, loudness_gate,
                     loudness_levels, opening_from_voice, window_features)
from .warp import Pose

CUE_WINDOW = 1024  # samples (16 kHz) an audio frame's cue is computed from, centred on the frame's 640 samples
LOOKAHEAD_FRAMES = 3  # speech frames after the current one that step() may look at (120 ms)
assert CUE_WINDOW == analysis_window(SAMPLE_RATE)  # the cue is file mode's per-frame analysis

LOUDNESS_HISTORY = 15 * FPS  # speech frames (~10 s of them voiced) behind the running loudness percentiles
PRIOR_LOUD_LEVEL = 0.015  # voice-band RMS of the loud syllables of speech at ~ -40 dBFS (ordinary speech: 0.05-0.3)
PRIOR_LOUD_FRAMES = 4  # decide the reference only while < 40 frames (1.6 s) of speech have been heard
PRIOR_SILENT_FRAMES = 10  # hold the noise floor at 0 until ~4 s of speech (with its pauses) have been heard
CENTROID_HISTORY = 10 * FPS  # vowel frames behind the running lip-shape reference
PRIOR_CENTROID_HZ, PRIOR_SPREAD_HZ = 740.0, 190.0  # median and median deviation of vowels' centroids (adult voice)
PRIOR_VOICED_FRAMES = 12  # the lip-shape prior weighs as much as this many vowel frames
MAX_OPEN_STEP = 0.45  # jaw opening (1 = loud syllable) per tick at most while speech (re)starts...
RESUME_TICKS = 3  # ...for this many ticks (an utterance's own onset rises more slowly than that anyway)
SHAPE_REST = 1e-3  # with no speech, a lip shape this small is the photo's: exactly 0 from there
LISTEN_AFTER = FPS  # ticks without speech before the idle nod comes back (a pause is not the end of a turn)
LISTEN_ATTACK, LISTEN_RELEASE = 0.03, 0.06  # idle nod fades in over ~1.5 s, out over ~0.7 s
EMPHASIS_S = EVENT_FRAMES / FPS  # an emphasis has settled after this


@dataclass(frozen=True)
class Cue:
    """One 40 ms frame of speech, from its window (raw features, no normalisation)."""

    voice: float  # RMS in the voice band
    rms: float
    centroid: float  # Hz


def cue_of(window: np.ndarray) -> Cue:
    """The cue of one speech frame. ``window``: CUE_WINDOW float32 samples at 16 kHz, the frame's 640 samples in
    the middle ([192, 832)), zero-padded at utterance edges (see ``frame_window``)."""
    window = np.asarray(window, dtype=np.float32)
    if window.shape != (CUE_WINDOW,):
        raise ValueError(f"a cue window is {CUE_WINDOW} samples, got an array of shape {window.shape}")
    if not np.isfinite(window).all():  # one bad cue would poison the running statistics for 15 s of speech
        window = np.nan_to_num(window, nan=0.0, posinf=0.0, neginf=0.0)
    rms, voice, centroid = window_features(window[None])
    return Cue(voice=float(voice[0]), rms=float(rms[0]), centroid=float(centroid[0]))


def frame_window(samples: np.ndarray, index: int) -> np.ndarray:
    """The CUE_WINDOW samples around frame ``index`` of an utterance (16 kHz mono), zero-padded at its edges."""
    first = index * SAMPLES_PER_FRAME - (CUE_WINDOW - SAMPLES_PER_FRAME) // 2
    window = np.zeros(CUE_WINDOW, dtype=np.float32)
    lo, hi = max(first, 0), min(first + CUE_WINDOW, samples.size)
    if hi > lo:
        window[lo - first:hi - first] = samples[lo:hi]
    return window


def _percentile(values: np.ndarray, q: float) -> float:
    """``np.percentile(values, q)`` (linear interpolation) by one partial sort: ~10x faster on a few hundred values."""
    position = (values.size - 1) * q / 100.0
    below = int(position)
    above = min(below + 1, values.size - 1)
    part = np.partition(values, (below, above))
    return float(part[below] + (part[above] - part[below]) * (position - below))


class _RunningLoudness:
    """Gate and reference of the mouth opening from the recent speech frames: file mode's rule on a window."""

    def __init__(self):
        prior = [PRIOR_LOUD_LEVEL] * PRIOR_LOUD_FRAMES + [0.0] * PRIOR_SILENT_FRAMES
        self._fixed = len(prior)
        self._values = np.empty(self._fixed + LOUDNESS_HISTORY)  # (prior | ring of the last frames)
        self._values[:self._fixed] = prior
        self._count = 0
        self._next = 0

    def add(self, voice: float) -> None:
        self._values[self._fixed + self._next] = voice
        self._next = (self._next + 1) % LOUDNESS_HISTORY
        self._count = min(self._count + 1, LOUDNESS_HISTORY)

    def gate(self, lookahead: list[float]) -> tuple[float, float]:
        values = self._values[:self._fixed + self._count]
        if lookahead:
            values = np.concatenate((values, lookahead))
        return loudness_gate(*loudness_levels(values, _percentile))


class _RunningCentroid:
    """Median and spread (median absolute deviation) of the recent vowels' centroids, blended with a prior."""

    def __init__(self):
        self._values = np.empty(CENTROID_HISTORY)
        self._count = 0
        self._next = 0
        self._reference = (PRIOR_CENTROID_HZ, PRIOR_SPREAD_HZ)

    def add(self, centroid: float) -> None:
        self._values[self._next] = centroid
        self._next = (self._next + 1) % CENTROID_HISTORY
        self._count = min(self._count + 1, CENTROID_HISTORY)
        values = self._values[:self._count]
        median = _percentile(values, 50)
        spread = _percentile(np.abs(values - median), 50) + 1.0
        weight = self._count / (self._count + PRIOR_VOICED_FRAMES)
        self._reference = (weight * median + (1.0 - weight) * PRIOR_CENTROID_HZ,
                           weight * spread + (1.0 - weight) * PRIOR_SPREAD_HZ)

    @property
    def reference(self) -> tuple[float, float]:
        return self._reference


class StreamingMotion:
    """Pose at 25 fps for a face that is always on. step() is called exactly once per display tick, in order."""

    HEAD_AXES = ("pitch", "yaw", "roll", "shift_x", "shift_y")

    def __init__(self, seed: int | None = None, use_blink: bool = True):
        rng = np.random.default_rng(seed)
        drift = HeadDrift(rng)  # drawn first, as IdleMotion does: with the same seed the idle head is IdleMotion's
        freqs, phases, weights = (np.stack([drift.terms[axis][k] for axis in self.HEAD_AXES]) for k in range(3))
        self._drift = (2 * math.pi * freqs, phases, weights)  # (5 axes, 3 sines) each
        self._blink_rng, self._emphasis_rng = rng.spawn(2)
        self._use_blink = use_blink
        self._blinks: BlinkStream | None = None
        self._t0: float | None = None  # the first tick's time: the photo itself, motion fades in from there

        # mouth
        self._loudness = _RunningLoudness()
        self._centroids = _RunningCentroid()
        self._jaw_open = 0.0
        self._shape = 0.0
        self._speech_ticks = 0  # ticks with speech since the last one without
        # head
        self._activity = 0.0
        self._listening = 1.0
        self._quiet_ticks = LISTEN_AFTER
        self._envelope = (0.0, 0.0)  # loudness envelope at the previous tick and at the one before
        self._onset = 0.0  # at the previous tick
        self._tick = 0
        self._last_emphasis = -ONSET_SPACING
        self._emphases: collections.deque[tuple[float, Emphasis]] = collections.deque()

    def step(self, t: float, cues: Sequence[Cue]) -> Pose:
        """t: the session's time (s) of this tick. cues: [] when no speech plays at this tick (idle, a pause, or an
        underrun mid-utterance); else the cue of the speech frame shown at this tick followed by up to
        LOOKAHEAD_FRAMES cues of the frames after it (fewer at the end of an utterance)."""
        t = float(t)
        if self._t0 is None:
            self._t0 = t
            if self._use_blink:
                self._blinks = BlinkStream(self._blink_rng, t, first_after_s=0.4)
        opening, next_opening, jaw = self._mouth(cues)
        pitch, yaw, roll, shift_x, shift_y, brow = self._head(t, bool(cues), opening, next_opening)
        blink = self._blinks.at(t) if self._blinks is not None else 0.0
        self._tick += 1
        return Pose(jaw=jaw, lip_shape=self._shape, blink=blink, brow=brow, pitch=pitch, yaw=yaw, roll=roll,
                    shift_x=shift_x, shift_y=shift_y)

    def _mouth(self, cues: Sequence[Cue]) -> tuple[float, float, float]:
        """(this frame's opening, the next frame's, the Pose's jaw); updates the running statistics and followers."""
        if cues:
            cue = cues[0]
            self._loudness.add(cue.voice)
            ahead = [c.voice for c in cues[1:LOOKAHEAD_FRAMES + 1]]
            gate, reference = self._loudness.gate(ahead)
            opening = float(opening_from_voice(cue.voice, gate, reference))
            next_opening = float(opening_from_voice(ahead[0], gate, reference)) if ahead else 0.0
            if opening > VOICED_OPENING:
                self._centroids.add(cue.centroid)
            shape_target = float(lip_shape_target(cue.centroid, *self._centroids.reference, opening))
            self._speech_ticks += 1
        else:  # silence for every follower: the mouth closes through its release
            opening = next_opening = shape_target = 0.0
            self._speech_ticks = 0
        jaw_open = follow_step(self._jaw_open, opening, ATTACK, RELEASE)
        if self._speech_ticks <= RESUME_TICKS:  # speech (re)starting, maybe mid-vowel after an underrun
            jaw_open = min(jaw_open, self._jaw_open + MAX_OPEN_STEP)
        self._jaw_open = jaw_open
        self._shape = follow_step(self._shape, shape_target, SHAPE_ATTACK, SHAPE_RELEASE)
        if not cues and abs(self._shape) < SHAPE_REST:
            self._shape = 0.0
        return opening, next_opening, float(jaw_drop(self._jaw_open, self._shape))

    def _head(self, t: float, speech: bool, opening: float, next_opening: float) -> tuple[float, ...]:
        """(pitch, yaw, roll, shift_x, shift_y, brow): drift (livelier while speaking), the idle nod while
        listening, emphasis gestures."""
        since_start = t - self._t0
        self._activity = follow_step(self._activity, float(opening > SPEAKING_OPENING),
                                     ACTIVITY_ATTACK, ACTIVITY_RELEASE)
        self._quiet_ticks = 0 if speech else self._quiet_ticks + 1
        listening = 1.0 if self._quiet_ticks >= LISTEN_AFTER else 0.0
        self._listening = follow_step(self._listening, listening, LISTEN_ATTACK, LISTEN_RELEASE)
        self._detect_emphasis(t, opening, next_opening)

        fade_in = min(max(since_start / FADE_IN_S, 0.0), 1.0)
        fade_in = fade_in * fade_in * (3.0 - 2.0 * fade_in)  # smoothstep, as file mode's
        liveliness = fade_in * (1.0 + SPEAKING_LIVELINESS * self._activity)
        omega, phases, weights = self._drift
        pitch, yaw, roll, shift_x, shift_y = (liveliness * (weights * np.sin(omega * since_start + phases))
                                              .sum(axis=1)).tolist()
        nod = IdleMotion.NOD_DEG * 0.5 * (1.0 - math.cos(2 * math.pi * IdleMotion.NOD_HZ * since_start))
        pitch += fade_in * self._listening * nod
        brow = 0.0
        while self._emphases and t - self._emphases[0][0] >= EMPHASIS_S:
            self._emphases.popleft()
        for start, emphasis in self._emphases:
            d_pitch, d_yaw, d_roll, d_brow = emphasis.at(t - start)
            pitch, yaw, roll, brow = pitch + d_pitch, yaw + d_yaw, roll + d_roll, brow + d_brow
        return pitch, yaw, roll, shift_x, shift_y, brow

    def _detect_emphasis(self, t: float, opening: float, next_opening: float) -> None:
        """File mode's onset peak test at this tick; the next frame's onset comes from the look-ahead cue."""
        previous, before = self._envelope
        envelope = follow_step(previous, opening, ENVELOPE_ATTACK, ENVELOPE_RELEASE)
        onset = max(0.0, envelope - before)
        next_envelope = follow_step(envelope, next_opening, ENVELOPE_ATTACK, ENVELOPE_RELEASE)
        next_onset = max(0.0, next_envelope - previous)
        if (onset >= ONSET_MIN and onset >= self._onset and onset >= next_onset
                and self._tick - self._last_emphasis >= ONSET_SPACING):
            self._last_emphasis = self._tick
            self._emphases.append((t, Emphasis.draw(self._emphasis_rng, onset)))
        self._envelope = (envelope, previous)
        self._onset = onset
