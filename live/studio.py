"""The studio: starts the page's generation jobs and keeps them findable by id (Stop, viewers following a job)."""
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import os
import secrets
import threading
import time
from collections import OrderedDict

import numpy as np

from core.audio import MIN_AUDIO_S, load_audio, num_video_frames
from core.engine import PREVIEW_SIZE
from core.errors import InputError
from core.image import load_image
from core.landmarks import shared_detector
from core.options import Options
from preview.idle import IdleAnimator
from preview.motion import audio_features
from sadtalker.checkpoints import DEFAULT_CHECKPOINT_DIR

from .broadcaster import Broadcaster
from .engines import choose_engine, load_engine
from .job import Job
from .job_folders import JobFolders
from .stream import StreamHub


class Studio:
    """Starts jobs and keeps them findable by id (for Stop and for viewers that follow one job)."""

    MAX_REMEMBERED_JOBS = 32

    def __init__(self, broadcaster: Broadcaster | None, outputs_dir: str = "outputs",
                 checkpoint_dir: str = DEFAULT_CHECKPOINT_DIR, device: str = "cpu", outputs_url: str = "/outputs",
                 max_audio_s: float = 300.0, min_audio_s: float = MIN_AUDIO_S, folders: JobFolders | None = None,
                 hub: StreamHub | None = None):
        self.broadcaster = broadcaster
        self.hub = hub
        self.outputs_dir = os.path.abspath(outputs_dir)
        self.folders = folders or JobFolders(self.outputs_dir)  # old finished jobs are pruned after each job
        self.outputs_url = outputs_url.rstrip("/")
        self.checkpoint_dir = checkpoint_dir
        self.device = device
        self.max_audio_s = max_audio_s
        self.min_audio_s = min_audio_s
        self._jobs: "OrderedDict[str, Job]" = OrderedDict()
        self._lock = threading.Lock()

    def start(self, image: str | None, audio: str | None, options: Options = Options(), engine: str = "auto") -> Job:
        """Check the request and start it; raises InputError (with what to do) before any work starts."""
        if not image:
            raise InputError("Upload a portrait photo first (jpg or png, one face, looking at the camera).")
        if not audio:
            raise InputError("Upload or record a speech clip first (wav, mp3, m4a, ogg or flac).")
        choice = choose_engine(engine, self.checkpoint_dir)
        job_id = new_job_id()
        out_dir = os.path.join(self.outputs_dir, job_id)
        options = dataclasses.replace(options, output=os.path.join(out_dir, "video.mp4"),
                                      max_audio_s=min(options.max_audio_s, self.max_audio_s),
                                      min_audio_s=self.min_audio_s).check()
        engine_instance = load_engine(choice.name, self.checkpoint_dir, self.device)
        os.makedirs(out_dir, exist_ok=True)
        job = Job(job_id, engine_instance, image, audio, options, out_dir,
                  f"{self.outputs_url}/{job_id}/video.mp4", self.broadcaster, self.idle_animator, self.hub,
                  on_finished=self._job_ended)
        with self._lock:
            self._jobs[job_id] = job
            while len(self._jobs) > self.MAX_REMEMBERED_JOBS:
                self._jobs.popitem(last=False)
        return job.start()

    def _job_ended(self, job: Job) -> None:
        self.folders.prune()
        return_freed_memory()

    def prepare(self, image: str | None) -> None:
        """Find the face of a just-uploaded photo ahead of Generate (landmarks are cached by image content), so the
        idle animation starts at once on the click. Raises InputError (not an image, no face) for early feedback."""
        if image:
            self.idle_animator(load_image(image))

    def prepare_audio(self, audio: str | None) -> None:
        """Decode a just-uploaded speech clip ahead of Generate (decoded audio is remembered per file), so the click
        does not wait for ffmpeg. Raises InputError (not audio, too short or too long) for early feedback."""
        if audio:
            samples = load_audio(audio, max_seconds=self.max_audio_s, min_seconds=self.min_audio_s)
            audio_features(samples, num_video_frames(samples.size))  # the Lite motion's analysis, remembered too

    def idle_animator(self, rgb: np.ndarray) -> IdleAnimator:
        """The idle animation of a portrait, with the landmark detector the engines share."""
        return IdleAnimator(rgb, detector=shared_detector(self.checkpoint_dir), size=PREVIEW_SIZE)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def cancel(self, job_id: str, wait_s: float = 10.0) -> bool:
        job = self.get(job_id)
        if job is None:
            return False
        job.cancel()
        return job.wait(wait_s)

    def cancel_all(self, wait_s: float = 10.0) -> bool:
        """Stop every job (shutting down): their engines close, which ends their ffmpeg and removes partial files."""
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel()
        deadline = time.monotonic() + wait_s
        return all(job.wait(max(0.0, deadline - time.monotonic())) for job in jobs)


def new_job_id() -> str:
    """A sortable, unguessable id: the start time, then 128 random bits (the id is the video's URL)."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(16)


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def return_freed_memory() -> None:
    """Give the memory a job freed back to the system. Each job's threads allocate in glibc's per-thread arenas,
    and what they free stays mapped, fragmented: without this, RSS grew ~1-2 MB a job for good (bench/soak.py)."""
    trim = getattr(_LIBC, "malloc_trim", None)  # glibc only; elsewhere nothing to do
    if trim is not None:
        trim(0)
