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
from .remembered import Remembered, file_key

MIN_AUDIO_S = 1.0  # what the app and the CLI accept: a shorter clip is hardly speech (the engines need one frame)


def ffmpeg_exe() -> str:
    return imageio_ffmpeg.get_ffmpeg_exe()


def load_audio(path: str, max_seconds: float = 300.0, sample_rate: int = SAMPLE_RATE,
               min_seconds: float = 1.0 / FPS) -> np.ndarray:
    """Decode ``path`` to mono float32 at ``sample_rate``.

    Raises InputError for a missing, undecodable, empty, shorter than ``min_seconds`` or too long file.

    A file's samples are remembered (the last few, while the file is unchanged), so the app can decode an upload
    when it arrives and a click finds it decoded: ffmpeg's start and the decoding are then off the path to the first
    sound. The caller gets its own copy.
    """
    if not path or not os.path.isfile(path):
        raise InputError(f"Audio file {path!r} was not found. Upload a speech recording (wav, mp3, m4a, ogg or flac).")
    samples = _decode_remembered(path, max_seconds, sample_rate)
    duration = samples.size / sample_rate
    if samples.size < sample_rate // FPS:
        raise InputError(f"The audio is empty (shorter than one video frame). "
                         f"Upload a speech recording of at least {max(min_seconds, 1.0 / FPS):g} s.")
    if duration < min_seconds:
        raise InputError(f"The audio is only {duration:.2f} s long. Upload a speech recording of at least "
                         f"{min_seconds:g} s.")
    if duration > max_seconds:
        raise InputError(f"The audio is longer than the limit of {max_seconds:g} s. "
                         "Trim it, or raise the limit (--max-audio-seconds).")
    return samples


_decoded = Remembered(items=4, max_bytes=64 << 20)  # (samples, the limit decoded to) of the last few clips


def _decode_remembered(path: str, max_seconds: float, sample_rate: int) -> np.ndarray:
    key = (file_key(path), sample_rate)
    entry = _decoded.get(key)
    if entry is not None:
        samples, limit = entry
        # decoded up to a limit at least as high, or the whole file (it ended before that limit)
        if max_seconds <= limit or samples.size < (limit + 1.0) * sample_rate:
            return samples.copy()
    samples = _decode(path, max_seconds, sample_rate)
    _decoded.put(key, (samples.copy(), max_seconds), samples.nbytes)
    return samples


def _decode(path: str, max_seconds: float, sample_rate: int) -> np.ndarray:
    """Whatever ffmpeg decodes -> mono float32 at ``sample_rate`` (a little more than ``max_seconds`` at most, so a
    3-hour file is refused without decoding it all)."""
    cmd = [ffmpeg_exe(), "-nostdin", "-v", "error", "-i", path, "-t", f"{max_seconds + 1.0:.3f}",
           "-vn", "-ac", "1", "-ar", str(sample_rate), "-f", "f32le", "-"]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        detail = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        reason = detail[-1] if detail else "unknown decoding error"
        raise InputError(f"Could not read the audio file ({reason}). "
                         "Use a common audio format: wav, mp3, m4a, ogg or flac.")
    samples = np.frombuffer(proc.stdout, dtype=np.float32).copy()
    if not np.all(np.isfinite(samples)):
        samples = np.nan_to_num(samples, nan=0.0, posinf=0.0, neginf=0.0)
    return samples


def decode_audio_bytes(data: bytes, max_seconds: float = 600.0, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A chunk of speech sent as a file (any format ffmpeg decodes) -> mono float32; InputError if it is not audio
    or longer than ``max_seconds``."""
    import tempfile

    if not data:
        raise InputError("The speech chunk is empty: send audio bytes in the request body.")
    with tempfile.NamedTemporaryFile(suffix=".audio") as file:
        file.write(data)
        file.flush()
        samples = _decode(file.name, max_seconds, sample_rate)
    if samples.size / sample_rate > max_seconds:
        raise InputError(f"The speech chunk is longer than {max_seconds:g} s; send it in shorter pieces.")
    return samples


def pcm_from_raw(data: bytes, rate: int, channels: int = 1, big_endian: bool = True,
                 sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Raw 16-bit PCM (``audio/L16`` is big-endian, RFC 2586) at any rate -> mono float32 at ``sample_rate``."""
    from math import gcd

    if not data:
        raise InputError("The speech chunk is empty: send PCM bytes in the request body.")
    if not 4000 <= rate <= 192000 or not 1 <= channels <= 8:
        raise InputError(f"Unusable PCM format: rate={rate}, channels={channels} "
                         "(say e.g. Content-Type: audio/L16; rate=16000).")
    if len(data) % (2 * channels):
        raise InputError(f"The PCM chunk has {len(data)} bytes: not whole 16-bit samples for {channels} channel(s).")
    samples = np.frombuffer(data, dtype=">i2" if big_endian else "<i2").astype(np.float32) / 32768.0
    samples = samples.reshape(-1, channels).mean(axis=1)
    if rate != sample_rate:
        from scipy.signal import resample_poly

        divisor = gcd(rate, sample_rate)
        samples = resample_poly(samples, sample_rate // divisor, rate // divisor).astype(np.float32)
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
