"""How well a mouth follows its speech, measured on rendered frames (shared by the benches)."""
from __future__ import annotations

import numpy as np

from core.errors import NoFaceError
from core.landmarks import LandmarkDetector

MAX_LAG_FRAMES = 5


def lip_opening(detector: LandmarkDetector, rgb: np.ndarray) -> float | None:
    """Inner-lip gap found by the 68-point detector, in eye distances (None when no face is found)."""
    try:
        points = detector.detect(rgb).points
    except NoFaceError:
        return None
    inner_gap = np.mean([points[lower, 1] - points[upper, 1] for upper, lower in ((61, 67), (62, 66), (63, 65))])
    eye_distance = np.linalg.norm(points[42:48].mean(0) - points[36:42].mean(0))
    return float(inner_gap / eye_distance)


def lip_sync(openings: np.ndarray, levels: np.ndarray) -> tuple[float, int]:
    """Pearson r between mouth opening and loudness per frame, and the lag (frames; + = the mouth is late) at which
    their correlation is best, within +-MAX_LAG_FRAMES."""
    r = float(np.corrcoef(openings, levels)[0, 1]) if len(openings) > 2 else float("nan")
    best, best_lag = -2.0, 0
    for lag in range(-MAX_LAG_FRAMES, MAX_LAG_FRAMES + 1):
        a, b = (openings[lag:], levels[:len(levels) - lag]) if lag >= 0 else (openings[:lag], levels[-lag:])
        if len(a) > 2:
            value = float(np.corrcoef(a, b)[0, 1])
            if value > best:
                best, best_lag = value, lag
    return r, best_lag
