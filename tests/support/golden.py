"""Helpers shared by the golden (faithfulness) checks: case loading, tolerances, options read from a case.

A golden case is an ``.npz`` written by the official SadTalker code with synthetic weights: inputs and outputs,
plus ``meta`` (JSON: ``case`` kind, ``seed``, ``desc`` saying what was called and with which options).
Tolerances follow the reference README: float max|d|/max|ref| < 1e-3 (images may use absolute 1e-3),
mel absolute 1e-4, head-pose degrees absolute 1e-2, integers / uint8 exact. These hold for every component case
on any CPU.

Whole renders (``video_frames`` of the ``render_*`` cases) are judged differently, by ``RENDER_BOUNDS`` on the
distribution of the relative error e = |ours - ref| / max|ref| over all values (frames x pixels x channels):

* Why not max < 1e-3: the golden files were written on an AVX2 CPU. The official code itself, run on an AVX-512
  CPU (oneDNN picks AVX-512 convolution kernels), differs from its own golden ``render_still_full`` by
  max 3.38e-3, 99.9th percentile 1.8e-3, mean 1.75e-4 (1.1 % of values above 1e-3); a hidden render case by 5.7e-4
  max. Components alone stay <= 2.6e-5 (generator) and <= 2e-6 elsewhere: last-bit convolution differences are
  amplified by the render chain (keypoints -> dense motion -> warped features -> generator). With
  ``ONEDNN_MAX_CPU_ISA=AVX2`` the official code reproduces the golden to 4.2e-5. The spread is a property of the
  reference, not of an implementation, so no implementation can do better than it across CPUs.
* The bounds are about 6x the worst measured spread on every statistic: mean 1e-3 (measured 1.75e-4),
  99.9th percentile 1e-2 (1.8e-3), max 2e-2 (3.38e-3). 6x rather than 2-3x because the spread was measured on one
  AVX-512 CPU and two inputs (they differed by 6x: the amplification depends on the input), while the oneDNN
  kernels of other x86-64 CPUs (SSE4.1, AVX, other AVX-512 parts, other thread counts) and other inputs were not
  measured. In 8-bit terms: mean 0.26 grey levels, 99.9th percentile 2.6, max 5.1.
* They stay sharp because a real mistake changes most of the picture, which moves the mean: every deliberate
  mistake in ``tests/test_golden_criterion.py`` (yaw sign flip, frames shifted by one, two colour channels
  swapped, expression scale 1.1, source flipped left-right) fails the mean bound by >= 15x, and 0.2 degrees of yaw
  or an expression scale of 1.003 still fail it (measured with the synthetic weights). The percentile catches a
  wrong patch too small to move the mean (>= 0.1 % of values, about an 11x11 pixel patch in a 2-frame 256 clip),
  the max a few wrong pixels.
"""
from __future__ import annotations

import ast
import json
import os
import re
from dataclasses import dataclass, field

import numpy as np

from .paths import ROOT

GOLDEN_DIR = os.environ.get("SADTALKER_GOLDEN_DIR") or str(ROOT / "tests" / "golden")

REL_TOL = 1e-3
IMAGE_ABS_TOL = 1e-3
MEL_ABS_TOL = 1e-4
DEGREE_ABS_TOL = 1e-2
# Whole renders: bounds on statistics of |ours - ref| / max|ref| (module docstring: measured spread and margins)
RENDER_PERCENTILE = 99.9
RENDER_BOUNDS = {"mean": 1e-3, f"p{RENDER_PERCENTILE:g}": 1e-2, "max": 2e-2}


