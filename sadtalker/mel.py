"""Audio features of SadTalker: the Wav2Lip-style log-mel spectrogram and its per-video-frame windows.

Faithful to the official ``src/utils/audio.py`` (hparams of ``src/utils/hparams.py``) and the windowing of
``src/generate_batch.py::get_data``, computed with numpy only (no librosa):

* pre-emphasis ``y[n] = x[n] - 0.97 x[n-1]``;
* STFT: n_fft 800, hop 200, periodic Hann window of 800, centred with 400 zeros on each side, magnitude;
* Slaney mel filterbank (80 bands, 55..7600 Hz, area-normalised), as ``librosa.filters.mel`` builds it;
* dB with floor 1e-5 (min level -100 dB) minus ref level 20 dB, then the symmetric clipped normalisation to [-4, 4];
* per video frame (25 fps = 640 samples = 3.2 mel frames) a window of 16 mel frames starting 2 video frames early.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from core.errors import InputError
from core.options import FPS, SAMPLE_RATE

N_FFT = 800
HOP = 200
WIN = 800
NUM_MELS = 80
FMIN = 55.0
FMAX = 7600.0
PREEMPHASIS = 0.97
MIN_LEVEL_DB = -100.0
REF_LEVEL_DB = 20.0
MAX_ABS_VALUE = 4.0
MEL_FRAMES_PER_SECOND = 80  # SAMPLE_RATE / HOP
WINDOW_FRAMES = 16  # mel frames per video-frame window (the "syncnet mel step")
SAMPLES_PER_VIDEO_FRAME = SAMPLE_RATE // FPS  # 640


@dataclass(frozen=True)
class AudioFeatures:
    """What the audio-to-coefficient networks need from a recording."""

    mel: np.ndarray  # (80, T_mel) float32 normalised log-mel of the cut/padded wav
    windows: np.ndarray  # (num_frames, 80, 16) float32: the mel window of each video frame
    num_frames: int  # video frames at 25 fps = int(len(wav) / 640)


# Slaney mel scale: linear (200/3 Hz per mel) below 1 kHz, logarithmic (27 steps per factor 6.4) above
_HZ_PER_MEL = 200.0 / 3.0
_LOG_START_HZ = 1000.0
_LOG_START_MEL = _LOG_START_HZ / _HZ_PER_MEL
_LOG_STEP = np.log(6.4) / 27.0


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    log_part = _LOG_START_MEL + np.log(np.maximum(hz, _LOG_START_HZ) / _LOG_START_HZ) / _LOG_STEP
    return np.where(hz >= _LOG_START_HZ, log_part, hz / _HZ_PER_MEL)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel >= _LOG_START_MEL, _LOG_START_HZ * np.exp(_LOG_STEP * (mel - _LOG_START_MEL)),
                    _HZ_PER_MEL * mel)


@lru_cache(maxsize=4)
def mel_filterbank(sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, num_mels: int = NUM_MELS,
                   fmin: float = FMIN, fmax: float = FMAX) -> np.ndarray:
    """(num_mels, 1 + n_fft // 2) float32 triangular filters on the Slaney mel scale, Slaney area normalisation.

    Same construction as ``librosa.filters.mel(htk=False, norm='slaney')`` (float32, as librosa returns it).
    """
    fft_freqs = np.linspace(0.0, sample_rate / 2.0, 1 + n_fft // 2)
    mel_points = np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), num_mels + 2)
    band_edges = _mel_to_hz(mel_points)  # (num_mels + 2,) Hz
    widths = np.diff(band_edges)  # (num_mels + 1,)
    ramps = band_edges[:, None] - fft_freqs[None, :]  # (num_mels + 2, n_bins)
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (band_edges[2:] - band_edges[:-2]))[:, None]  # each triangle has unit area (in Hz)
    weights = weights.astype(np.float32)
    weights.setflags(write=False)
    return weights


def _periodic_hann(length: int) -> np.ndarray:
    n = np.arange(length, dtype=np.float64)
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * n / length)


def _stft_magnitude(signal: np.ndarray) -> np.ndarray:
    """|STFT| (1 + N_FFT // 2, 1 + len // HOP) of a float64 signal, centred frames with zero padding."""
    return _frames_magnitude(np.pad(signal, (N_FFT // 2, N_FFT // 2), mode="constant"))


def _frames_magnitude(padded: np.ndarray) -> np.ndarray:
    """|STFT| (1 + N_FFT // 2, n) of the frames starting every HOP samples of ``padded`` (float64)."""
    num_frames = 1 + (len(padded) - N_FFT) // HOP
    frames = np.lib.stride_tricks.as_strided(
        padded, shape=(num_frames, N_FFT), strides=(padded.strides[0] * HOP, padded.strides[0]), writeable=False)
    spectrum = np.fft.rfft(frames * _periodic_hann(WIN), n=N_FFT, axis=1)  # (frames, bins) complex128
    return np.abs(spectrum).T


def _emphasise(x: np.ndarray, previous: float = 0.0) -> np.ndarray:
    """Pre-emphasis ``y[n] = x[n] - 0.97 x[n-1]`` (float64), ``previous`` being x[-1] (0 at the start, as lfilter)."""
    emphasised = np.empty_like(x)
    if x.size:
        emphasised[0] = x[0] - PREEMPHASIS * previous
        emphasised[1:] = x[1:] - PREEMPHASIS * x[:-1]
    return emphasised


def _normalised_log_mel(magnitude: np.ndarray) -> np.ndarray:
    """|STFT| (401, n) float64 -> (80, n) float32 normalised log-mel in [-4, 4]."""
    mel = mel_filterbank() @ magnitude  # float32 filters x float64 magnitudes -> float64, as numpy.dot does
    min_level = np.exp(MIN_LEVEL_DB / 20.0 * np.log(10.0))  # 1e-5
    db = 20.0 * np.log10(np.maximum(min_level, mel)) - REF_LEVEL_DB
    normalised = (2.0 * MAX_ABS_VALUE) * ((db - MIN_LEVEL_DB) / (-MIN_LEVEL_DB)) - MAX_ABS_VALUE
    return np.clip(normalised, -MAX_ABS_VALUE, MAX_ABS_VALUE).astype(np.float32)


def melspectrogram(wav: np.ndarray) -> np.ndarray:
    """(80, 1 + len(wav) // 200) float32 normalised log-mel spectrogram in [-4, 4] (official ``melspectrogram``)."""
    x = np.asarray(wav, dtype=np.float64).reshape(-1)
    return _normalised_log_mel(_stft_magnitude(_emphasise(x)))


def num_frames_for(num_samples: int) -> int:
    """Video frames SadTalker makes for ``num_samples`` of 16 kHz audio: int(len / 640) (a partial frame is dropped)."""
    return int(num_samples / (SAMPLE_RATE / FPS))


def window_starts(num_frames: int) -> np.ndarray:
    """First mel row of each video frame's window: int(80 * ((i - 2) / 25)), truncated toward zero like Python int()."""
    i = np.arange(num_frames, dtype=np.float64)
    return np.trunc(float(MEL_FRAMES_PER_SECOND) * ((i - 2.0) / float(FPS))).astype(np.int64)


def _window_start(frame: int) -> int:
    """``window_starts`` of one frame."""
    return int(float(MEL_FRAMES_PER_SECOND) * ((frame - 2.0) / float(FPS)))


def frame_windows(mel: np.ndarray, num_frames: int) -> np.ndarray:
    """(num_frames, 80, 16) windows: mel rows start..start+15 of each frame, indices clamped to the spectrogram."""
    mel = np.asarray(mel)
    rows = window_starts(num_frames)[:, None] + np.arange(WINDOW_FRAMES)[None, :]  # (num_frames, 16)
    rows = np.clip(rows, 0, mel.shape[1] - 1)
    return np.ascontiguousarray(mel[:, rows].transpose(1, 0, 2))  # (80, F, 16) -> (F, 80, 16)


def audio_features(wav: np.ndarray) -> AudioFeatures:
    """Mel spectrogram and per-frame windows of 16 kHz mono audio, as the official ``get_data`` computes them."""
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    num_frames = num_frames_for(wav.size)
    if num_frames < 1:
        raise InputError("The audio is shorter than one video frame (1/25 s). Upload a longer speech recording.")
    length = num_frames * SAMPLES_PER_VIDEO_FRAME
    wav = wav[:length] if wav.size >= length else np.pad(wav, (0, length - wav.size))
    mel = melspectrogram(wav)
    return AudioFeatures(mel=mel, windows=frame_windows(mel, num_frames), num_frames=num_frames)


def idle_features(seconds: float) -> AudioFeatures:
    """Silent-mode features (the official ``idlemode``): all-zero windows for int(seconds * 25) frames."""
    num_frames = int(seconds * FPS)
    if num_frames < 1:
        raise InputError("The idle animation must last at least one video frame (1/25 s).")
    windows = np.zeros((num_frames, NUM_MELS, WINDOW_FRAMES), dtype=np.float32)
    return AudioFeatures(mel=np.zeros((NUM_MELS, 0), dtype=np.float32), windows=windows, num_frames=num_frames)


# Look-ahead of a frame's window: its last mel row, int(3.2 * (i - 2)) + 15, is centred at most 1720 samples after the
# frame's start and reaches N_FFT / 2 further: 640 * i + 2120, i.e. 1480 samples after the frame's end.
WINDOW_LOOKAHEAD_SAMPLES = (WINDOW_FRAMES - 1) * HOP - 2 * SAMPLES_PER_VIDEO_FRAME + N_FFT // 2 \
    - SAMPLES_PER_VIDEO_FRAME  # 1480


class StreamingAudioFeatures:
    """``audio_features`` of audio that arrives in pieces: each mel row and each video frame's window comes out as
    soon as the audio it depends on has arrived (a window: up to WINDOW_LOOKAHEAD_SAMPLES, 92.5 ms, after its
    frame's end), the rest once ``finish`` says the audio is complete.

    The audio is taken padded with zeros to whole video frames (a live utterance keeps its last partial frame), so
    the windows equal ``audio_features(padded).windows`` (and, for audio of whole frames, ``audio_features(audio)``)
    up to float rounding. Memory stays bounded: only the samples and mel rows later windows need are kept.
    """

    def __init__(self):
        self._samples = np.zeros(0, np.float64)  # pre-emphasised audio from absolute sample self._first_sample
        self._first_sample = 0
        self._received = 0  # samples pushed so far
        self._previous = 0.0  # the last raw sample (the pre-emphasis filter's state)
        self._mel = np.zeros((NUM_MELS, 0), np.float32)  # mel rows from absolute row self._first_row
        self._first_row = 0
        self._rows = 0  # mel rows computed
        self._frames = 0  # windows handed out
        self._total_rows: int | None = None  # known once finished
        self.num_frames: int | None = None  # video frames of the whole audio, once finished

    @property
    def finished(self) -> bool:
        return self._total_rows is not None

    @property
    def frames_out(self) -> int:
        """Windows handed out so far (the next window is of this frame)."""
        return self._frames

    def push(self, samples: np.ndarray) -> None:
        """More 16 kHz mono audio (any length, float)."""
        if self.finished:
            raise ValueError("the audio was finished; start a new StreamingAudioFeatures for more")
        x = np.asarray(samples, dtype=np.float32).astype(np.float64).reshape(-1)  # file mode reads float32
        if not x.size:
            return
        self._samples = np.concatenate([self._samples, _emphasise(x, self._previous)])
        self._previous = float(x[-1])
        self._received += x.size
        # row j is centred on sample j * HOP and needs the samples up to j * HOP + N_FFT / 2
        self._compute_rows(max(0, (self._received - N_FFT // 2) // HOP + 1))

    def finish(self) -> None:
        """The audio is complete: pad it to whole video frames; every remaining row and window can come out."""
        if self.finished:
            return
        padded = -(-self._received // SAMPLES_PER_VIDEO_FRAME) * SAMPLES_PER_VIDEO_FRAME
        if padded > self._received:
            self.push(np.zeros(padded - self._received, np.float32))
        self._total_rows = 1 + self._received // HOP
        self.num_frames = self._received // SAMPLES_PER_VIDEO_FRAME
        self._compute_rows(self._total_rows)

    def windows(self) -> np.ndarray:
        """(n, 80, 16) float32 windows of the next n frames whose audio has arrived (n may be 0)."""
        ready = self._frames
        limit = self.num_frames if self.finished else None
        while limit is None or ready < limit:
            last_row = _window_start(ready) + WINDOW_FRAMES - 1
            if self.finished:
                last_row = min(last_row, self._total_rows - 1)
            if last_row >= self._rows:
                break
            ready += 1
        count = ready - self._frames
        if count == 0:
            return np.zeros((0, NUM_MELS, WINDOW_FRAMES), np.float32)
        starts = np.array([_window_start(i) for i in range(self._frames, ready)], np.int64)
        rows = starts[:, None] + np.arange(WINDOW_FRAMES)[None, :]  # (n, 16) absolute mel rows
        rows = np.clip(rows, 0, self._rows - 1) - self._first_row
        out = np.ascontiguousarray(self._mel[:, rows].transpose(1, 0, 2))  # (80, n, 16) -> (n, 80, 16)
        self._frames = ready
        self._forget()
        return out

    def _compute_rows(self, stop: int) -> None:
        """Mel rows self._rows .. stop-1 from the kept samples (zeros outside the audio, as the centred STFT)."""
        if stop <= self._rows:
            return
        first_sample = self._rows * HOP - N_FFT // 2  # absolute sample where the first new row's frame starts
        last_sample = (stop - 1) * HOP + N_FFT // 2  # ... and where the last one's ends
        segment = np.zeros(last_sample - first_sample, np.float64)
        lo = max(first_sample, self._first_sample)
        hi = min(last_sample, self._first_sample + self._samples.size)
        if hi > lo:
            segment[lo - first_sample:hi - first_sample] = self._samples[lo - self._first_sample:hi - self._first_sample]
        rows = _normalised_log_mel(_frames_magnitude(segment))  # (80, stop - self._rows)
        self._mel = np.concatenate([self._mel, rows], axis=1)
        self._rows = stop
        self._forget()

    def _forget(self) -> None:
        """Drop the mel rows and samples that no later row or window needs."""
        keep_row = max(0, _window_start(self._frames))  # first row of the next window
        if keep_row > self._first_row:
            drop = min(keep_row, self._rows) - self._first_row
            self._mel = self._mel[:, drop:]
            self._first_row += drop
        keep_sample = max(0, self._rows * HOP - N_FFT // 2)  # where the next row's frame starts
        if keep_sample > self._first_sample:
            drop = min(keep_sample - self._first_sample, self._samples.size)
            self._samples = self._samples[drop:]
            self._first_sample += drop
