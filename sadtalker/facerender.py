"""The face renderer step: 3DMM coefficients of every frame + the source crop -> video frames.

Faithful to the official ``get_facerender_data`` (renderer inputs) and ``make_animation`` (networks per frame):

* source image: the crop png -> float32 in [0, 1] -> resized to (size, size) with scikit-image, as the reference;
* MappingNet input: a window of 27 frames of coefficients (radius 13, indices clamped to the clip);
  70 channels (exp 64, angles 3, trans 3), or 73 for ``full`` / ``extfull`` (the source's crop parameters appended);
  the expression is multiplied by ``expression_scale``; ``still`` copies the source's pose (and crop) to every frame;
* ``input_yaw/pitch/roll``: per-frame degree sequences that replace the predicted driving angles;
* networks: canonical keypoints once, source keypoints once, then per frame mapping -> keypoint transformation ->
  generator.

Unlike the reference, frames come out one at a time in video order (never a whole clip in memory), the source-only
half of the generator runs once per clip, and ``batch_size`` groups *consecutive* frames. The reference's layout
(batch row b holds frames b*F .. b*F+F-1, padded with the last frame) is reproduced by
``RenderInputs.target_semantics`` / ``camera_pose_layout`` for checking; every frame depends only on its own
window, so the images are the same either way.
"""
from __future__ import annotations

import hashlib
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .cpu_memory import keep_freed_memory
from .keypoints import transform_keypoints
from .models.fast_conv import LOW_PRECISION_DTYPES, conv_precision
from .models.generator import OcclusionAwareSPADEGenerator, SourceFeatures
from .models.keypoint_detector import KeypointDetector
from .models.mapping import HeadMotion, MappingNet

SEMANTIC_RADIUS = 13  # MappingNet sees frames f-13 .. f+13
KEYPOINT_CHUNK = 512  # frames per MappingNet sequence call when keypoints are wanted fast (bounds its memory)
WINDOW = 2 * SEMANTIC_RADIUS + 1
EXP_DIMS = 64  # expression coefficients come first; then angles 64:67, translation 67:70, crop 70:73
MOTION_DIMS = 70


def uses_full_mapping(preprocess: str) -> bool:
    """``full``/``extfull`` use the 73-channel MappingNet (the source's crop parameters are part of its input)."""
    return "full" in preprocess.lower()


