"""SadTalker's own motion for a live face: speech that arrives in pieces -> driving keypoints at 25 fps -> frames.

File mode sees a whole clip before its first frame; a live face sees speech as it arrives and shows every frame on
time. What runs where:

Per utterance, on chunks (``SpeechMotion``; ``SadTalkerFace`` runs it in a worker thread as soon as audio arrives,
ahead of the ticks that show it, with the networks batched over the frames at hand):

* audio features: ``StreamingAudioFeatures``, each frame's mel window as soon as the audio 92.5 ms past the frame
  has arrived: the windows file mode computes.
* ExpNet: frame-wise given its inputs (mel window, reference expression, blink ratio), so each frame's expression
  is file mode's for the same inputs. Blinks: the official schedule (5-frame blinks 10..69 frames apart), drawn as
  the utterance goes.
* PoseVAE: its decoder sees 32 frames of audio at once, so it cannot be causal. A window runs every POSE_HOP frames
  over the last 32 frames heard (left-padded at the start of the utterance by repeating the first frame, as file
  mode pads a short clip); consecutive windows overlap by 32 - POSE_HOP frames, and each frame's motion is the
  cross-fade of the two windows that cover it, so nothing jumps where one window hands over to the next; then file
  mode's smoothing (Savitzky-Golay, 13 frames). The head moves as PoseVAE moved it POSE_DELAY frames (0.84 s)
  earlier; one latent sample per 32 frames, as in file mode.
* MappingNet: 27-frame windows of coefficients centred on the frame, the frames not known yet repeating the newest
  one known when the frame's chunk is computed (file mode's rule at the end of a clip) -> head pose (degrees),
  translation, per-keypoint expression offsets: the frame's motion vector (MOTION_SIZE numbers). One pass over a
  chunk's sequence serves all its windows (``MappingNet.sequence``: a fifth of the work of a window per frame).

Per tick (``SadTalkerFace.frame``, the session's thread):

* idle: the source photo's own coefficients (its pose and neutral expression) through MappingNet, with blinks
  (ExpNet's blink input is linear: a blink adds ratio x its weight column to the expression) and a slow sway of the
  head; computed once, so an idle tick runs no network;
* a speech weight follows whether the tick shows speech (ATTACK_TICKS up, RELEASE_TICKS down) and blends idle and
  speech motion: idle -> speech -> idle has no jump, and an underrun closes the mouth the same way;
* motion -> keypoints (``pose_keypoints``) -> the keypoint preview's warp at the session size (milliseconds), or
  the full renderer where a timed frame at the start shows it keeps up with 25 fps (a GPU).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Literal

import cv2
import numpy as np
import torch
from scipy.signal import savgol_coeffs

from core.options import FPS

from .coefficients import BLINK_SHAPE, POSE_SLICE, SMOOTHING_ORDER, SMOOTHING_WINDOW
from .facerender import SEMANTIC_RADIUS, FaceRenderer, driving_coefficients, frame_to_uint8, prepare_render_inputs
from .keypoint_preview import KeypointPreview
from .keypoints import degrees_from_bins, pose_keypoints
from .mel import SAMPLES_PER_VIDEO_FRAME, WINDOW_LOOKAHEAD_SAMPLES, StreamingAudioFeatures
from .models.audio2exp import NUM_EXP
from .models.audio2pose import LATENT_DIM, POSE_DIM, SEQ_LEN
from .models.mapping import HeadMotion, MappingNet
from .preprocess import crop_portrait

log = logging.getLogger(__name__)

POSE_HOP = 8  # a PoseVAE window every 8 frames (its decoder costs ~15 ms on a CPU core)
# the head plays PoseVAE's motion this many frames late: the two windows of a frame, and those of the 6 frames after
# it that file mode's Savitzky-Golay smoothing (13 frames, order 2) takes in, have heard the audio up to the frame shown
POSE_DELAY = 2 * POSE_HOP - 1 + SMOOTHING_WINDOW // 2
_SMOOTHING = savgol_coeffs(SMOOTHING_WINDOW, SMOOTHING_ORDER, use="dot").astype(np.float32)  # (13,) centre weights
NUM_KP = 15
MOTION_SIZE = 3 + 3 + 3 * NUM_KP  # yaw, pitch, roll (degrees) | translation (3) | expression offsets (15 x 3)
BLINK_GAPS = (10, 70)  # frames between blinks: the official random.choice(range(10, 70)) of a long clip
ATTACK_TICKS = 3  # idle -> speech over 120 ms
RELEASE_TICKS = 8  # speech -> idle (or an underrun: the mouth closes) over 320 ms
SWITCH_TICKS = 8  # an utterance right after another: the change of motion is spread over this many ticks
SWAY_DEGREES = (2.0, 1.5, 1.0)  # idle head sway (yaw, pitch, roll), peak, from two slow sines each
SWAY_HZ = (0.05, 0.2)
FULL_RENDER_BUDGET_S = 0.030  # the full renderer runs where a frame takes at most this (25 fps leaves 40 ms)
MOTION_WAIT_S = 10.0  # a tick waits at most this for the worker (it is normally done ticks ahead)

RendererChoice = Literal["auto", "preview", "full"]


# ------------------------------------------------------------------------------------------------ motion vectors
def motion_vectors(head: HeadMotion) -> np.ndarray:
    """MappingNet's output for B frames -> (B, MOTION_SIZE) float32: degrees (yaw, pitch, roll), t, exp."""
    degrees = [degrees_from_bins(logits)[:, None] for logits in (head.yaw, head.pitch, head.roll)]
    return torch.cat([*degrees, head.t, head.exp], dim=1).float().cpu().numpy()


