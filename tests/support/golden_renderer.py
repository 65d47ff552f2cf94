"""Golden checks of the renderer side (mapping, keypoints, generator, renderer data and the whole renderer step).

``CASES`` maps a case kind to ``check(case, nets)``; ``tests/test_golden.py`` dispatches every ``*.npz`` to it.
Everything a check needs (sizes, batch size, options) is read from the case itself, so the same checks run on
other inputs of the same kinds.
"""
from __future__ import annotations

import re

import numpy as np
import torch

from support.golden import DEGREE_ABS_TOL, IMAGE_ABS_TOL, GoldenCase
from sadtalker.facerender import FaceRenderer, prepare_render_inputs
from sadtalker.keypoints import degrees_from_bins, head_pose_degrees, rotation_matrix, transform_keypoints
from sadtalker.models.mapping import HeadMotion

MOTION_FIELDS = ("yaw", "pitch", "roll", "t", "exp")
ANGLES = ("yaw", "pitch", "roll")


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


def _check_motion(case: GoldenCase, motion: HeadMotion, with_degrees: bool) -> None:
    for field in MOTION_FIELDS:
        case.check_close(field, getattr(motion, field))
    if with_degrees:
        for angle in ANGLES:
            if f"{angle}_deg" in case:
                case.check_close(f"{angle}_deg", degrees_from_bins(getattr(motion, angle)), abs_tol=DEGREE_ABS_TOL)


def check_mapping_crop(case: GoldenCase, nets) -> None:
    with torch.inference_mode():
        _check_motion(case, nets.mapping_crop(_tensor(case["input_3dmm"])), with_degrees=True)


def check_mapping_still(case: GoldenCase, nets) -> None:
    with torch.inference_mode():
        _check_motion(case, nets.mapping_still(_tensor(case["input_3dmm"])), with_degrees=True)


def check_kp_detector(case: GoldenCase, nets) -> None:
    with torch.inference_mode():
        case.check_close("kp_value", nets.kp_extractor(_tensor(case["image"])))


def check_he_estimator(case: GoldenCase, nets) -> None:
    assert nets.he_estimator is not None, "he_estimator case needs the legacy facevid2vid checkpoint loaded"
    with torch.inference_mode():
        _check_motion(case, nets.he_estimator(_tensor(case["image"])), with_degrees=False)


def check_keypoint_transformation(case: GoldenCase, nets) -> None:
    motion = HeadMotion(*(_tensor(case[field]) for field in MOTION_FIELDS))
    before = {field: case[field].copy() for field in MOTION_FIELDS}
    canonical = _tensor(case["kp_canonical"])
    case.check_close("kp_transformed", transform_keypoints(canonical, motion))
    degrees = head_pose_degrees(motion)
    for angle, value in zip(ANGLES, degrees):
        case.check_close(f"{angle}_deg", value, abs_tol=DEGREE_ABS_TOL)
    case.check_close("rot_mat", rotation_matrix(*degrees))
    if "kp_transformed_with_in" in case:
        overrides = [_tensor(case[f"{angle}_in"]) for angle in ANGLES]
        case.check_close("kp_transformed_with_in", transform_keypoints(canonical, motion, *overrides))
    for field in MOTION_FIELDS:  # the reference zeroes t in place; ours must leave its inputs alone
        assert np.array_equal(case[field], before[field]), f"{case.name}: transform_keypoints modified {field}"


def check_generator(case: GoldenCase, nets) -> None:
    with torch.inference_mode():
        out = nets.generator(_tensor(case["source_image"]), _tensor(case["kp_driving"]), _tensor(case["kp_source"]))
    case.check_close("prediction", out.prediction, abs_tol=IMAGE_ABS_TOL)
    case.check_close("occlusion_map", out.occlusion_map, abs_tol=IMAGE_ABS_TOL)
    case.check_close("deformation", out.deformation, abs_tol=IMAGE_ABS_TOL)
    if "mask" in case:
        case.check_close("mask", out.mask, abs_tol=IMAGE_ABS_TOL)


def render_inputs_from_case(case: GoldenCase, prefix: str = "", **changes):
    """The renderer inputs of a (sub-)case built exactly as the reference call described by its options.

    ``changes`` replace arguments of ``prepare_render_inputs`` (e.g. ``expression_scale``) to build deliberately
    wrong inputs."""
    source_rgb = case[prefix + "source_png_rgb"]
    size = int(case[prefix + "source_image"].shape[-1])
    options = dict(preprocess=str(case.option("preprocess", "crop")),
                   still=bool(case.option("still_mode", case.option("still", False))),
                   expression_scale=float(case.option("expression_scale", 1.0)), size=size,
                   **{f"input_{angle}": case.option(f"input_{angle}") for angle in ANGLES})
    options.update(changes)
    return prepare_render_inputs(source_rgb, case[prefix + "source_coeff_3dmm"],
                                 case[prefix + "generated_coeff_3dmm"], **options)