@dataclass
class GoldenCase:
    name: str  # file stem
    kind: str  # meta["case"] (falls back to the stem): selects the check
    arrays: dict[str, np.ndarray]
    meta: dict
    errors: dict[str, float] = field(default_factory=dict)  # array name -> measured error (for the report)

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    def __contains__(self, key: str) -> bool:
        return key in self.arrays

    @property
    def desc(self) -> str:
        return str(self.meta.get("desc", ""))

    def option(self, name: str, default=None):
        """An option of the official call: an array of that name if stored, else ``name=value`` in ``desc``."""
        if name in self.arrays:
            value = self.arrays[name]
            return value.item() if value.ndim == 0 else value.tolist()
        match = re.search(rf"\b{re.escape(name)}\s*=\s*('[^']*'|\"[^\"]*\"|\[[^\]]*\]|[-+\w.]+)", self.desc)
        if not match:
            return default
        text = match.group(1)
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text

    def check_close(self, key: str, ours, rel: float = REL_TOL, abs_tol: float | None = None) -> None:
        """Assert ``ours`` matches the stored array ``key``: relative to max|ref|, or absolute when ``abs_tol``."""
        ref = np.asarray(self.arrays[key])
        ours = np.asarray(_to_numpy(ours))
        assert ours.shape == ref.shape, f"{self.name}:{key}: shape {ours.shape} != reference {ref.shape}"
        if ref.dtype.kind in "iub":
            mismatches = int(np.count_nonzero(ours.astype(ref.dtype) != ref))
            self.errors[key] = float(mismatches)
            assert mismatches == 0, f"{self.name}:{key}: {mismatches} integer values differ (must be exact)"
            return
        assert np.all(np.isfinite(ours)), f"{self.name}:{key}: non-finite values"
        diff = float(np.max(np.abs(ours.astype(np.float64) - ref.astype(np.float64)))) if ref.size else 0.0
        if abs_tol is not None:
            self.errors[key] = diff
            assert diff < abs_tol, f"{self.name}:{key}: max|diff| {diff:.3g} >= {abs_tol:g}"
        else:
            scale = float(np.max(np.abs(ref))) if ref.size else 0.0
            relative = diff / scale if scale > 0 else diff
            self.errors[key] = relative
            assert relative < rel, f"{self.name}:{key}: max|diff|/max|ref| {relative:.3g} >= {rel:g}"

    def check_render_close(self, key: str, ours) -> None:
        """Assert a whole render ``ours`` matches the stored array ``key`` by ``RENDER_BOUNDS`` (all statistics are
        recorded as ``key:mean``, ``key:p99.9``, ``key:max``)."""
        ref = np.asarray(self.arrays[key])
        ours = np.asarray(_to_numpy(ours))
        assert ours.shape == ref.shape, f"{self.name}:{key}: shape {ours.shape} != reference {ref.shape}"
        assert np.all(np.isfinite(ours)), f"{self.name}:{key}: non-finite values"
        errors = render_errors(ours, ref)
        self.errors.update({f"{key}:{name}": value for name, value in errors.items()})
        exceeded = render_bounds_exceeded(errors)
        assert not exceeded, f"{self.name}:{key}: relative error " + ", ".join(
            f"{name} {errors[name]:.3g} >= {RENDER_BOUNDS[name]:g}" for name in exceeded)


def load_case(path: str) -> GoldenCase:
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files if k != "meta"}
        meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
    name = os.path.splitext(os.path.basename(path))[0]
    return GoldenCase(name=name, kind=str(meta.get("case", name)), arrays=arrays, meta=meta)


def render_errors(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Statistics of |ours - ref| / max|ref| over all values, keyed as ``RENDER_BOUNDS``."""
    relative = np.abs(ours.astype(np.float64) - ref.astype(np.float64)).ravel()
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    if scale > 0:
        relative /= scale
    if not relative.size:
        return dict.fromkeys(RENDER_BOUNDS, 0.0)
    percentile = np.percentile(relative, RENDER_PERCENTILE)
    return {"mean": float(relative.mean()), f"p{RENDER_PERCENTILE:g}": float(percentile), "max": float(relative.max())}


def render_bounds_exceeded(errors: dict[str, float]) -> list[str]:
    """The statistics of ``render_errors`` that are not below their bound (empty: the render matches)."""
    return [name for name, bound in RENDER_BOUNDS.items() if not errors[name] < bound]


def report_line(config, line: str) -> None:
    """Write a line to the terminal even while the test's output is captured."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(line)


def _to_numpy(value):
    try:
        import torch

        if isinstance(value, torch.Tensor):
            return value.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a hard dependency of the project
        pass
    return value
