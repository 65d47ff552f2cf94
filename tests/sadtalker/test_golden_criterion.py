"""The whole-render criterion (``support.golden.RENDER_BOUNDS``) is sharp: deliberate mistakes fail it by a clear
factor, while the correct render passes it.

The bounds tolerate the reference's own spread across CPU kinds (up to 3.38e-3 max relative error), so this shows
that they still reject real mistakes. The renders are made on the inputs of one render case of
``$SADTALKER_GOLDEN_DIR``: ``render_still_full`` where there is one, the case with the largest measured spread, so the
correct render sits closest to the bounds. A wrong render is what our ``FaceRenderer`` draws with one mistake
applied to its inputs (yaw sign flipped, expression scale x1.1, source image flipped left-right), or our correct
render rearranged where the mistake is a rearrangement of the output (frames shifted by one, red and blue swapped).
Every render is made once per module (each takes seconds on a CPU). The measured statistics and their ratio to the
bounds are printed per case, as the golden test does.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Callable

import numpy as np
import pytest
import torch

from support.golden_renderer import (RENDER_KINDS, reference_frames, render_batch_size, render_frames,
                                     render_inputs_from_case)
from support.golden import (GOLDEN_DIR, RENDER_BOUNDS, GoldenCase, load_case, render_bounds_exceeded, render_errors,
                            report_line)
from sadtalker.facerender import FaceRenderer, RenderInputs
from sadtalker.keypoints import degrees_from_bins
from sadtalker.synthetic import cached_official_layout as synthetic_checkpoint_dir

PREFERRED_KIND = "render_still_full"
# A wrong render must exceed a bound by at least this factor: failing "barely" would mean the bounds sit where
# mistakes begin, and a CPU with a little more spread, or a slightly smaller mistake, would slip through.
MIN_FAIL_FACTOR = 10.0
# A yaw sign flip is only a visible mistake when the yaw is not close to 0: flipping 1 degree turns the head by 2,
# about 20x the mean bound with the synthetic weights (0.2 degrees of turn is about 2x, 0.5 about 5x).
MIN_YAW_DEGREES = 1.0


def _render_case() -> GoldenCase:
    kinds = {}
    for path in sorted(glob.glob(os.path.join(GOLDEN_DIR, "*.npz"))):
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
        kinds[path] = str(meta.get("case", os.path.splitext(os.path.basename(path))[0]))
    renders = [path for path, kind in kinds.items() if kind in RENDER_KINDS]
    if not renders:
        pytest.fail(f"no whole-render case ({', '.join(RENDER_KINDS)}) in {GOLDEN_DIR!r} (SADTALKER_GOLDEN_DIR)")
    preferred = [path for path in renders if kinds[path] == PREFERRED_KIND]
    return load_case((preferred or renders)[0])


@dataclasses.dataclass
class RenderSetup:
    case: GoldenCase
    renderer: FaceRenderer
    inputs: RenderInputs
    batch_size: int
    reference: np.ndarray  # (N, S, S, 3) the reference's video frames
    correct: np.ndarray  # (N, S, S, 3) our render of the case as it is

    def render(self, inputs: RenderInputs) -> np.ndarray:
        return render_frames(self.renderer, inputs, self.batch_size)


@pytest.fixture(scope="module")
def setup() -> RenderSetup:
    from sadtalker.checkpoints import load_networks

    case = _render_case()
    nets = load_networks(synthetic_checkpoint_dir(legacy=False), size=256,
                         parts=("kp_extractor", "generator", "mapping_crop", "mapping_still"))
    renderer = FaceRenderer(nets.kp_extractor, nets.generator, nets.mapping_crop, nets.mapping_still)
    inputs = render_inputs_from_case(case)
    batch_size = render_batch_size(case)
    correct = render_frames(renderer, inputs, batch_size)
    return RenderSetup(case, renderer, inputs, batch_size, reference_frames(case, inputs.num_frames), correct)


def _yaw_sign_flipped(setup: RenderSetup) -> np.ndarray:
    """Every frame rendered with the negated driving yaw (the user's ``input_yaw`` where given, else MappingNet's)."""
    inputs = setup.inputs
    if inputs.yaw is not None:
        yaw = inputs.yaw
    else:
        windows = np.stack([inputs.driving_window(i) for i in range(inputs.num_frames)])  # (N, C, 27)
        with torch.inference_mode():
            motion = setup.renderer.mappings[inputs.channels](torch.from_numpy(windows))
        yaw = degrees_from_bins(motion.yaw).double().numpy()
    if np.abs(yaw).max() < MIN_YAW_DEGREES:
        pytest.skip(f"{setup.case.name}: yaw {np.abs(yaw).max():.2f} degrees at most; a sign flip would not show")
    return setup.render(dataclasses.replace(inputs, yaw=-yaw))


def _expression_scaled(setup: RenderSetup) -> np.ndarray:
    scale = float(setup.case.option("expression_scale", 1.0))
    return setup.render(render_inputs_from_case(setup.case, expression_scale=1.1 * scale))


def _source_flipped(setup: RenderSetup) -> np.ndarray:
    flipped = np.ascontiguousarray(setup.inputs.source_image[:, :, ::-1])  # (3, S, S) left-right
    return setup.render(dataclasses.replace(setup.inputs, source_image=flipped))


def _frames_shifted(setup: RenderSetup) -> np.ndarray:
    """Frame i shows frame i-1 (an off-by-one in the frame index; the first frame is shown twice)."""
    if setup.inputs.num_frames < 2:
        pytest.skip(f"{setup.case.name}: a single frame cannot be shifted")
    return setup.correct[np.maximum(np.arange(setup.inputs.num_frames) - 1, 0)]


def _red_blue_swapped(setup: RenderSetup) -> np.ndarray:
    return setup.correct[..., ::-1]  # RGB written as BGR, the classic OpenCV mistake


WRONG_RENDERS: dict[str, Callable[[RenderSetup], np.ndarray]] = {
    "yaw_sign_flipped": _yaw_sign_flipped,
    "frames_shifted_by_one": _frames_shifted,
    "red_blue_swapped": _red_blue_swapped,
    "expression_scale_x1.1": _expression_scaled,
    "source_flipped_left_right": _source_flipped,
}


def _judge(setup: RenderSetup, label: str, frames: np.ndarray, request, record_property) -> dict[str, float]:
    """The criterion's statistics of ``frames`` against the reference, reported with their ratio to the bounds."""
    assert frames.shape == setup.reference.shape, f"{label}: shape {frames.shape} != {setup.reference.shape}"
    errors = render_errors(frames, setup.reference)
    record_property("render_errors", errors)
    report_line(request.config, f"criterion {setup.case.name} {label}: " + " ".join(
        f"{name}={errors[name]:.3g} ({errors[name] / bound:.3g}x bound {bound:g})"
        for name, bound in RENDER_BOUNDS.items()))
    return errors


def test_correct_render_passes(setup, request, record_property):
    errors = _judge(setup, "correct", setup.correct, request, record_property)
    assert not render_bounds_exceeded(errors), f"the correct render fails the criterion: {errors}"


@pytest.mark.parametrize("mistake", WRONG_RENDERS)
def test_wrong_render_fails_clearly(mistake, setup, request, record_property):
    errors = _judge(setup, mistake, WRONG_RENDERS[mistake](setup), request, record_property)
    assert render_bounds_exceeded(errors), f"{mistake} passes the criterion: {errors}"
    factor = max(errors[name] / bound for name, bound in RENDER_BOUNDS.items())
    assert factor >= MIN_FAIL_FACTOR, f"{mistake} fails by only {factor:.3g}x (want >= {MIN_FAIL_FACTOR:g}x): {errors}"
