"""Synthetic SadTalker weights in the exact official file layout (for tests, benchmarks and demos without weights).

Every tensor is a pure function of (seed, key as stored, shape), following the recipe of the reference data
(README "Synthetic weights"): the same recipe the golden vectors were computed with, so networks loaded from these
files through the normal loader must reproduce the golden outputs. The key/shape list of each official file is in
``sadtalker/data/manifest.json``.
"""
from __future__ import annotations

import json
import os
import zlib
from functools import lru_cache

import numpy as np

SEED = 20231011
MANIFEST_PATH = os.path.join(os.path.dirname(__file__), "data", "manifest.json")

# Extra gain on the default 1/sqrt(fan_in) scale, so softmax-based heads are not degenerate:
# the KPDetector heatmap (temperature 0.1) and the MappingNet head-pose bins.
_GAINS = {"kp_extractor.kp.weight": 6.0, "fc_yaw.weight": 2.0, "fc_pitch.weight": 2.0, "fc_roll.weight": 2.0}
_ANTI_ALIAS_SIGMA = 1.5  # KPDetector down-sampling by 0.25: sigma = (1/0.25 - 1) / 2
_ANTI_ALIAS_TAPS = 13


def _rng_for(key: str) -> np.random.Generator:
    return np.random.default_rng([SEED, zlib.crc32(key.encode("utf-8"))])


def _anti_alias_kernel() -> np.ndarray:
    offsets = np.arange(_ANTI_ALIAS_TAPS, dtype=np.float64) - (_ANTI_ALIAS_TAPS - 1) / 2
    g = np.exp(-offsets ** 2 / (2 * _ANTI_ALIAS_SIGMA ** 2))
    kernel = np.outer(g, g)
    kernel /= kernel.sum()
    # C order explicitly: astype() of a broadcast view keeps a non-contiguous layout, and safetensors.numpy writes
    # an array's raw memory, which would scramble the kernel in the file.
    return np.broadcast_to(kernel, (3, 1, _ANTI_ALIAS_TAPS, _ANTI_ALIAS_TAPS)).astype(np.float32, order="C")


def synthetic_tensor(key: str, shape: tuple[int, ...], shapes: dict[str, tuple[int, ...]] | None = None) -> np.ndarray:
    """The synthetic value of one tensor (float32, or int64 for BatchNorm's num_batches_tracked).

    ``shapes`` maps every key of the file to its shape; only ``weight_v`` needs it (it is derived from the
    synthetic ``weight_orig`` and ``weight_u`` of the same layer).
    """
    shape = tuple(int(s) for s in shape)
    name = key.rsplit(".", 1)[-1]
    if name == "num_batches_tracked":
        return np.zeros(shape, dtype=np.int64)
    if key.endswith("down.weight") and shape == (3, 1, _ANTI_ALIAS_TAPS, _ANTI_ALIAS_TAPS):
        return _anti_alias_kernel()
    if name == "weight_v":
        # Spectral norm's right singular vector estimate: v = normalise(W^T u), from the float32 W and u.
        stem = key[: -len("_v")]
        weight = synthetic_tensor(stem + "_orig", shapes[stem + "_orig"]).astype(np.float64)
        u = synthetic_tensor(stem + "_u", (weight.shape[0],)).astype(np.float64)
        v = weight.reshape(weight.shape[0], -1).T @ u
        return (v / np.linalg.norm(v)).astype(np.float32)
    rng = _rng_for(key)
    if name == "running_mean":
        values = 0.1 * rng.standard_normal(shape)
    elif name == "running_var":
        values = 1.0 + 0.1 * rng.random(shape)
    elif name == "weight_u":
        values = rng.standard_normal(shape)
        values = values / np.linalg.norm(values)
    elif name == "classbias":
        values = rng.standard_normal(shape)
    elif name == "bias":
        values = 0.02 * rng.standard_normal(shape)
    elif name == "weight" and len(shape) == 1:  # affine weight of a normalisation layer
        values = 1.0 + 0.1 * rng.standard_normal(shape)
    else:  # conv / linear / transposed-conv weights and spectral-norm weight_orig
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        values = _GAINS.get(key, 1.0) * rng.standard_normal(shape) / np.sqrt(fan_in)
    return values.astype(np.float32)


