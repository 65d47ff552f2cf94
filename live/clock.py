"""One clock per live stream: every frame and every piece of speech of a stream carries a time on it."""
from __future__ import annotations

import time


class StreamClock:
    """Seconds since the stream started, on the monotonic clock (never jumps with the wall clock)."""

    def __init__(self, origin: float | None = None):
        self.origin = time.monotonic() if origin is None else origin

    def now(self) -> float:
        return time.monotonic() - self.origin

    def monotonic(self, t: float) -> float:
        """The monotonic time at which the stream reaches ``t``."""
        return self.origin + t