def keypoints_of(kp_canonical: torch.Tensor, motion: np.ndarray) -> torch.Tensor:
    """The canonical keypoints (1, K, 3) posed by a motion vector (MOTION_SIZE,) -> (1, K, 3)."""
    m = torch.from_numpy(np.asarray(motion, np.float32)[None]).to(kp_canonical.device, kp_canonical.dtype)
    return pose_keypoints(kp_canonical, m[:, 0], m[:, 1], m[:, 2], m[:, 3:6], m[:, 6:])


def _mapped(mapping: MappingNet, windows: np.ndarray) -> np.ndarray:
    """(n, C, 27) coefficient windows -> (n, MOTION_SIZE) motion vectors."""
    param = next(mapping.parameters())
    with torch.inference_mode():
        return motion_vectors(mapping(torch.from_numpy(np.ascontiguousarray(windows)).to(param.device, param.dtype)))


class BlinkSchedule:
    """The official random blinks (5 frames, BLINK_SHAPE, separated by gaps of BLINK_GAPS frames), drawn lazily so
    it never ends and never grows."""

    def __init__(self, rng: np.random.Generator, enabled: bool = True):
        self._rng = rng
        self._enabled = enabled
        self._starts: list[int] = []
        self._frontier = 0  # drawn up to here (the end of the last blink)

    def starts(self, first: int, stop: int) -> list[int]:
        """Frames in [first, stop) where a blink starts."""
        while self._enabled and self._frontier < stop:
            start = self._frontier + int(self._rng.integers(*BLINK_GAPS))
            self._starts.append(start)
            self._frontier = start + len(BLINK_SHAPE)
        self._starts = [s for s in self._starts if s >= first - 4 * SEMANTIC_RADIUS]  # nothing looks further back
        return [s for s in self._starts if first <= s < stop]

    def ratio(self, first: int, count: int) -> np.ndarray:
        """(count,) float32 eye-closure ratio of frames first .. first+count-1."""
        ratio = np.zeros(count, np.float32)
        for start in self.starts(first - len(BLINK_SHAPE) + 1, first + count):
            for k, value in enumerate(BLINK_SHAPE):
                if 0 <= start + k - first < count:
                    ratio[start + k - first] = value
        return ratio


