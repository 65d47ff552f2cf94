"""Progress of a render: the rate of the final frames and the time left (one formula for the page, the viewer's
progress messages and the console)."""
from __future__ import annotations

from collections import deque

RATE_WINDOW_FRAMES = 50  # the ETA uses the rate of the most recent final frames


class RenderRate:
    """Feed ``started()`` when the motion is known (final rendering begins) and ``frame()`` per final frame."""

    def __init__(self, window: int = RATE_WINDOW_FRAMES):
        self._times: deque[float] = deque(maxlen=window)
        self._started: float | None = None

    def started(self, now: float) -> None:
        self._started = now
        self._times.clear()

    def frame(self, now: float) -> None:
        self._times.append(now)

    def eta_s(self, done: int, total: int) -> float | None:
        """Seconds until ``total`` frames are done; None while unknown (fewer than two measurements)."""
        if total <= done:
            return 0.0
        times, rate = self._times, self.fps()  # final frames per second, recently
        if rate is None and self._started is not None and times and times[-1] > self._started:
            # a slow engine's first frames (seconds each): its rate since the motion was known, set-up included
            rate = done / (times[-1] - self._started)
        return None if rate is None else (total - done) / rate

    def fps(self) -> float | None:
        """Final frames per second recently; None until three frames say it."""
        times = self._times
        if len(times) >= 3 and times[-1] > times[0]:
            return (len(times) - 1) / (times[-1] - times[0])
        return None