@lru_cache(maxsize=1)
def manifest() -> dict:
    with open(MANIFEST_PATH, encoding="utf-8") as f:
        return json.load(f)


def file_spec(file_name: str) -> list[tuple[str, tuple[int, ...], str | None]]:
    """[(key as stored, shape, container section or None)] of an official file, in manifest order."""
    entry = manifest()["files"][file_name]
    return [(t["key"], tuple(t["shape"]), t.get("section")) for t in entry["tensors"]]


def synthetic_state(spec: list[tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    """{key: array} for (key, shape) pairs, keys used verbatim as the recipe's key strings."""
    shapes = {key: tuple(shape) for key, shape in spec}
    return {key: synthetic_tensor(key, shape, shapes) for key, shape in spec}


def write_safetensors_checkpoint(path: str, file_name: str = "SadTalker_V0.0.2_256.safetensors") -> str:
    """Write a synthetic ``SadTalker_V0.0.2_{256,512}.safetensors`` with the official keys, shapes and dtypes."""
    from safetensors.numpy import save_file

    state = synthetic_state([(key, shape) for key, shape, _ in file_spec(file_name)])
    # save_file writes raw memory: every array in C order (copy() keeps 0-d num_batches_tracked 0-d)
    state = {key: value if value.flags.c_contiguous else value.copy(order="C") for key, value in state.items()}
    _atomic(path, lambda tmp: save_file(state, tmp))
    return path


def write_mapping_checkpoint(path: str, file_name: str) -> str:
    """Write a synthetic ``mapping_00229-model.pth.tar`` / ``mapping_00109-model.pth.tar`` ({'mapping': ..., 'epoch'})."""
    import torch

    state = synthetic_state([(key, shape) for key, shape, _ in file_spec(file_name)])
    payload = {"mapping": {k: torch.from_numpy(v) for k, v in state.items()}, "epoch": 0}
    _atomic(path, lambda tmp: torch.save(payload, tmp))
    return path


def write_legacy_facevid2vid_checkpoint(path: str) -> str:
    """Write a synthetic legacy ``facevid2vid_00189-model.pth.tar`` (generator / kp_detector / he_estimator dicts).

    Key strings of the recipe are the safetensors names (``kp_extractor.`` / ``generator.`` prefixes) and
    ``he_estimator.`` + bare key, so the weights equal those of the safetensors file.
    """
    import torch

    recipe_prefix = {"generator": "generator.", "kp_detector": "kp_extractor.", "he_estimator": "he_estimator."}
    sections: dict[str, dict] = {name: {} for name in recipe_prefix}
    spec = file_spec("facevid2vid_00189-model.pth.tar")
    full = synthetic_state([(recipe_prefix[section] + key, shape) for key, shape, section in spec])
    for key, _, section in spec:
        sections[section][key] = torch.from_numpy(full[recipe_prefix[section] + key])
    _atomic(path, lambda tmp: torch.save({**sections, "epoch": 0}, tmp))
    return path


def write_official_layout(directory: str, sizes: tuple[int, ...] = (256,), legacy: bool = False) -> str:
    """Write synthetic versions of the official checkpoint files into ``directory`` (skipping files already there)."""
    os.makedirs(directory, exist_ok=True)
    for size in sizes:
        name = f"SadTalker_V0.0.2_{size}.safetensors"
        if not os.path.exists(os.path.join(directory, name)):
            write_safetensors_checkpoint(os.path.join(directory, name), name)
    for name in ("mapping_00229-model.pth.tar", "mapping_00109-model.pth.tar"):
        if not os.path.exists(os.path.join(directory, name)):
            write_mapping_checkpoint(os.path.join(directory, name), name)
    if legacy and not os.path.exists(os.path.join(directory, "facevid2vid_00189-model.pth.tar")):
        write_legacy_facevid2vid_checkpoint(os.path.join(directory, "facevid2vid_00189-model.pth.tar"))
    return directory


def _atomic(path: str, write) -> None:
    tmp = path + ".partial"
    write(tmp)
    os.replace(tmp, path)
