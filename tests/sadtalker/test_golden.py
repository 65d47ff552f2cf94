"""Faithfulness to the official SadTalker: every golden case in ``$SADTALKER_GOLDEN_DIR`` (default ``tests/golden``).

One test per ``*.npz`` file, dispatched by the case kind (``meta["case"]``, else the file stem) to the checks of
``tests/support/golden_audio.py`` and ``tests/support/golden_renderer.py``. An unknown kind fails (never skips), and so does a missing
or empty directory. The networks come from synthetic official-layout checkpoint files written to a temp cache and
loaded once through ``sadtalker.checkpoints.load_networks``, the path a user's real files take.

The measured error of every compared array is printed per case (and stored as the ``golden_errors`` property of
the test in a junit report), so it can be quoted: ``pytest tests/test_golden.py -rA`` or ``--junitxml``. It is the
max error of the array, or for whole renders (``video_frames``) the mean, 99.9th percentile and max of the relative
error, which ``support.golden.RENDER_BOUNDS`` judges.
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import time

import pytest
import torch

from support.golden import GOLDEN_DIR, load_case, report_line
from sadtalker.synthetic import cached_official_layout as synthetic_checkpoint_dir

CHECK_MODULES = ("support.golden_audio", "support.golden_renderer")

# Network parts and the module that defines each (a part whose module is not in this checkout is not loaded, so
# only the cases that need it fail).
_PART_MODULES = {
    "kp_extractor": "sadtalker.models.keypoint_detector", "generator": "sadtalker.models.generator",
    "mapping_crop": "sadtalker.models.mapping", "mapping_still": "sadtalker.models.mapping",
    "he_estimator": "sadtalker.models.head_pose_estimator", "audio2exp": "sadtalker.models.audio2exp",
    "audio2pose": "sadtalker.models.audio2pose", "face_recon": "sadtalker.models.face_recon",
}


def _case_paths() -> list[str]:
    return sorted(glob.glob(os.path.join(GOLDEN_DIR, "*.npz"))) if os.path.isdir(GOLDEN_DIR) else []


def _registry() -> dict:
    registry: dict = {}
    for module_name in CHECK_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue  # that side's checks are not in this checkout: its kinds are unknown and fail
        for kind, check in module.CASES.items():
            if kind in registry:
                raise AssertionError(f"golden case kind {kind!r} is registered twice ({module_name})")
            registry[kind] = check
    return registry


CASE_PATHS = _case_paths()
REGISTRY = _registry()


@pytest.fixture(scope="session")
def golden_networks():
    from sadtalker.checkpoints import load_networks

    parts = [p for p, m in _PART_MODULES.items() if importlib.util.find_spec(m) is not None]
    return load_networks(synthetic_checkpoint_dir(legacy=True), size=256, parts=parts)


def test_golden_dir_has_cases():
    assert os.path.isdir(GOLDEN_DIR), f"golden case directory {GOLDEN_DIR!r} does not exist (SADTALKER_GOLDEN_DIR)"
    assert CASE_PATHS, f"golden case directory {GOLDEN_DIR!r} holds no *.npz cases"


@pytest.mark.parametrize("path", CASE_PATHS or [None], ids=lambda p: os.path.basename(p) if p else "no-cases")
def test_golden(path, request, record_property):
    if path is None:
        pytest.fail(f"no golden cases in {GOLDEN_DIR!r}")
    case = load_case(path)
    check = REGISTRY.get(case.kind)
    if check is None:
        pytest.fail(f"unknown golden case kind {case.kind!r} in {os.path.basename(path)}; "
                    f"known kinds: {', '.join(sorted(REGISTRY))}")
    nets = request.getfixturevalue("golden_networks")
    started = time.perf_counter()
    try:
        with torch.inference_mode():
            check(case, nets)
    finally:
        seconds = time.perf_counter() - started
        errors = " ".join(f"{k}={v:.3g}" for k, v in case.errors.items())
        record_property("golden_errors", dict(case.errors))
        line = f"golden {case.name} [{case.kind}] {seconds:.2f}s errors: {errors or '(none compared)'}"
        report_line(request.config, line)
    assert case.errors, f"{case.name}: the check compared nothing"
