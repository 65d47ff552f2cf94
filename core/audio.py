"""Audio input: anything ffmpeg decodes (wav, mp3, m4a, ogg, flac, any rate, stereo) -> 16 kHz mono float32.

ffmpeg comes from the imageio-ffmpeg wheel, so no system ffmpeg is needed.
"""
from __future__ import annotations

import math
import os
import subprocess

import imageio_ffmpeg
import numpy as np

from .errors import InputError
from .options import FPS, SAMPLE_RATE


def ffmpeg_exe() -> str:
    return imageio_ffmpeg.get_ffmpeg_exe()


def load_audio(path: str, max_seconds: float = 300.0, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode ``path`` to mono float32 at ``sample_rate``.

    Raises InputError for a missing, undecodable, silent-length (empty) or too long file.
    """
    if not path or not os.path.isfile(path):
        raise InputError(f"Audio file {path!r} was not found. Upload a speech recording (wav, mp3, m4a, ogg or flac).")
    # Decode at most a little more than the limit, so a 3-hour file is refused without decoding it all.
    cmd = [ffmpeg_exe(), "-nostdin", "-v", "error", "-i", path, "-t", f"{max_seconds + 1.0:.3f}",
           "-vn", "-ac", "1", "-ar", str(sample_rate), "-f", "f32le", "-"]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        detail = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        reason = detail[-1] if detail else "unknown decoding error"
        raise InputError(f"Could not read the audio file ({reason}). "
                         "Use a common audio format: wav, mp3, m4a, ogg or flac.")
    samples = np.frombuffer(proc.stdout, dtype=np.float32).copy()
    if samples.size < sample_rate // FPS:
        raise InputError("The audio is empty (shorter than one video frame). Upload a speech recording of at least a second.")
    duration = samples.size / sample_rate
    if duration > max_seconds:
        raise InputError(f"The audio is longer than the limit of {max_seconds:g} s. "
                         "Trim it, or raise the limit (--max-audio-seconds).")
    if not np.all(np.isfinite(samples)):
        samples = np.nan_to_num(samples, nan=0.0, posinf=0.0, neginf=0.0)
    return samples


def num_video_frames(num_samples: int, sample_rate: int = SAMPLE_RATE) -> int:
    """Frames of a video as long as the audio: ceil(duration * 25)."""
    return max(1, math.ceil(num_samples * FPS / sample_rate - 1e-9))


def write_wav(path: str, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """16-bit PCM mono WAV (used to mux the exact decoded audio into the mp4)."""
    import wave

    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