def prepare_source_image(source_rgb: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 crop -> (3, size, size) float32 in [0, 1] (``img_as_float32`` + skimage ``resize``)."""
    from skimage import img_as_float32
    from skimage.transform import resize

    if source_rgb.ndim != 3 or source_rgb.shape[2] != 3:
        raise ValueError(f"source crop must be (H, W, 3) RGB, got shape {source_rgb.shape}")
    image = resize(img_as_float32(source_rgb), (size, size, 3))
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)


def source_coefficients(source_coeff: np.ndarray, preprocess: str) -> np.ndarray:
    """The source's first-frame coefficients (1, 73) -> (C,) with C = 73 for full/extfull, else 70."""
    coeff = np.asarray(source_coeff, dtype=np.float32).reshape(-1)
    channels = 73 if uses_full_mapping(preprocess) else MOTION_DIMS
    if coeff.shape[0] < channels:
        raise ValueError(f"source coefficients need {channels} values for preprocess {preprocess!r}, "
                         f"got {coeff.shape[0]}")
    return coeff[:channels].copy()


def driving_coefficients(generated: np.ndarray, source: np.ndarray, preprocess: str, still: bool = False,
                         expression_scale: float = 1.0) -> np.ndarray:
    """Per-frame MappingNet channels (N, C) from the generated coefficients (N, >=70) and the source's (C,)."""
    generated = np.asarray(generated, dtype=np.float32)
    if generated.ndim != 2 or generated.shape[1] < MOTION_DIMS or generated.shape[0] < 1:
        raise ValueError(f"generated coefficients must be (frames, 70), got shape {generated.shape}")
    coeffs = generated[:, :MOTION_DIMS].copy()
    coeffs[:, :EXP_DIMS] = coeffs[:, :EXP_DIMS] * np.float32(expression_scale)
    if uses_full_mapping(preprocess):
        crop = np.repeat(source[None, MOTION_DIMS:], coeffs.shape[0], axis=0)
        coeffs = np.concatenate([coeffs, crop], axis=1)
    if still:
        coeffs[:, EXP_DIMS:] = source[None, EXP_DIMS:]  # pose, translation (and crop) of the source photo
    return coeffs


def semantic_window(coeffs: np.ndarray, index: int, radius: int = SEMANTIC_RADIUS) -> np.ndarray:
    """(N, C) -> (C, 2*radius+1): rows index-radius .. index+radius, clamped to the clip, transposed."""
    rows = np.clip(np.arange(index - radius, index + radius + 1), 0, coeffs.shape[0] - 1)
    return coeffs[rows].T


def camera_pose_sequence(degrees: Sequence[float], frame_num: int) -> np.ndarray:
    """Per-frame degrees (N,) from user angles: one value is constant; several are a path through them.

    The reference (``gen_camera_pose``): the total absolute change spread evenly over N-1 steps, each leg
    ``np.arange(d_i, d_i+1, +-step)`` (end excluded), cut or padded with its last value to N. Equal consecutive
    values add nothing (the reference would divide by zero); a path that yields nothing holds the first value.
    """
    degrees = [float(d) for d in degrees]
    if not degrees:
        raise ValueError("camera pose needs at least one angle")
    if len(degrees) == 1 or frame_num <= 1:
        return np.full(frame_num, degrees[0], dtype=np.float64)
    step = sum(abs(b - a) for a, b in zip(degrees[:-1], degrees[1:])) / (frame_num - 1)
    path: list[float] = []
    for start, stop in zip(degrees[:-1], degrees[1:]):
        if stop != start:
            path.extend(np.arange(start, stop, step if stop > start else -step).tolist())
    if not path:
        path = [degrees[0]]
    path = path[:frame_num] + [path[-1]] * max(0, frame_num - len(path))
    return np.asarray(path, dtype=np.float64)


def batch_layout(per_frame: np.ndarray, batch_size: int) -> np.ndarray:
    """The reference's batch layout: pad (N, ...) with its last row to a multiple of batch_size -> (bs, N/bs, ...)."""
    remainder = per_frame.shape[0] % batch_size
    if remainder:
        pad = np.repeat(per_frame[-1:], batch_size - remainder, axis=0)
        per_frame = np.concatenate([per_frame, pad], axis=0)
    return per_frame.reshape(batch_size, -1, *per_frame.shape[1:])


def gen_camera_pose(degrees: Sequence[float], frame_num: int, batch_size: int) -> np.ndarray:
    """The reference's ``gen_camera_pose``: per-frame degrees in the batch layout (batch_size, N/batch_size)."""
    return batch_layout(camera_pose_sequence(degrees, frame_num), batch_size)


@dataclass(frozen=True)
class RenderInputs:
    """Everything the renderer needs for one clip (the reference's ``get_facerender_data``, per frame)."""

    source_image: np.ndarray  # (3, S, S) float32 in [0, 1]
    source_coeffs: np.ndarray  # (C,) the source photo's coefficients; C = 70, or 73 for full/extfull
    driving_coeffs: np.ndarray  # (N, C) per-frame coefficients after expression scale / full / still
    yaw: np.ndarray | None = None  # (N,) degrees replacing the predicted driving yaw, or None
    pitch: np.ndarray | None = None
    roll: np.ndarray | None = None

    @property
    def num_frames(self) -> int:
        return int(self.driving_coeffs.shape[0])

    @property
    def channels(self) -> int:
        return int(self.source_coeffs.shape[0])

    @property
    def size(self) -> int:
        return int(self.source_image.shape[-1])

    def source_semantics(self) -> np.ndarray:
        """(C, 27): the source coefficients repeated over the window."""
        return np.repeat(self.source_coeffs[:, None], WINDOW, axis=1)

    def driving_window(self, index: int) -> np.ndarray:
        """(C, 27) MappingNet input of frame ``index``."""
        return semantic_window(self.driving_coeffs, index)

    def target_semantics(self, batch_size: int) -> np.ndarray:
        """All windows in the reference's layout (batch_size, ceil(N/bs), C, 27) (for checks; small)."""
        windows = np.stack([self.driving_window(i) for i in range(self.num_frames)])
        return batch_layout(windows, batch_size)

    def camera_pose_layout(self, axis: str, batch_size: int) -> np.ndarray | None:
        """The reference's ``yaw_c_seq``/``pitch_c_seq``/``roll_c_seq`` (batch_size, ceil(N/bs)), or None."""
        sequence = getattr(self, axis)
        return None if sequence is None else batch_layout(sequence, batch_size)


def prepare_render_inputs(source_rgb: np.ndarray, source_coeff: np.ndarray, generated_coeff: np.ndarray, *,
                          preprocess: str = "crop", still: bool = False, expression_scale: float = 1.0,
                          input_yaw: Sequence[float] | None = None, input_pitch: Sequence[float] | None = None,
                          input_roll: Sequence[float] | None = None, size: int = 256) -> RenderInputs:
    """The reference's ``get_facerender_data`` from arrays: the crop (H, W, 3) uint8, the source's first-frame
    coefficients (1, 73) and the generated coefficients (N, 70)."""
    source = source_coefficients(source_coeff, preprocess)
    driving = driving_coefficients(generated_coeff, source, preprocess, still, expression_scale)
    n = driving.shape[0]
    return RenderInputs(
        source_image=prepare_source_image(source_rgb, size), source_coeffs=source, driving_coeffs=driving,
        yaw=None if input_yaw is None else camera_pose_sequence(input_yaw, n),
        pitch=None if input_pitch is None else camera_pose_sequence(input_pitch, n),
        roll=None if input_roll is None else camera_pose_sequence(input_roll, n))


@dataclass(frozen=True)
class ClipKeypoints:
    """The keypoint motion of a clip (what the generator is driven by), as float32 numpy arrays."""

    canonical: np.ndarray  # (K, 3) canonical keypoints of the source face
    source: np.ndarray  # (K, 3) source keypoints (canonical posed by the source's own coefficients)
    driving: np.ndarray  # (N, K, 3) driving keypoints of every frame


@dataclass
class PreparedSource:
    """What the renderer computes once per source image (``FaceRenderer.prepare``)."""

    image: torch.Tensor  # (1, 3, S, S)
    kp_canonical: torch.Tensor  # (1, K, 3)
    kp_source: torch.Tensor  # (1, K, 3)
    features: SourceFeatures | None = None


def frame_to_uint8(frame: np.ndarray) -> np.ndarray:
    """A rendered (H, W, 3) float frame in [0, 1] -> uint8, as the reference (``img_as_ubyte``)."""
    from skimage import img_as_ubyte

    return img_as_ubyte(frame)


class FaceRenderer:
    """Runs the renderer networks for a clip: keypoints once, then frames one at a time in video order.

    Holds loaded networks (and the last source's canonical keypoints), so one instance can serve several jobs.

    ``precision``: None renders in the networks' own dtype; ``torch.bfloat16`` (CPUs with bf16 instructions) or
    ``torch.float16`` (GPUs) runs the generator's per-frame convolutions in that type and all the rest in float32
    (``models.fast_conv``): faster, not faithful to the last bits (its error is measured by
    ``tests/precision_error.py``). Keypoints and the source encoding stay in the networks' dtype.
    """

    def __init__(self, kp_extractor: KeypointDetector, generator: OcclusionAwareSPADEGenerator,
                 mapping_crop: MappingNet, mapping_still: MappingNet | None = None,
                 precision: torch.dtype | None = None):
        if precision is not None and precision not in LOW_PRECISION_DTYPES:
            raise ValueError(f"renderer precision must be one of {LOW_PRECISION_DTYPES} or None, got {precision}")
        self.precision = precision
        self.kp_extractor = kp_extractor
        self.generator = generator
        self.mappings = {m.first[0].in_channels: m for m in (mapping_crop, mapping_still) if m is not None}
        parameter = next(generator.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        if self.device.type == "cpu":
            keep_freed_memory()  # process-wide: each frame reuses the last one's memory (see cpu_memory)
        self._lock = threading.Lock()
        self._last_canonical: tuple[bytes, torch.Tensor] | None = None  # (source image digest, keypoints)

    # ---- helpers -----------------------------------------------------------------------------------------------
    def _mapping(self, inputs: RenderInputs) -> MappingNet:
        try:
            return self.mappings[inputs.channels]
        except KeyError:
            raise ValueError(f"no MappingNet for {inputs.channels}-channel coefficients "
                             f"(have {sorted(self.mappings)})") from None

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, self.dtype)

    def _prepare_source(self, inputs: RenderInputs, batch_size: int, with_features: bool) -> PreparedSource:
        with torch.inference_mode():
            image = self._tensor(inputs.source_image)[None]  # (1, 3, S, S)
            kp_canonical = self._canonical_keypoints(inputs.source_image, image)  # (1, K, 3)
            # MappingNet on batch_size identical rows, as the reference (see _driving_keypoints for why)
            semantics = self._tensor(inputs.source_semantics())[None].expand(batch_size, -1, -1)  # (bs, C, 27)
            motion = self._mapping(inputs)(semantics)
            kp_source = transform_keypoints(kp_canonical.expand(batch_size, -1, -1), motion)[:1]
            features = self.generator.encode_source(image) if with_features else None
        return PreparedSource(image, kp_canonical, kp_source, features)

    def _canonical_keypoints(self, source_image: np.ndarray, image: torch.Tensor) -> torch.Tensor:
        """The keypoint detector on the source image, remembered for the last image (a clip's preview keypoints,
        full keypoints and frames all need it; it is a third of a second on a CPU)."""
        key = hashlib.sha1(source_image.tobytes()).digest()
        with self._lock:
            if self._last_canonical is not None and self._last_canonical[0] == key:
                return self._last_canonical[1]
        kp_canonical = self.kp_extractor(image)
        with self._lock:
            self._last_canonical = (key, kp_canonical)
        return kp_canonical

    def _driving_keypoints(self, inputs: RenderInputs, source: PreparedSource, indices: range,
                           batch_size: int) -> torch.Tensor:
        """(len(indices), K, 3) driving keypoints of consecutive frames (call under inference mode).

        MappingNet always sees exactly ``batch_size`` rows (a short last group is padded with its last window, as
        the reference pads the clip): its float rounding depends on the batch size, and keypoints far outside the
        feature grid (as with the synthetic test weights) turn last-bit keypoint differences into visible ones.
        """
        rows = list(indices) + [indices[-1]] * (batch_size - len(indices))
        windows = np.stack([inputs.driving_window(i) for i in rows])  # (bs, C, 27)
        motion: HeadMotion = self._mapping(inputs)(self._tensor(windows))
        overrides = [None if seq is None else self._tensor(seq[rows])
                     for seq in (inputs.yaw, inputs.pitch, inputs.roll)]
        kp_canonical = source.kp_canonical.expand(len(rows), -1, -1)
        return transform_keypoints(kp_canonical, motion, *overrides)[:len(indices)]

    # ---- public API --------------------------------------------------------------------------------------------
    def keypoints(self, inputs: RenderInputs, batch_size: int | None = None,
                  frames: int | None = None) -> ClipKeypoints:
        """Source and driving keypoints of the first ``frames`` (default all) frames without running the generator
        (MappingNet only).

        ``batch_size``: as given to ``frames``, to get exactly the keypoints it drives the generator with; None
        runs MappingNet once over the whole sequence instead of once per window (~20x faster, e.g. for a preview;
        the keypoints then differ from the rendered ones only by float rounding).
        """
        _check_batch_size(1 if batch_size is None else batch_size)
        count = inputs.num_frames if frames is None else min(max(int(frames), 1), inputs.num_frames)
        source = self._prepare_source(inputs, 1 if batch_size is None else batch_size, with_features=False)
        driving = np.empty((count, *source.kp_canonical.shape[1:]), dtype=np.float32)
        with torch.inference_mode():
            if batch_size is None:
                self._sequence_keypoints(inputs, source, driving)
            else:
                for first in range(0, count, batch_size):
                    indices = range(first, min(first + batch_size, count))
                    driving[first:indices.stop] = self._driving_keypoints(inputs, source, indices,
                                                                          batch_size).float().cpu()
        return ClipKeypoints(canonical=source.kp_canonical[0].float().cpu().numpy(),
                             source=source.kp_source[0].float().cpu().numpy(), driving=driving)

    def _sequence_keypoints(self, inputs: RenderInputs, source: PreparedSource, out: np.ndarray) -> None:
        """Driving keypoints of the first len(out) frames into ``out`` (n, K, 3), MappingNet over chunks of the
        padded sequence."""
        mapping = self._mapping(inputs)
        n, radius = inputs.num_frames, SEMANTIC_RADIUS
        rows = np.clip(np.arange(-radius, n + radius), 0, n - 1)  # the clip with its edge frames repeated
        for first in range(0, len(out), KEYPOINT_CHUNK):
            stop = min(first + KEYPOINT_CHUNK, len(out))
            coeffs = inputs.driving_coeffs[rows[first:stop + 2 * radius]].T  # (C, frames + 26)
            motion = mapping.sequence(self._tensor(coeffs))
            overrides = [None if seq is None else self._tensor(seq[first:stop])
                         for seq in (inputs.yaw, inputs.pitch, inputs.roll)]
            kp_canonical = source.kp_canonical.expand(stop - first, -1, -1)
            out[first:stop] = transform_keypoints(kp_canonical, motion, *overrides).float().cpu()

    def prepare(self, inputs: RenderInputs, with_features: bool = True) -> PreparedSource:
        """The source's canonical and posed keypoints (and the generator's source features) for frames rendered one
        by one from driving keypoints made elsewhere (a live face): ``render_keypoints``."""
        return self._prepare_source(inputs, 1, with_features)

    def render_keypoints(self, source: PreparedSource, kp_driving: torch.Tensor) -> np.ndarray:
        """(B, S, S, 3) float32 frames in [0, 1] for driving keypoints (B, K, 3) of a prepared source."""
        return self._render_group(source, kp_driving.to(self.device, self.dtype))

    def frames(self, inputs: RenderInputs, batch_size: int = 1, start: int = 0, workers: int = 1,
               frames_per_call: int | None = None) -> Iterator[np.ndarray]:
        """Render frames ``start`` .. N-1 in video order, one (S, S, 3) float32 image in [0, 1] at a time.

        ``batch_size`` consecutive frames go through the networks together (pays on a GPU, not on a CPU); it is
        the reference's batch size, which also fixes MappingNet's rounding. ``workers`` > 1 renders that many
        frames at once, each in its own thread with one CPU thread: on a CPU the generator's layers are too small
        to keep several cores busy, so frames side by side finish sooner than one frame on all cores (at most
        ``workers`` frames are in flight, ~0.7 GB each at 256; frames still come out in order; keypoints still
        come from MappingNet on ``batch_size`` rows). ``frames_per_call`` (one worker only; default
        ``batch_size``): frames per generator call, e.g. a batch measured to fill a GPU (``render_plan``); the
        keypoints still come from MappingNet on ``batch_size`` rows. Stop iterating to cancel.
        """
        _check_batch_size(batch_size)
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        per_call = batch_size if frames_per_call is None else frames_per_call
        _check_batch_size(per_call)
        source = self._prepare_source(inputs, batch_size, with_features=True)
        groups = [range(first, min(first + batch_size, inputs.num_frames))
                  for first in range(start, inputs.num_frames, batch_size)]
        if workers == 1 or len(groups) < 2:
            pending: list[torch.Tensor] = []  # driving keypoints of frames not rendered yet, in order
            for number, indices in enumerate(groups):
                pending.append(self._group_keypoints(inputs, source, indices, batch_size))
                last = number == len(groups) - 1
                while pending and (last or sum(len(kp) for kp in pending) >= per_call):
                    kp_driving = torch.cat(pending) if len(pending) > 1 else pending[0]
                    yield from self._render_group(source, kp_driving[:per_call])
                    pending = [kp_driving[per_call:]] if len(kp_driving) > per_call else []
            return
        yield from self._render_concurrently(inputs, source, groups, batch_size, workers)

    def _group_keypoints(self, inputs: RenderInputs, source: PreparedSource, indices: range,
                         batch_size: int) -> torch.Tensor:
        with torch.inference_mode():
            return self._driving_keypoints(inputs, source, indices, batch_size)

    def _render_group(self, source: PreparedSource, kp_driving: torch.Tensor) -> np.ndarray:
        """(B, S, S, 3) frames of one group of consecutive frames."""
        with torch.inference_mode(), conv_precision(self.precision):
            kp_source = source.kp_source.expand(len(kp_driving), -1, -1)
            images = self.generator.animate(source.features, kp_source, kp_driving)  # (B, 3, S, S)
            return images.permute(0, 2, 3, 1).float().cpu().numpy()  # (B, S, S, 3)

    def _render_concurrently(self, inputs: RenderInputs, source: PreparedSource, groups: list[range], batch_size: int,
                             workers: int) -> Iterator[np.ndarray]:
        threads_before = torch.get_num_threads()

        def single_threaded() -> None:
            torch.set_num_threads(1)

        # Keypoints are computed here, in order, exactly as the one-worker path does (MappingNet's rounding
        # depends on its thread count); only the generator runs in the workers.
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="render", initializer=single_threaded)
        pending: deque[Future] = deque()
        try:
            for indices in groups:
                kp_driving = self._group_keypoints(inputs, source, indices, batch_size)
                for row in range(len(indices)):  # one frame per worker: memory grows with frames in flight
                    pending.append(pool.submit(self._render_group, source, kp_driving[row:row + 1]))
                    if len(pending) >= workers:
                        yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:
            # On cancel, frames already in flight finish in the background; nothing waits for them.
            pool.shutdown(wait=False, cancel_futures=True)
            torch.set_num_threads(threads_before)  # set_num_threads(1) also shrank torch's shared thread pool


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
