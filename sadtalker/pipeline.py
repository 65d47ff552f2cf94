"""The SadTalker engine: portrait + speech -> talking-head video, with the official networks and options.

Stages (each reported as ``Progress``): landmarks -> crop (preprocess mode) -> 3DMM coefficients of the source ->
audio -> mel -> motion coefficients (ExpNet + PoseVAE) -> renderer keypoints (``MotionReady``: a motion-true
128x128 preview can play from here) -> renderer frames -> optional face enhancer -> paste back -> streaming mp4.

A pipeline holds only loaded parts (networks per renderer size, the landmark detector, enhancers); everything about
one request lives in ``generate``'s frame, so one pipeline serves every job of a process.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Generator, Iterator

import imageio_ffmpeg
import numpy as np
import torch

from core.audio import load_audio
from .coefficients import (SMOOTHING_WINDOW, draw_motion_inputs, face_coefficients, num_noise_draws,
                           predict_coefficients)
from .checkpoints import DEFAULT_CHECKPOINT_DIR, SadTalkerNetworks, find_checkpoints, installed_sizes, load_networks
from .enhancer import FaceEnhancer, try_load_enhancer
from core.errors import InputError, NoFaceError
from core.engine import Done, Event, Frame, MotionReady, Progress
from .facerender import SEMANTIC_RADIUS, FaceRenderer, RenderInputs, frame_to_uint8, prepare_render_inputs
from core.image import load_image
from .keypoint_preview import KeypointPreview
from core.landmarks import LandmarkDetector, shared_detector
from .mel import AudioFeatures, audio_features
from core.options import FPS, Options
from .models.fast_conv import LOW_PRECISION_DTYPES
from .preprocess import CropResult, PasteBack, crop_portrait
from .render_plan import choose_render_plan
from core.video import optional_mp4_writer

RECON_BATCH = 16  # reference-video frames per ReconNet call
# Frames of motion computed first for a long clip's preview (1 + 32k: whole PoseVAE chunks); the last frames of
# that head are not final (pose smoothing and MappingNet look ahead), so the preview starts with the rest.
PREVIEW_HEAD_FRAMES = 65
PREVIEW_HEAD_MARGIN = SMOOTHING_WINDOW // 2 + SEMANTIC_RADIUS


@dataclass(frozen=True)
class SourceFace:
    """The portrait prepared for the renderer."""

    crop: CropResult  # renderer source image and how to map frames back
    coeff: np.ndarray  # (1, 73) float32: expression 64 | angles 3 | translation 3 | crop (s, tx, ty) 3
    landmarks: np.ndarray  # (68, 2) landmarks in the original portrait


class SadTalkerPipeline:
    """Loads the official networks once; ``generate`` runs one request as a stream of events."""

    name = "sadtalker"
    quick_start = False  # 3DMM fitting and audio-to-coefficient networks come before the motion

    def __init__(self, checkpoint_dir: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 detector: LandmarkDetector | None = None):
        """``dtype``: float32 (faithful), or bfloat16 / float16: the renderer's convolutions in that type (the
        networks stay float32; see ``FaceRenderer``). bfloat16 on a CPU without bf16 instructions would be
        emulated (slower than float32), so it falls back to float32 there."""
        self.checkpoint_dir = checkpoint_dir
        self.device = torch.device(device)
        if dtype == torch.bfloat16 and self.device.type == "cpu" and not cpu_has_bf16():
            dtype = torch.float32
        self.dtype = dtype
        self.precision = dtype if dtype in LOW_PRECISION_DTYPES else None
        self.detector = detector or shared_detector(checkpoint_dir)
        self._networks: dict[int, SadTalkerNetworks] = {}
        self._enhancers: dict[tuple[str, str | None], tuple[FaceEnhancer | None, tuple[str, ...]]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_checkpoints(cls, directory: str = DEFAULT_CHECKPOINT_DIR, device: str = "cpu", dtype: torch.dtype | None = None,
                         detector: LandmarkDetector | None = None) -> "SadTalkerPipeline":
        """Load the networks of the first available renderer size (256, else 512); the other loads on first use.

        Raises CheckpointError naming the missing or broken file.
        """
        if dtype is None:
            dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
        pipeline = cls(directory, device, dtype, detector)
        sizes = pipeline.available_sizes()
        if not sizes:
            find_checkpoints(directory, 256)  # raises the explanatory CheckpointError
        pipeline.networks(sizes[0])
        return pipeline

    # --- loaded parts ------------------------------------------------------------------------------------------

    def available_sizes(self) -> tuple[int, ...]:
        """Renderer sizes whose checkpoint files are present."""
        return installed_sizes(self.checkpoint_dir)

    def networks(self, size: int) -> SadTalkerNetworks:
        with self._lock:
            if size not in self._networks:
                self._networks[size] = load_networks(self.checkpoint_dir, size, self.device, torch.float32)
            return self._networks[size]

    def _enhancer(self, options: Options) -> tuple[FaceEnhancer | None, tuple[str, ...]]:
        if options.enhancer is None and options.background_enhancer is None:
            return None, ()
        key = (options.enhancer or "gfpgan", options.background_enhancer)
        with self._lock:
            if key not in self._enhancers:
                if options.enhancer is None:  # background only: still needs the face path's upscaling
                    self._enhancers[key] = (None, ("The background enhancer runs together with a face enhancer; "
                                                   "choose GFPGAN or RestoreFormer to use it.",))
                else:
                    enhancer, warnings = try_load_enhancer(options.enhancer, self.checkpoint_dir,
                                                           background=options.background_enhancer,
                                                           device=self.device)
                    self._enhancers[key] = (enhancer, tuple(warnings))
            return self._enhancers[key]

    def source_face(self, rgb: np.ndarray, landmarks: np.ndarray, preprocess: str, size: int) -> SourceFace:
        """A portrait prepared for the renderer of ``size``: its crop (``preprocess`` mode) and 3DMM coefficients
        (for a live face; ``generate`` does the same steps with progress events)."""
        nets = self.networks(size)
        crop = crop_portrait(rgb, landmarks, preprocess, size)
        return SourceFace(crop=crop, coeff=self._image_coefficients(crop.image, nets)[None], landmarks=landmarks)

    # --- one request -------------------------------------------------------------------------------------------

    def generate(self, image, audio: str, options: Options) -> Iterator[Event]:
        """Run one request; stop iterating to cancel (the partial mp4 is removed)."""
        options = options.check()
        if options.size not in self.available_sizes():
            raise InputError(f"The {options.size}x{options.size} SadTalker weights "
                             f"(SadTalker_V0.0.2_{options.size}.safetensors) are not in {self.checkpoint_dir}; "
                             f"choose size {' or '.join(map(str, self.available_sizes()))} or add that file.")
        rgb = image if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 \
            else load_image(image)
        nets = self.networks(options.size)

        yield Progress("landmarks", 0, 1, "Finding the face")
        face = self.detector.detect(rgb)
        yield Progress("crop", 0, 1, f"Cropping the face ({options.preprocess})")
        crop = crop_portrait(rgb, face.points, options.preprocess, options.size)
        yield Progress("3dmm", 0, 1, "Reconstructing the 3-D face")
        source = SourceFace(crop=crop, coeff=self._image_coefficients(crop.image, nets)[None], landmarks=face.points)

        yield Progress("audio", 0, 1, "Reading the audio")
        wav = load_audio(audio, options.max_audio_s, min_seconds=options.min_audio_s)
        features = audio_features(wav)
        ref_eyeblink = ref_pose = None
        if options.ref_eyeblink:
            yield Progress("reference", 0, 1, "Reading the eye-blink reference video")
            ref_eyeblink = self._video_coefficients(options.ref_eyeblink, features.num_frames, options, nets)
        if options.ref_pose:
            yield Progress("reference", 0, 1, "Reading the head-pose reference video")
            ref_pose = ref_eyeblink if options.ref_pose == options.ref_eyeblink else \
                self._video_coefficients(options.ref_pose, features.num_frames, options, nets)

        yield Progress("motion", 0, 1, "Predicting expression and head motion from the audio")
        renderer = FaceRenderer(nets.kp_extractor, nets.generator, nets.mapping_crop, nets.mapping_still,
                                precision=self.precision)
        inputs = yield from self._motion(renderer, nets, source, wav, features, options, ref_eyeblink, ref_pose)

        enhancer, warnings = self._enhancer(options)
        for warning in warnings:
            yield Progress("enhancer", 0, 0, warning)
        yield from self._render(renderer, inputs, source, rgb, audio, options, enhancer, warnings)

    def _motion(self, renderer: FaceRenderer, nets: SadTalkerNetworks, source: SourceFace, wav: np.ndarray,
                features: AudioFeatures,
                options: Options, ref_eyeblink: np.ndarray | None,
                ref_pose: np.ndarray | None) -> Generator[Event, None, RenderInputs]:
        """Coefficients -> renderer inputs and keypoints; yields ``MotionReady``, returns the renderer inputs.

        A long clip's preview starts from the motion of its first PREVIEW_HEAD_FRAMES frames (exact there: ExpNet
        is frame-wise, PoseVAE works on 32-frame chunks) and gets the whole clip's a second later, before it plays
        that far.
        """
        motion_inputs, noise = draw_motion_inputs(features, source.coeff, use_blink=options.use_blink,
                                                  seed=options.seed, ref_eyeblink_coeffs=ref_eyeblink)
        num_frames, crop = motion_inputs.num_frames, source.crop

        def coefficients(frames: int) -> np.ndarray:
            return predict_coefficients(nets.audio2exp, nets.audio2pose, motion_inputs.head(frames),
                                        options.pose_style, noise=noise[:num_noise_draws(frames)],
                                        ref_pose_coeffs=ref_pose).coeffs

        def render_inputs(coeffs: np.ndarray) -> RenderInputs:
            return prepare_render_inputs(crop.image, source.coeff, coeffs, preprocess=options.preprocess,
                                         still=options.still, expression_scale=options.expression_scale,
                                         input_yaw=options.input_yaw, input_pitch=options.input_pitch,
                                         input_roll=options.input_roll, size=options.size)

        preview = None
        if num_frames > 2 * PREVIEW_HEAD_FRAMES:
            head = coefficients(PREVIEW_HEAD_FRAMES)
            padded = np.concatenate([head, np.repeat(head[-1:], num_frames - len(head), axis=0)])  # N for yaw paths
            keypoints = renderer.keypoints(render_inputs(padded), frames=PREVIEW_HEAD_FRAMES - PREVIEW_HEAD_MARGIN)
            preview = KeypointPreview(crop.image, keypoints.source, keypoints.driving, num_frames=num_frames)
            yield MotionReady(num_frames=num_frames, fps=float(FPS), preview=preview, audio=wav)
        inputs = render_inputs(coefficients(num_frames))
        keypoints = renderer.keypoints(inputs)
        if preview is None:
            yield MotionReady(num_frames=num_frames, fps=float(FPS), audio=wav,
                              preview=KeypointPreview(crop.image, keypoints.source, keypoints.driving))
        else:
            preview.update(keypoints.driving)
        return inputs

    def _render(self, renderer: FaceRenderer, inputs, source: SourceFace, rgb: np.ndarray, audio: str,
                options: Options, enhancer: FaceEnhancer | None, warnings: tuple[str, ...]) -> Iterator[Event]:
        num_frames = inputs.num_frames
        duration = num_frames / FPS
        paste = PasteBack(rgb, source.crop)
        frame_landmarks = source.crop.to_frame_coords(source.landmarks)
        width, height = source.crop.frame_size()
        if enhancer is not None:
            height, width = enhancer.output_shape((height, width))
        yield Progress("render", 0, num_frames, f"Rendering {num_frames} frames at {options.size}x{options.size}")
        with optional_mp4_writer(options.output, width, height, audio_path=audio, duration_s=duration) as writer:
            plan = choose_render_plan(renderer, options.size)
            frames = renderer.frames(inputs, batch_size=options.batch_size, workers=plan.workers,
                                     frames_per_call=max(plan.frames_per_call, options.batch_size))
            for index, rendered in enumerate(frames):
                frame = paste(frame_to_uint8(rendered))
                if enhancer is not None:
                    frame = enhancer.enhance(frame, self._frame_landmarks(frame, frame_landmarks))
                if writer is not None:
                    writer.write(frame)
                yield Frame(index=index, time_s=index / FPS, quality="final", rgb=frame)
                yield Progress("render", index + 1, num_frames, f"Rendered {index + 1}/{num_frames} frames")
            if writer is not None:
                yield Progress("encode", 0, 1, "Finishing the video")
        yield Done(video_path=options.output, num_frames=num_frames,
                   duration_s=duration, engine=self.name, warnings=warnings)

    def _frame_landmarks(self, frame: np.ndarray, fallback: np.ndarray) -> np.ndarray:
        """The face's landmarks in an output frame (the head moves a little from the source's position)."""
        try:
            return self.detector.detect(frame).points
        except NoFaceError:
            return fallback

    # --- 3DMM coefficients -------------------------------------------------------------------------------------

    def _image_coefficients(self, crop_rgb: np.ndarray, nets: SadTalkerNetworks) -> np.ndarray:
        """(73,) coefficients of a renderer-sized face crop (landmarks detected again on the crop, as the official)."""
        return self._coefficients([crop_rgb], nets)[0]

    def _coefficients(self, crops: list[np.ndarray], nets: SadTalkerNetworks) -> np.ndarray:
        """(F, 73) coefficients of face crops; a crop where no face is found uses the standard face (official)."""
        landmarks = []
        for crop in crops:
            try:
                landmarks.append(self.detector.detect(crop).points)
            except NoFaceError:
                landmarks.append(None)
        return face_coefficients(nets.face_recon, crops, landmarks, batch_size=RECON_BATCH).coeff_3dmm

    def _video_coefficients(self, path: str, num_frames: int, options: Options, nets: SadTalkerNetworks) -> np.ndarray:
        """(F, 73) coefficients of up to ``num_frames`` frames of a reference video, cropped like the portrait.

        The crop box comes from the first frame's face (as the official); frames are cropped as they are decoded,
        so only the small crops are kept.
        """
        mode = "extcrop" if options.preprocess.startswith("ext") else "crop"
        crops, face = [], None
        for frame in _video_frames(path, num_frames):
            if face is None:
                face = self.detector.detect(frame)
            crops.append(crop_portrait(frame, face.points, mode, options.size).image)
        if not crops:
            raise InputError(f"The reference video {os.path.basename(path)} has no frames.")
        return self._coefficients(crops, nets)


def _video_frames(path: str, limit: int) -> Iterator[np.ndarray]:
    """Up to ``limit`` RGB frames of a video file, one at a time."""
    if not os.path.isfile(path):
        raise InputError(f"Reference video {path!r} was not found.")
    try:
        reader = imageio_ffmpeg.read_frames(path)
        meta = next(reader)
    except (OSError, RuntimeError, StopIteration) as exc:
        raise InputError(f"Could not read the reference video {os.path.basename(path)} ({exc}); "
                         "use an mp4 or another common video format.") from None
    width, height = meta["size"]
    try:
        for count, raw in enumerate(reader):
            if count >= limit:
                break
            yield np.frombuffer(raw, np.uint8).reshape(height, width, 3)
    finally:
        reader.close()


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX-BF16), from /proc/cpuinfo (Linux)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False