def _check_render_data(case: GoldenCase, inputs, batch_size: int, prefix: str = "") -> None:
    case.check_close(prefix + "source_image", inputs.source_image[None], abs_tol=IMAGE_ABS_TOL)
    case.check_close(prefix + "source_semantics", inputs.source_semantics()[None])
    case.check_close(prefix + "target_semantics_list", inputs.target_semantics(batch_size))
    if prefix + "frame_num" in case:
        assert inputs.num_frames == int(case[prefix + "frame_num"]), f"{case.name}: frame count"
    for angle in ANGLES:
        key = f"{prefix}{angle}_c_seq"
        ours = inputs.camera_pose_layout(angle, batch_size)
        if key in case:
            assert ours is not None, f"{case.name}: {key} expected (input_{angle} not read from the case)"
            case.check_close(key, ours.astype(np.float32))
        else:
            assert ours is None, f"{case.name}: {angle} override produced but the reference has no {key}"


def render_batch_size(case: GoldenCase) -> int:
    return int(case.option("batch_size", 1))


def render_frames(renderer: FaceRenderer, inputs, batch_size: int) -> np.ndarray:
    """Our whole clip, (N, S, S, 3) float32 in [0, 1]."""
    return np.stack(list(renderer.frames(inputs, batch_size=batch_size)))


def reference_frames(case: GoldenCase, num_frames: int) -> np.ndarray:
    """The reference's video frames (N, S, S, 3) from its batch layout (rows hold consecutive runs of frames)."""
    predictions = case["predictions"]  # (batch_size, F, 3, S, S)
    return predictions.reshape(-1, *predictions.shape[2:])[:num_frames].transpose(0, 2, 3, 1)


def check_render(case: GoldenCase, nets) -> None:
    """The whole renderer step (data preparation + networks) against the reference predictions.

    The frames are judged by ``RENDER_BOUNDS`` (error statistics), not by the max: a whole render is reproducible
    across CPU kinds only to a few 1e-3 (``support.golden``'s docstring)."""
    batch_size = render_batch_size(case)
    inputs = render_inputs_from_case(case)
    _check_render_data(case, inputs, batch_size)
    renderer = FaceRenderer(nets.kp_extractor, nets.generator, nets.mapping_crop, nets.mapping_still)
    frames = render_frames(renderer, inputs, batch_size)
    case.arrays["video_frames"] = reference_frames(case, inputs.num_frames)
    case.check_render_close("video_frames", frames)


def _sub_case(case: GoldenCase, prefix: str) -> GoldenCase:
    """A case holding several calls (arrays ``a_*``, ``b_*``; desc "shared. a: options. b: options."): one call."""
    parts = re.split(r"(?:^|\s)([a-z]):\s", case.desc)
    shared, segments = parts[0], dict(zip(parts[1::2], parts[2::2]))
    desc = shared + " " + segments.get(prefix.rstrip("_"), "")
    arrays = {k[len(prefix):]: v for k, v in case.arrays.items() if k.startswith(prefix)}
    return GoldenCase(name=f"{case.name}[{prefix.rstrip('_')}]", kind=case.kind, arrays=arrays,
                      meta={**case.meta, "desc": desc})


def check_facerender_batch(case: GoldenCase, nets) -> None:
    """Renderer-data batching/padding only (no networks), for every call stored in the case."""
    prefixes = sorted({key.split("_", 1)[0] + "_" for key in case.arrays if key.endswith("source_png_rgb")})
    assert prefixes, f"{case.name}: no calls found"
    for prefix in prefixes:
        sub = _sub_case(case, prefix)
        batch_size = render_batch_size(sub)
        _check_render_data(sub, render_inputs_from_case(sub), batch_size)
        case.errors.update({prefix + key: value for key, value in sub.errors.items()})


CASES = {
    "mapping_crop": check_mapping_crop,
    "mapping_still": check_mapping_still,
    "kp_detector": check_kp_detector,
    "he_estimator": check_he_estimator,
    "keypoint_transformation": check_keypoint_transformation,
    "generator": check_generator,
    "render_crop_2frames": check_render,
    "render_still_full": check_render,
    "render_pose_override": check_render,
    "facerender_batch": check_facerender_batch,
}
# The kinds that compare a whole render (judged by RENDER_BOUNDS rather than by the max)
RENDER_KINDS = tuple(kind for kind, check in CASES.items() if check is check_render)