# ------------------------------------------------------------------------------------------------ speech
class SpeechMotion:
    """One utterance's motion, frame by frame as its audio arrives (synchronous; see the module docstring).

    ``push`` audio, ``finish`` at its end; ``motion()`` returns the motion vectors of the frames that became
    computable, in order (``frames_done`` counts them). ``coefficients`` keeps the last frames' 70 coefficients
    (expression 64 | pose 6), for inspection.
    """

    def __init__(self, audio2exp: torch.nn.Module, audio2pose: torch.nn.Module, mapping: MappingNet,
                 source_coeffs: np.ndarray, preprocess: str, rng: np.random.Generator, use_blink: bool = True):
        self.audio2exp, self.audio2pose, self.mapping = audio2exp, audio2pose, mapping
        param = next(audio2exp.parameters())
        self._device, self._dtype = param.device, param.dtype
        self.source = np.asarray(source_coeffs, np.float32)  # (C,) C = 70, or 73 for full
        self.preprocess = preprocess
        self.features = StreamingAudioFeatures()
        self._rng = rng
        self._blinks = BlinkSchedule(rng, use_blink)
        self._noise: dict[int, np.ndarray] = {}  # latent sample per 32 frames
        self._embeddings = np.zeros((0, 512), np.float32)  # PoseVAE audio embeddings from frame _embedding_first
        self._embedding_first = 0
        self._windows: dict[int, np.ndarray] = {}  # PoseVAE window j: (32, 6) motion of frames jH-31 .. jH
        self._next_window = 1
        self._driving = np.zeros((0, len(self.source)), np.float32)  # MappingNet inputs from frame _driving_first
        self._driving_first = 0
        self.frames_done = 0
        self.coefficients = np.zeros((0, 70), np.float32)  # the last batch's generated coefficients

    def push(self, samples: np.ndarray) -> None:
        self.features.push(samples)

    def finish(self) -> None:
        self.features.finish()

    @property
    def complete(self) -> bool:
        """The audio has ended and every frame's motion has come out."""
        return self.features.finished and self.frames_done >= (self.features.num_frames or 0)

    def motion(self) -> np.ndarray:
        """(n, MOTION_SIZE) float32 motion of the next n frames (n = 0 when no new frame can be computed yet)."""
        windows = self.features.windows()  # (n, 80, 16)
        n = len(windows)
        if n == 0:
            return np.zeros((0, MOTION_SIZE), np.float32)
        first = self.frames_done
        with torch.inference_mode():
            mel = torch.from_numpy(windows).to(self._device, self._dtype)[None, :, None]  # (1, n, 1, 80, 16)
            ref = torch.from_numpy(self.source[:NUM_EXP]).to(self._device, self._dtype).expand(1, n, NUM_EXP)
            ratio = torch.from_numpy(self._blinks.ratio(first, n)).to(self._device, self._dtype).view(1, n, 1)
            exp = self.audio2exp(mel, ref, ratio)[0].float().cpu().numpy()  # (n, 64)
            embeddings = self.audio2pose.audio_encoder(mel)[0].float().cpu().numpy()  # (n, 512)
        self._embeddings = np.concatenate([self._embeddings, embeddings])
        last = first + n - 1
        self._run_pose_windows(last)
        pose = np.stack([self._smoothed_pose(f - POSE_DELAY) for f in range(first, last + 1)])  # (n, 6)
        generated = np.concatenate([exp, self.source[None, POSE_SLICE] + pose], axis=1)  # (n, 70)
        self.coefficients = generated
        self._driving = np.concatenate([self._driving, driving_coefficients(generated, self.source, self.preprocess)])
        # the frames before the utterance repeat its first (file mode), those not known yet the newest (file mode at
        # a clip's end): one MappingNet pass over the sequence gives every frame's 27-frame window at once
        rows = np.clip(np.arange(first - SEMANTIC_RADIUS, last + SEMANTIC_RADIUS + 1), 0, last)  # (n + 26,)
        sequence = self._driving[rows - self._driving_first].T  # (C, n + 26)
        param = next(self.mapping.parameters())
        with torch.inference_mode():
            vectors = motion_vectors(self.mapping.sequence(torch.from_numpy(np.ascontiguousarray(sequence))
                                                           .to(param.device, param.dtype)))  # (n, MOTION_SIZE)
        self.frames_done = last + 1
        self._forget()
        return vectors

    def _run_pose_windows(self, last: int) -> None:
        """Every PoseVAE window whose audio has arrived (frames up to ``last``), in one decoder batch."""
        stop = last // POSE_HOP + 1
        if stop <= self._next_window:
            return
        js = range(self._next_window, stop)
        audio, noise = [], []
        for j in js:
            frames = np.clip(np.arange(j * POSE_HOP - SEQ_LEN + 1, j * POSE_HOP + 1), 0, None)  # left pad: frame 0
            audio.append(self._embeddings[frames - self._embedding_first])
            block = j * POSE_HOP // SEQ_LEN
            if block not in self._noise:
                self._noise = {block: self._rng.standard_normal(LATENT_DIM).astype(np.float32)}
            noise.append(self._noise[block])
        m = len(js)
        with torch.inference_mode():
            decoder = self.audio2pose.netG.decoder
            motion = decoder(torch.from_numpy(np.tile(self.source[POSE_SLICE], (m, 1))).to(self._device, self._dtype),
                             torch.from_numpy(np.stack(noise)).to(self._device, self._dtype),
                             torch.zeros(m, dtype=torch.long, device=self._device),  # pose style 0
                             torch.from_numpy(np.stack(audio)).to(self._device, self._dtype))  # (m, 32, 6)
        for j, window in zip(js, motion.float().cpu().numpy()):
            self._windows[j] = window
        self._next_window = stop

    def _smoothed_pose(self, a: int) -> np.ndarray:
        """(6,) pose motion of audio frame ``a``, smoothed over time as file mode smooths it."""
        radius = SMOOTHING_WINDOW // 2
        return _SMOOTHING @ np.stack([self._pose_motion(a + k) for k in range(-radius, radius + 1)])

    def _pose_motion(self, a: int) -> np.ndarray:
        """(6,) motion of audio frame ``a``: the cross-fade of windows j and j+1 over a in ((j-1)H, jH]; before the
        utterance (and the first window's fade-in) the source's own pose (0)."""
        if a <= -POSE_HOP:
            return np.zeros(POSE_DIM, np.float32)
        j = -(-a // POSE_HOP)
        alpha = (a - (j - 1) * POSE_HOP) / POSE_HOP

        def row(k: int) -> np.ndarray:
            return np.zeros(POSE_DIM, np.float32) if k == 0 else self._windows[k][a - (k * POSE_HOP - SEQ_LEN + 1)]

        return (1.0 - alpha) * row(j) + alpha * row(j + 1)

    def _forget(self) -> None:
        """Keep what later frames need: the embeddings of the next windows, the windows of the next frames' pose,
        MappingNet's last 13 frames."""
        keep = max(0, self._next_window * POSE_HOP - SEQ_LEN + 1)
        if keep > self._embedding_first:
            self._embeddings = self._embeddings[keep - self._embedding_first:]
            self._embedding_first = keep
        first_needed = -(-(self.frames_done - POSE_DELAY - SMOOTHING_WINDOW // 2) // POSE_HOP)
        self._windows = {j: w for j, w in self._windows.items() if j >= first_needed}
        keep = max(0, self.frames_done - SEMANTIC_RADIUS)
        if keep > self._driving_first:
            self._driving = self._driving[keep - self._driving_first:]
            self._driving_first = keep


# ------------------------------------------------------------------------------------------------ idle
class IdleMotion:
    """The source photo at rest: its own pose and expression through MappingNet, blinks and a slow sway; per tick
    without a network (the blink's effect over MappingNet's 27-frame reach is computed once)."""

    def __init__(self, mapping: MappingNet, source_driving: np.ndarray, blink_column: np.ndarray,
                 rng: np.random.Generator, use_blink: bool = True):
        source = np.asarray(source_driving, np.float32)  # (C,)
        self.rest = _mapped(mapping, np.repeat(source[None, :, None], 2 * SEMANTIC_RADIUS + 1, axis=2))[0]
        # one blink at frames 0..4 among rest frames: MappingNet sees it from frame -13 to frame 4 + 13
        sequence = np.repeat(source[None], len(BLINK_SHAPE) + 4 * SEMANTIC_RADIUS, axis=0)  # (57, C)
        for k, value in enumerate(BLINK_SHAPE):
            sequence[2 * SEMANTIC_RADIUS + k, :NUM_EXP] += value * blink_column
        param = next(mapping.parameters())
        with torch.inference_mode():
            head = mapping.sequence(torch.from_numpy(sequence.T.copy()).to(param.device, param.dtype))
        self._blink_delta = motion_vectors(head) - self.rest  # (31, MOTION_SIZE): offsets -13 .. 17
        self._blinks = BlinkSchedule(rng, use_blink)
        self._sway = [(amplitude / 2, rng.uniform(*SWAY_HZ, size=2), rng.uniform(0, 2 * np.pi, size=2))
                      for amplitude in SWAY_DEGREES]

    def at(self, tick: int) -> np.ndarray:
        motion = self.rest.copy()
        reach_before, reach_after = SEMANTIC_RADIUS, len(self._blink_delta) - SEMANTIC_RADIUS
        for start in self._blinks.starts(tick - reach_after + 1, tick + reach_before + 1):
            motion += self._blink_delta[tick - start + reach_before]
        t = tick / FPS
        for axis, (amplitude, hz, phase) in enumerate(self._sway):
            motion[axis] += amplitude * float(np.sin(2 * np.pi * hz * t + phase).sum())
        return motion


# ------------------------------------------------------------------------------------------------ worker
class _MotionWorker:
    """Runs the utterances' ``SpeechMotion`` in a thread as their audio is fed; ticks collect the results."""

    def __init__(self, make_motion: Callable[[int], SpeechMotion]):
        self._make_motion = make_motion
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._results: dict[tuple[int, int], np.ndarray] = {}
        self._ready = threading.Condition()
        self._error: BaseException | None = None
        self._closed = False
        self.busy_s = 0.0  # time spent computing (for the bench)
        self.frames = 0
        self._thread = threading.Thread(target=self._run, name="sadtalker-motion", daemon=True)
        self._thread.start()

    def feed(self, utterance: int, samples: np.ndarray, complete: bool) -> None:
        self._inbox.put((utterance, samples, complete))

    def result(self, utterance: int, index: int, timeout: float = MOTION_WAIT_S) -> np.ndarray:
        key = (utterance, index)
        with self._ready:
            if not self._ready.wait_for(lambda: key in self._results or self._error is not None or self._closed,
                                        timeout):
                raise RuntimeError(f"the speech motion of frame {index} did not come within {timeout:g} s")
            if self._error is not None:
                raise RuntimeError("the speech motion failed") from self._error
            if key not in self._results:
                raise RuntimeError("the face was closed")
            for old in [k for k in self._results if k <= key]:  # earlier frames are not shown any more
                vector = self._results.pop(old)
            return vector

    def close(self) -> None:
        self._closed = True
        self._inbox.put(None)
        with self._ready:
            self._ready.notify_all()

    def _run(self) -> None:
        torch.set_num_threads(1)  # small batches: one core each is faster than two that wait on each other
        current: tuple[int, SpeechMotion] | None = None
        try:
            while True:
                items = [self._inbox.get()]
                while not self._inbox.empty():  # everything that arrived meanwhile: one batch
                    items.append(self._inbox.get())
                for item in items:
                    if item is None:
                        return
                    utterance, samples, complete = item
                    if current is not None and current[0] != utterance:
                        self._compute(current)
                        current = None
                    if current is None:
                        current = (utterance, self._make_motion(utterance))
                    current[1].push(samples)
                    if complete:
                        current[1].finish()
                if current is not None:
                    self._compute(current)
        except BaseException as exc:  # noqa: BLE001 - handed to the tick that waits for it
            log.exception("the SadTalker speech motion failed")
            with self._ready:
                self._error = exc
                self._ready.notify_all()

    def _compute(self, current: tuple[int, SpeechMotion]) -> None:
        utterance, motion = current
        started = time.perf_counter()
        first = motion.frames_done
        vectors = motion.motion()
        self.busy_s += time.perf_counter() - started
        self.frames += len(vectors)
        if len(vectors):
            with self._ready:
                for k, vector in enumerate(vectors):
                    self._results[(utterance, first + k)] = vector
                self._ready.notify_all()


# ------------------------------------------------------------------------------------------------ the face
def _smoothstep(x: float) -> float:
    return x * x * (3.0 - 2.0 * x)


class SadTalkerFace:
    """An always-on SadTalker face for a live session: ``frame(t, speech)`` once per tick, in order.

    ``speech`` is the tick's speech frame (``live.session.SpeechFrame``: its ``context`` holds the utterance's audio
    from sample ``context_start`` on, as far ahead as has arrived; ``complete`` when that reaches the utterance's
    end) or None (idle, a pause, an underrun). ``scheduled(speech)`` hands a frame over as soon as the session gives
    it a tick, so its motion is computed before that tick comes.
    """

    # a frame can be shown once its mel window's audio (1480 samples past it) is in its context, which also starts
    # 192 samples before the frame: 3 frames of look-ahead (120 ms)
    lookahead_frames = -(-(WINDOW_LOOKAHEAD_SAMPLES + 192) // SAMPLES_PER_VIDEO_FRAME)
    context_frames = 10  # audio handed over with each frame (as far as it has arrived): the worker batches it
    # A tick may wait for the motion worker: a frame made earlier would leave it less time, and a wait would count
    # as a slow frame and push the lead further. One tick, as the keypoint renderer keeps up on a CPU.
    render_ahead_ticks = (1, 1)

    def __init__(self, pipeline, rgb: np.ndarray, points: np.ndarray, *, size: int,
                 preprocess: Literal["crop", "full"] = "crop", seed: int | None = None, use_blink: bool = True,
                 renderer: RendererChoice = "auto"):
        network_size = 256 if 256 in pipeline.available_sizes() else pipeline.available_sizes()[0]
        nets = pipeline.networks(network_size)
        source = pipeline.source_face(rgb, points, preprocess, network_size)
        inputs = prepare_render_inputs(source.crop.image, source.coeff, source.coeff[:, :70], preprocess=preprocess,
                                       size=network_size)
        self._renderer = FaceRenderer(nets.kp_extractor, nets.generator, nets.mapping_crop, nets.mapping_still)
        mapping = self._renderer.mappings[inputs.channels]
        prepared = self._renderer.prepare(inputs, with_features=False)  # the keypoint detector, once
        self._kp_canonical = prepared.kp_canonical  # (1, K, 3)
        kp_source = prepared.kp_source[0].float().cpu().numpy()
        rngs = np.random.default_rng(seed).spawn(2)
        blink_column = nets.audio2exp.mapping1.weight[:, -1].float().cpu().numpy()  # the blink ratio's weights
        self._idle = IdleMotion(mapping, inputs.source_coeffs, blink_column, rngs[0], use_blink)
        self._speech_rng = rngs[1]

        def make_motion(utterance: int) -> SpeechMotion:
            return SpeechMotion(nets.audio2exp, nets.audio2pose, mapping, inputs.source_coeffs, preprocess,
                                self._speech_rng.spawn(1)[0], use_blink)

        self._output = _Output(rgb, points, source.crop, preprocess, size)
        self._preview = KeypointPreview(crop_portrait(rgb, points, preprocess, self._output.crop_side).image,
                                        kp_source, size=self._output.crop_side)
        self._full_source = None
        self.renderer_name, self.renderer_note = self._choose_renderer(renderer, inputs)
        self._worker = _MotionWorker(make_motion)
        self._tick = 0
        self._weight = 0.0  # speech weight before the smoothstep
        self._last_speech: np.ndarray | None = None
        self._utterance: int | None = None
        self._switch = np.zeros(MOTION_SIZE, np.float32)  # offset spreading an utterance-to-utterance change
        self._switch_left = 0
        self._feeding: int | None = None
        self._fed = 0  # samples of the utterance being fed handed to the worker
        self._fed_complete = False
        self.last_motion: np.ndarray | None = None  # the last tick's motion vector (for tests and the bench)

    # --------------------------------------------------------------------------------------------- renderer
    def _choose_renderer(self, requested: RendererChoice, inputs) -> tuple[str, str]:
        device = self._renderer.device
        if requested == "preview":
            return "keypoint-preview", "chosen"
        if requested == "auto" and device.type == "cpu":
            return "keypoint-preview", "the full renderer takes seconds a frame on a CPU"
        self._full_source = self._renderer.prepare(inputs, with_features=True)
        kp = keypoints_of(self._kp_canonical, self._idle.at(0))
        self._renderer.render_keypoints(self._full_source, kp)  # warm-up
        times = []
        for _ in range(3):
            started = time.perf_counter()
            self._renderer.render_keypoints(self._full_source, kp)
            times.append(time.perf_counter() - started)
        seconds = float(np.median(times))
        if requested == "full" or seconds <= FULL_RENDER_BUDGET_S:
            return "full", f"{seconds * 1000:.0f} ms a frame on {device.type}"
        self._full_source = None
        return "keypoint-preview", f"the full renderer takes {seconds * 1000:.0f} ms a frame on {device.type}"

    # --------------------------------------------------------------------------------------------- ticks
    def scheduled(self, speech) -> None:
        """A speech frame was given a tick: start on its motion now (its audio, and what arrived after it)."""
        self._feed(speech)

    def frame(self, t: float, speech) -> np.ndarray:
        motion = self._step(speech)
        kp = keypoints_of(self._kp_canonical, motion)
        if self._full_source is not None:
            with torch.inference_mode():
                face = frame_to_uint8(self._renderer.render_keypoints(self._full_source, kp)[0])
        else:
            face = self._preview.render_keypoints(kp[0].float().cpu().numpy())
        return self._output.compose(face)

    def skip(self, t: float, speech) -> None:
        """A tick that is not rendered (the CPU fell behind): the motion still moves on, so nothing jumps."""
        self._step(speech)

    def close(self) -> None:
        self._worker.close()

    @property
    def motion_busy_s(self) -> float:
        """CPU seconds the worker spent on speech motion, and frames it made (for the bench)."""
        return self._worker.busy_s

    @property
    def motion_frames(self) -> int:
        return self._worker.frames

    def _step(self, speech) -> np.ndarray:
        tick = self._tick
        self._tick += 1
        idle = self._idle.at(tick)
        if speech is not None:
            self._feed(speech)
            vector = self._worker.result(speech.utterance, speech.index)
            if self._utterance not in (None, speech.utterance) and self._weight > 0 and self._last_speech is not None:
                self._switch = self._last_speech + self._switch_offset() - vector  # continue from what was shown
                self._switch_left = SWITCH_TICKS
            self._utterance = speech.utterance
            self._last_speech = vector
            self._weight = min(1.0, self._weight + 1.0 / ATTACK_TICKS)
        else:
            self._weight = max(0.0, self._weight - 1.0 / RELEASE_TICKS)
        if self._last_speech is None or self._weight == 0.0:
            motion = idle
        else:
            speech_motion = self._last_speech + self._switch_offset()
            motion = idle + _smoothstep(self._weight) * (speech_motion - idle)
        if self._switch_left:
            self._switch_left -= 1
        self.last_motion = motion
        return motion

    def _switch_offset(self) -> np.ndarray:
        return self._switch * (self._switch_left / SWITCH_TICKS)

    def _feed(self, speech) -> None:
        """Hand the worker the audio of ``speech``'s context that it has not had yet."""
        if speech.utterance != self._feeding:
            if self._feeding is not None and not self._fed_complete:
                self._worker.feed(self._feeding, np.zeros(0, np.float32), True)
            self._feeding, self._fed, self._fed_complete = speech.utterance, 0, False
        if self._fed_complete:
            return
        end = speech.context_start + len(speech.context)
        start = max(self._fed, speech.context_start, 0)
        if end > start or speech.complete:
            samples = speech.context[start - speech.context_start:] if end > start else np.zeros(0, np.float32)
            if start > self._fed:  # audio the worker never saw (cannot happen with in-order frames): silence
                samples = np.concatenate([np.zeros(start - self._fed, np.float32), samples])
            self._worker.feed(speech.utterance, samples, speech.complete)
            self._fed = max(self._fed, end)
            self._fed_complete = speech.complete


class _Output:
    """Puts the rendered face crop into the session's frame: the crop at size x size, or (full) pasted back into the
    portrait scaled to fit size x size, with a feathered edge (the warp leaves the crop's border still)."""

    FEATHER = 0.08  # of the box's side

    def __init__(self, rgb: np.ndarray, points: np.ndarray, crop, preprocess: str, size: int):
        self.preprocess = preprocess
        if preprocess != "full":
            self.crop_side = size
            self.size = (size, size)
            return
        height, width = rgb.shape[:2]
        scale = size / max(height, width)
        self.size = (max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2))
        self._background = cv2.resize(rgb, self.size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        x0, y0, x1, y1 = crop.paste_box
        sx, sy = self.size[0] / width, self.size[1] / height
        box = (int(round(x0 * sx)), int(round(y0 * sy)), int(round(x1 * sx)), int(round(y1 * sy)))
        self._box = (max(0, box[0]), max(0, box[1]), min(self.size[0], box[2]), min(self.size[1], box[3]))
        self._inner = (self._box[0] - box[0], self._box[1] - box[1])  # where the clamped box starts in the patch
        self._patch_size = (max(1, box[2] - box[0]), max(1, box[3] - box[1]))
        self.crop_side = max(16, max(self._patch_size))
        w, h = self._patch_size
        self._alpha = np.outer(self._ramp(h), self._ramp(w))[..., None].astype(np.float32)  # (h, w, 1)

    def _ramp(self, n: int) -> np.ndarray:
        """(n,) 0 at the edges rising to 1 over FEATHER of n."""
        distance = np.minimum(np.arange(n) + 0.5, n - np.arange(n) - 0.5)
        return np.clip(distance / max(1.0, self.FEATHER * n), 0.0, 1.0)

    def compose(self, face: np.ndarray) -> np.ndarray:
        if self.preprocess != "full":
            return face if face.shape[1::-1] == self.size else cv2.resize(face, self.size)
        patch = cv2.resize(face, self._patch_size)
        x0, y0, x1, y1 = self._box
        ix, iy = self._inner
        region = patch[iy:iy + y1 - y0, ix:ix + x1 - x0].astype(np.float32)
        alpha = self._alpha[iy:iy + y1 - y0, ix:ix + x1 - x0]
        out = self._background.copy()
        out[y0:y1, x0:x1] = (alpha * region + (1 - alpha) * out[y0:y1, x0:x1]).astype(np.uint8)
        return out
