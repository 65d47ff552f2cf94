"""Thin-plate spline interpolation in 2-D, with a small dense solver that stays fast on a busy CPU."""
from __future__ import annotations

import numpy as np


def tps(ctrl: np.ndarray, values: np.ndarray, query: np.ndarray, smoothing: float = 1e-4) -> np.ndarray:
    """Thin-plate spline interpolation of ``values`` (N, ...) at ``ctrl`` (N, 2), evaluated at ``query`` (P, 2)."""
    n = ctrl.shape[0]
    flat = values.reshape(n, -1)

    def kernel(a, b):
        d2 = (a[:, None, 0] - b[None, :, 0]) ** 2 + (a[:, None, 1] - b[None, :, 1]) ** 2
        return 0.5 * d2 * np.log(np.maximum(d2, 1e-12))  # r^2 log r

    system = np.zeros((n + 3, n + 3))
    system[:n, :n] = kernel(ctrl, ctrl) + smoothing * np.eye(n)
    system[:n, n] = 1.0
    system[:n, n + 1:] = ctrl
    system[n, :n] = 1.0
    system[n + 1:, :n] = ctrl.T
    rhs = np.zeros((n + 3, flat.shape[1]))
    rhs[:n] = flat
    coef = solve(system, rhs)
    out = (np.einsum("pn,nm->pm", kernel(query, ctrl), coef[:n]) + coef[n]
           + query[:, :1] * coef[n + 1] + query[:, 1:] * coef[n + 2])
    return out.reshape((query.shape[0],) + values.shape[1:])


def solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Gaussian elimination with partial pivoting for a small dense system.

    Deliberately not LAPACK: multithreaded OpenBLAS takes 10-50 ms instead of 0.3 ms for a 120x120 system when
    the other core is busy (rendering, encoding), and this runs on the latency path of the idle animation.
    """
    a = np.array(a, dtype=np.float64)
    b = np.array(b, dtype=np.float64)
    n = a.shape[0]
    for k in range(n):
        pivot = k + int(np.argmax(np.abs(a[k:, k])))
        if pivot != k:
            a[[k, pivot]] = a[[pivot, k]]
            b[[k, pivot]] = b[[pivot, k]]
        if a[k, k] == 0.0:
            raise np.linalg.LinAlgError("singular system")
        factors = a[k + 1:, k] / a[k, k]
        a[k + 1:, k:] -= factors[:, None] * a[k, k:]
        b[k + 1:] -= factors[:, None] * b[k]
    x = np.zeros_like(b)
    for k in range(n - 1, -1, -1):
        x[k] = (b[k] - np.einsum("j,jm->m", a[k, k + 1:], x[k + 1:])) / a[k, k]
    return x
