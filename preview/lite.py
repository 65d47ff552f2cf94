"""The lite engine: a weight-free talking-head animator (landmarks + audio-driven motion + image warping).

Same interface as every engine: ``generate(image, audio, options) -> Iterator[Event]``. It is what a fresh install
runs, and its preview renderer is the one the live session plays while the final frames are made.
"""
from __future__ import annotations

import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np

from core.audio import load_audio, num_video_frames
from core.engine import PREVIEW_SIZE, Done, Event, Frame, MotionReady, Progress
from core.image import load_image
from core.landmarks import LandmarkDetector, shared_detector
from core.options import FPS, SAMPLE_RATE, Options
from core.video import optional_mp4_writer

from .motion import Motion, motion_from_audio
from .warp import FaceWarper, prepared_crop_renderer

PROGRESS_EVERY = 5  # render progress is reported at least every this many frames


class LitePreview:
    """The clip's motion rendered on the 128 px face crop (implements core.engine.PreviewRenderer)."""

    def __init__(self, rgb: np.ndarray, points: np.ndarray, motion: Motion, size: int = PREVIEW_SIZE):
        self.num_frames = motion.num_frames
        self._motion = motion
        # prepared (the preview plays in real time: no frame waits for set-up), made on upload with the idle animation
        self._renderer = prepared_crop_renderer(rgb, points, size)

    def render(self, index: int) -> np.ndarray:
        """(size, size, 3) uint8 of frame ``index`` (clamped to the clip). Thread-safe: no shared mutable state."""
        index = min(max(int(index), 0), self.num_frames - 1)
        return self._renderer.render(self._motion.pose(index))


class LiteEngine:
    """Loads the landmark detector once; each ``generate`` call is independent (safe for concurrent jobs)."""

    name = "lite"
    quick_start = True  # image, landmarks, audio and motion: ~0.1 s

    def __init__(self, detector: LandmarkDetector | None = None):
        self.detector = detector if detector is not None else shared_detector()

    def generate(self, image: "str | np.ndarray", audio: str, options: Options) -> Iterator[Event]:
        """Progress events per stage, one MotionReady, then every Frame (quality "final"), then Done.

        With ``options.output`` set the frames are also encoded (with the audio) into that mp4 as they are made;
        stopping the iteration early stops ffmpeg and removes the partial file.
        """
        options.check()
        seed = options.seed if options.seed is not None else secrets.randbits(31)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lite-audio") as pool:
            # ffmpeg decodes the speech (on another core) while the face is found: the motion, which the live
            # preview waits for, is ready that much sooner
            decoding = pool.submit(load_audio, audio, max_seconds=options.max_audio_s,
                                   min_seconds=options.min_audio_s)
            yield Progress("landmarks", 0, 1, "Finding the face")
            rgb = load_image(image)
            face = self.detector.detect(rgb)
            yield Progress("landmarks", 1, 1, f"Face found ({face.backend} landmarks)")

            yield Progress("audio", 0, 1, "Reading the audio")
            samples = decoding.result()
        num_frames = num_video_frames(samples.size)
        duration_s = num_frames / FPS
        yield Progress("audio", 1, 1, f"{samples.size / SAMPLE_RATE:.1f} s of audio, {num_frames} frames")

        yield Progress("motion", 0, 1, "Computing lip, head and eye motion")
        motion = motion_from_audio(samples, num_frames, seed=seed, use_blink=options.use_blink)
        preview = LitePreview(rgb, face.points, motion)
        yield Progress("motion", 1, 1, "Motion ready")
        yield MotionReady(num_frames=num_frames, fps=FPS, preview=preview, audio=samples)
        del samples

        warper = FaceWarper(rgb, face.points)
        height, width = rgb.shape[:2]
        with optional_mp4_writer(options.output, width, height, audio_path=os.fspath(audio),
                                 duration_s=duration_s) as writer:
            yield Progress("render", 0, num_frames, "Rendering frames")
            for index in range(num_frames):
                frame = warper.render(motion.pose(index))
                if writer is not None:
                    writer.write(frame)
                yield Frame(index=index, time_s=index / FPS, quality="final", rgb=frame)
                if (index + 1) % PROGRESS_EVERY == 0 or index + 1 == num_frames:
                    yield Progress("render", index + 1, num_frames, f"Rendered {index + 1}/{num_frames} frames")
            if writer is not None:
                yield Progress("encode", 0, 1, "Finishing the video")
        if options.output:
            yield Progress("encode", 1, 1, "Video ready")
        yield Done(video_path=options.output or None, num_frames=num_frames, duration_s=duration_s, engine=self.name)

