"""Helpers shared by the golden (faithfulness) checks: case loading, tolerances, options read from a case.

A golden case is an ``.npz`` written by the official SadTalker code with synthetic weights: inputs and outputs,
plus ``meta`` (JSON: ``case`` kind, ``seed``, ``desc`` saying what was called and with which options).
Tolerances follow the reference README: float max|d|/max|ref| < 1e-3 (images may use absolute 1e-3),
mel absolute 1e-4, head-pose degrees absolute 1e-2, integers / uint8 exact.
"""
from __future__ import annotations

import ast
import json
import os
import re
from dataclasses import dataclass, field

import numpy as np

REL_TOL = 1e-3
IMAGE_ABS_TOL = 1e-3
MEL_ABS_TOL = 1e-4
DEGREE_ABS_TOL = 1e-2


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


def load_case(path: str) -> GoldenCase:
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files if k != "meta"}
        meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
    name = os.path.splitext(os.path.basename(path))[0]
    return GoldenCase(name=name, kind=str(meta.get("case", name)), arrays=arrays, meta=meta)


def _to_numpy(value):
    try:
        import torch

        if isinstance(value, torch.Tensor):
            return value.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a hard dependency of the project
        pass
    return value
