"""Speech on a live stream's timeline: int16 pieces of at most CHUNK_S, sent a little ahead of their frames."""
from __future__ import annotations

from typing import Iterator

import numpy as np

from core.options import SAMPLE_RATE

CHUNK_S = 0.2  # the longest piece of speech in one message
AHEAD_S = 0.4  # speech is sent this far ahead of the clock, so a viewer has it before it must play


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    """float32 samples in [-1, 1] -> int16 (what goes over the wire)."""
    return (np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0) * 32767.0).astype(np.int16)


class SpeechFeed:
    """One playback of a clip's speech starting at ``start`` on the stream's timeline; ``due(now)`` yields the
    pieces (t, pcm) whose time has (almost) come, each exactly once, in order."""

    def __init__(self, pcm: np.ndarray, start: float, chunk_s: float = CHUNK_S, ahead_s: float = AHEAD_S):
        self.pcm, self.start = pcm, start
        self.chunk = max(1, int(round(chunk_s * SAMPLE_RATE)))
        self.ahead_s = ahead_s
        self.cursor = 0  # next sample to send

    @property
    def finished(self) -> bool:
        return self.cursor >= self.pcm.size

    def due(self, now: float) -> Iterator[tuple[float, np.ndarray]]:
        while not self.finished:
            t = self.start + self.cursor / SAMPLE_RATE
            if t > now + self.ahead_s:
                return
            piece = self.pcm[self.cursor:self.cursor + self.chunk]
            self.cursor += piece.size
            yield t, piece
