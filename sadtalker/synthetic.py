"""Synthetic weights in the exact official file layouts (for tests, benchmarks and demos without weights).

Every tensor is a pure function of (seed, key as stored, shape), following the recipe of the reference data
(README "Synthetic weights"): the same recipe the golden vectors were computed with, so networks loaded from these
files through the normal loader must reproduce the golden outputs. The key/shape list of each official file is in
``sadtalker/data/manifest.json``.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import tempfile
import zlib
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

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


# ----------------------------------------------------------------------------------------------------------------
# A cache of synthetic official files under the system temp dir (tests and benchmarks share it)
# ----------------------------------------------------------------------------------------------------------------

FILES_256 = ("SadTalker_V0.0.2_256.safetensors", "mapping_00229-model.pth.tar", "mapping_00109-model.pth.tar")
LEGACY_FACEVID = "facevid2vid_00189-model.pth.tar"


def cache_key() -> str:
    digest = hashlib.sha256()
    for path in (MANIFEST_PATH, __file__):
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def cached_official_layout(legacy: bool = True) -> str:
    """A folder with synthetic SadTalker_V0.0.2_256.safetensors + both mapping files (+ the legacy facevid2vid file,
    the only one with head-pose-estimator weights, when ``legacy``). About 1.5 GB with the legacy file."""
    directory = os.path.join(tempfile.gettempdir(), f"sadtalker-synthetic-checkpoints-{cache_key()}")
    wanted = FILES_256 + ((LEGACY_FACEVID,) if legacy else ())
    if all(os.path.isfile(os.path.join(directory, name)) for name in wanted):
        return directory
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be writing the same files: wait for it
        try:
            write_official_layout(directory, sizes=(256,), legacy=legacy)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return directory


# ----------------------------------------------------------------------------------------------------------------
# Face enhancer weights (GFPGAN v1.4 layout) and a face frame to enhance
# ----------------------------------------------------------------------------------------------------------------

def seeded_state_dict(shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    """Random float32 tensors for the given keys, scaled by fan-in so activations stay finite."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        bound = 1.0 / math.sqrt(max(1, shape[1:].numel())) if len(shape) >= 2 else 0.1
        state[key] = torch.empty(shape).uniform_(-bound, bound, generator=generator) * math.sqrt(3)
    return state


def gfpgan_v14_shapes() -> dict[str, torch.Size]:
    """Key -> shape of GFPGAN v1.4 (GFPGANv1Clean with the hyper-parameters GFPGANer uses for v1.4)."""
    import torch

    from spandrel.architectures.GFPGAN import GFPGAN

    with torch.device("meta"):
        model = GFPGAN(out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None,
                       fix_decoder=False, num_mlp=8, input_is_latent=True, different_w=True, narrow=1, sft_half=True)
    return {key: value.shape for key, value in model.state_dict().items()}


SYNTHETIC_RECIPE = "gfpgan-v14-uniform-fanin-seed14-v1"  # change when the recipe changes


def cached_synthetic_gfpgan() -> str:
    """The synthetic GFPGANv1.4.pth (350 MB), written once into the system temp dir and reused by later runs."""
    import torch

    folder = os.path.join(tempfile.gettempdir(), "sadtalker-test-weights")
    path = os.path.join(folder, f"{SYNTHETIC_RECIPE}.pth")
    if not os.path.isfile(path):
        os.makedirs(folder, exist_ok=True)
        state = seeded_state_dict(gfpgan_v14_shapes(), seed=14)
        partial = f"{path}.{os.getpid()}.partial"
        torch.save({"params_ema": state}, partial)  # the official file's layout: the EMA weights under params_ema
        os.replace(partial, path)
    return path


def synthetic_face_frame(size: int = 256, eye_distance: float = 40.0):
    """A frame with a face-like blob and 68 landmarks whose face covers only the middle of the frame."""
    import cv2

    from .enhancer import FACE_TEMPLATE

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    frame = np.stack([60 + 0.5 * xx, 90 + 0.3 * yy, 140 - 0.2 * xx], axis=2)
    frame += rng.normal(0, 4, frame.shape)
    cx, cy = size / 2, size / 2
    face = ((xx - cx) / (eye_distance * 1.1)) ** 2 + ((yy - cy - 10) / (eye_distance * 1.5)) ** 2 < 1
    frame[face] = (205, 160, 140)
    # the five points in FFHQ proportions (the template scaled to this eye distance), the rest around them
    scale = eye_distance / (FACE_TEMPLATE[1, 0] - FACE_TEMPLATE[0, 0])
    eye_l, eye_r, nose, mouth_l, mouth_r = (FACE_TEMPLATE - FACE_TEMPLATE[2]) * scale + (cx, cy)
    lm = np.zeros((68, 2))
    ring = np.array([[-7, 0], [-3, -3], [3, -3], [7, 0], [3, 3], [-3, 3]], dtype=np.float64)
    lm[36:42], lm[42:48] = eye_l + ring, eye_r + ring
    lm[27:36] = np.linspace(nose - (0, 30), nose, 9)
    lm[30] = nose
    lm[48:68] = np.linspace(mouth_l, mouth_r, 20)
    lm[48], lm[54] = mouth_l, mouth_r
    lm[0:27] = np.stack([cx + np.linspace(-1, 1, 27) * eye_distance * 1.1, cy + np.sin(np.linspace(0, 3, 27)) * 40], 1)
    for (x, y) in (eye_l, eye_r):
        cv2.circle(frame, (int(round(x)), int(round(y))), 5, (40, 30, 30), -1)
    cv2.line(frame, tuple(int(v) for v in lm[48]), tuple(int(v) for v in lm[54]), (120, 40, 50), 3)
    return np.clip(frame, 0, 255).astype(np.uint8), lm
