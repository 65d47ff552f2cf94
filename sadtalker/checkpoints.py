"""Official SadTalker checkpoint files: find them and load them strictly into our networks.

Files (the official release ``v0.0.2-rc``; sizes and SHA-256 in ``sadtalker/data/checksums.json``):

* ``SadTalker_V0.0.2_256.safetensors`` / ``_512``: one flat dict, sections ``kp_extractor.``, ``generator.``,
  ``audio2exp.``, ``audio2pose.``, ``face_3drecon.`` (the file for the chosen output size is used);
* ``mapping_00229-model.pth.tar`` (70 coefficients: crop / extcrop / resize) and ``mapping_00109-model.pth.tar``
  (73: full / extfull): ``torch.save`` dicts with the MappingNet weights under ``'mapping'``;
* legacy files, used (as the official ``init_path`` does) only when no ``SadTalker_V0.0.2_*.safetensors`` is present:
  ``facevid2vid_00189-model.pth.tar`` (``'generator'``, ``'kp_detector'``, ``'he_estimator'``),
  ``auido2pose_00140-model.pth`` / ``auido2exp_00300-model.pth`` (``'model'``), ``epoch_20.pth`` (``'net_recon'``).
  The head-pose estimator exists only in the legacy facevid2vid file (it is never used to make a video).

Loading is strict: every tensor of our modules must be in the file with the same shape; stored tensors we do not
build are accepted only where listed in ``UNUSED_STORED_PREFIXES``. Any problem raises ``CheckpointError`` naming the
file and what was expected. Checking and downloading the files is ``sadtalker/weights.py``.
"""
from __future__ import annotations

import glob
import json
import math
import os
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Collection, Iterable

from core.errors import CheckpointError

if TYPE_CHECKING:  # torch is imported only when networks are loaded, so `verify` / `download` start instantly
    import torch
    from torch import nn

DEFAULT_CHECKPOINT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints")

MAPPING_CROP_FILE = "mapping_00229-model.pth.tar"  # coeff_nc 70
MAPPING_STILL_FILE = "mapping_00109-model.pth.tar"  # coeff_nc 73
LEGACY_FACEVID_FILE = "facevid2vid_00189-model.pth.tar"
LEGACY_AUDIO2POSE_FILE = "auido2pose_00140-model.pth"  # sic: the official file names say "auido"
LEGACY_AUDIO2EXP_FILE = "auido2exp_00300-model.pth"
LEGACY_RECON_FILE = "epoch_20.pth"

PARTS = ("kp_extractor", "generator", "mapping_crop", "mapping_still", "audio2exp", "audio2pose", "face_recon",
         "he_estimator")

# Tensors stored in the official files that inference never uses; a strict load accepts exactly these extras.
UNUSED_STORED_PREFIXES: dict[str, tuple[str, ...]] = {
    "audio2pose": ("netG.encoder.", "netD_motion."),  # the CVAE encoder and the pose discriminator (training only)
}

# safetensors section prefix of each part (the official converter's module names).
SAFETENSORS_SECTIONS = {"kp_extractor": "kp_extractor.", "generator": "generator.", "audio2exp": "audio2exp.",
                        "audio2pose": "audio2pose.", "face_recon": "face_3drecon."}
# Legacy file and container key of each part.
LEGACY_SECTIONS = {"kp_extractor": (LEGACY_FACEVID_FILE, "kp_detector"),
                   "generator": (LEGACY_FACEVID_FILE, "generator"),
                   "he_estimator": (LEGACY_FACEVID_FILE, "he_estimator"),
                   "audio2pose": (LEGACY_AUDIO2POSE_FILE, "model"),
                   "audio2exp": (LEGACY_AUDIO2EXP_FILE, "model"),
                   "face_recon": (LEGACY_RECON_FILE, "net_recon")}
MAPPING_SECTIONS = {"mapping_crop": (MAPPING_CROP_FILE, "mapping"), "mapping_still": (MAPPING_STILL_FILE, "mapping")}

_DOWNLOAD_HINT = "run `python app.py weights download --checkpoints {dir}` (or see checkpoints/README.md)"


def safetensors_file_name(size: int) -> str:
    return f"SadTalker_V0.0.2_{int(size)}.safetensors"


# ----------------------------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class SadTalkerNetworks:
    """All SadTalker networks, in eval mode with gradients off, loaded once per process.

    A part is None when it was not requested (``load_networks(parts=...)``) or, for ``he_estimator``, when no legacy
    facevid2vid file provides it (it is never needed to make a video).
    """

    kp_extractor: nn.Module | None = None  # KeypointDetector
    generator: nn.Module | None = None  # OcclusionAwareSPADEGenerator
    mapping_crop: nn.Module | None = None  # MappingNet(70): crop / extcrop / resize
    mapping_still: nn.Module | None = None  # MappingNet(73): full / extfull
    audio2exp: nn.Module | None = None  # ExpNet
    audio2pose: nn.Module | None = None  # PoseVAE
    face_recon: nn.Module | None = None  # ReconNet
    he_estimator: nn.Module | None = None  # HeadPoseEstimator (legacy file only)
    size: int = 256
    files: dict[str, str] = field(default_factory=dict)  # part -> file it was loaded from


def _build(part: str) -> nn.Module:
    """A freshly built network of the official configuration (renderer classes imported only when needed)."""
    if part == "kp_extractor":
        from .models.keypoint_detector import KeypointDetector
        return KeypointDetector()
    if part == "generator":
        from .models.generator import OcclusionAwareSPADEGenerator
        return OcclusionAwareSPADEGenerator()
    if part == "mapping_crop":
        from .models.mapping import MappingNet
        return MappingNet(coeff_nc=70)
    if part == "mapping_still":
        from .models.mapping import MappingNet
        return MappingNet(coeff_nc=73)
    if part == "he_estimator":
        from .models.head_pose_estimator import HeadPoseEstimator
        return HeadPoseEstimator()
    if part == "audio2exp":
        from .models.audio2exp import ExpNet
        return ExpNet()
    if part == "audio2pose":
        from .models.audio2pose import PoseVAE
        return PoseVAE()
    if part == "face_recon":
        from .models.face_recon import ReconNet
        return ReconNet()
    raise ValueError(f"unknown network part {part!r}; expected one of {', '.join(PARTS)}")


@dataclass(frozen=True)
class CheckpointLayout:
    """Which file provides which part (see ``find_checkpoints``)."""

    directory: str
    format: str  # "safetensors" or "legacy"
    files: dict[str, str]  # part -> path


def find_checkpoints(checkpoint_dir: str, size: int = 256, parts: Collection[str] = PARTS) -> CheckpointLayout:
    """Locate the files for ``parts`` in ``checkpoint_dir`` (the official rule: safetensors if any, else legacy).

    Raises CheckpointError naming the missing files and how to get them.
    """
    directory = os.path.abspath(checkpoint_dir)
    hint = _DOWNLOAD_HINT.format(dir=checkpoint_dir)
    if not os.path.isdir(directory):
        raise CheckpointError(f"Checkpoint folder {checkpoint_dir!r} does not exist; {hint}.")
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown network parts {sorted(unknown)}; expected some of {', '.join(PARTS)}")

    def path(name: str) -> str:
        return os.path.join(directory, name)

    files: dict[str, str] = {}
    missing: list[str] = []
    safetensors_present = sorted(os.path.basename(p) for p in glob.glob(path("SadTalker_V0.0.2_*.safetensors")))
    main_parts = [p for p in parts if p in SAFETENSORS_SECTIONS]
    if safetensors_present:
        fmt = "safetensors"
        wanted = safetensors_file_name(size)
        if main_parts:
            if wanted not in safetensors_present:
                raise CheckpointError(
                    f"{wanted} is missing from {checkpoint_dir!r} (found {', '.join(safetensors_present)}). It holds the "
                    f"networks for {size}x{size} output; download it ({hint}) or choose another size.")
            files.update({p: path(wanted) for p in main_parts})
        if "he_estimator" in parts and os.path.isfile(path(LEGACY_FACEVID_FILE)):
            files["he_estimator"] = path(LEGACY_FACEVID_FILE)
    else:
        fmt = "legacy"
        legacy_parts = [p for p in parts if p in LEGACY_SECTIONS]
        legacy_files = {LEGACY_SECTIONS[p][0] for p in legacy_parts if p != "he_estimator"}
        if legacy_files and not any(os.path.isfile(path(f)) for f in legacy_files):
            partial = glob.glob(path("*.partial"))
            extra = " (an unfinished download is there: run the download again to resume)" if partial else ""
            raise CheckpointError(
                f"No SadTalker checkpoints in {checkpoint_dir!r}{extra}: expected {safetensors_file_name(size)}, "
                f"{MAPPING_CROP_FILE} and {MAPPING_STILL_FILE}; {hint}.")
        for p in legacy_parts:
            name = LEGACY_SECTIONS[p][0]
            if os.path.isfile(path(name)):
                files[p] = path(name)
            elif p != "he_estimator":
                missing.append(name)
    for p in parts:
        if p in MAPPING_SECTIONS:
            name = MAPPING_SECTIONS[p][0]
            if os.path.isfile(path(name)):
                files[p] = path(name)
            else:
                missing.append(name)
    if missing:
        names = ", ".join(sorted(set(missing)))
        raise CheckpointError(f"Checkpoint file(s) missing from {checkpoint_dir!r}: {names}; {hint}.")
    return CheckpointLayout(directory=directory, format=fmt, files=files)


def installed_sizes(checkpoint_dir: str) -> tuple[int, ...]:
    """Renderer sizes (256, 512) whose files are all in ``checkpoint_dir``: the one rule for "SadTalker is installed"."""
    sizes = []
    for size in (256, 512):
        try:
            find_checkpoints(checkpoint_dir, size)
        except CheckpointError:
            continue
        sizes.append(size)
    return tuple(sizes)


def load_networks(checkpoint_dir: str, size: int = 256, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None, parts: Collection[str] | None = None) -> SadTalkerNetworks:
    """Build every network and load the official weights strictly (see the module docstring).

    ``dtype`` defaults to float32. ``parts`` restricts what is loaded (e.g. only the audio side for a fast first
    step); by default everything, with ``he_estimator`` only when a legacy facevid2vid file is present.
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    wanted = tuple(PARTS if parts is None else parts)
    layout = find_checkpoints(checkpoint_dir, size, wanted)
    if layout.format == "safetensors":
        _reject_unknown_sections(layout, wanted)
    nets = SadTalkerNetworks(size=int(size))
    opened: dict[str, _TensorSource] = {}
    try:
        for part in wanted:
            if part not in layout.files:
                continue  # only the optional head-pose estimator can be absent
            file_path = layout.files[part]
            if file_path not in opened:
                opened[file_path] = _open_source(file_path)
            source = opened[file_path]
            if layout.format == "safetensors" and part in SAFETENSORS_SECTIONS:
                section, label = SAFETENSORS_SECTIONS[part], f"section '{SAFETENSORS_SECTIONS[part]}'"
            elif part in MAPPING_SECTIONS:
                section, label = MAPPING_SECTIONS[part][1] + "/", f"entry '{MAPPING_SECTIONS[part][1]}'"
            else:
                section, label = LEGACY_SECTIONS[part][1] + "/", f"entry '{LEGACY_SECTIONS[part][1]}'"
            _require_section(source, section, file_path, label)
            module = _build(part)
            _load_strict(module, source, section, file_path, label, UNUSED_STORED_PREFIXES.get(part, ()))
            module.to(device=device, dtype=dtype).eval().requires_grad_(False)
            setattr(nets, part, module)
            nets.files[part] = file_path
    finally:
        opened.clear()
    return nets


# --- reading files ----------------------------------------------------------------------------------------------

class _TensorSource:
    """Tensors of one checkpoint file by flat name: safetensors keys, or '<container>/<key>' for torch.save dicts."""

    def __init__(self, path: str, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str],
                 get: Callable[[str], torch.Tensor], containers: Collection[str] = ()):
        self.path, self.shapes, self.dtypes, self.get = path, shapes, dtypes, get
        self.containers = sorted(containers)  # top-level dict entries of a torch.save file


_SAFETENSORS_DTYPES = {"F64": "float", "F32": "float", "F16": "float", "BF16": "float", "I64": "int", "I32": "int",
                       "I16": "int", "I8": "int", "U8": "int", "BOOL": "bool"}
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _file_name(path: str) -> str:
    return os.path.basename(path)


def read_safetensors_header(path: str) -> dict[str, dict]:
    """The tensor table of a safetensors file, after checking the file is complete. Raises CheckpointError."""
    name = _file_name(path)
    actual = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{name} is empty or truncated ({actual} bytes); it is not a complete safetensors "
                                  "file. Delete it and download it again.")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(actual - 8, 100_000_000):
            raise CheckpointError(f"{name} is not a safetensors file (or it is truncated: its header says "
                                  f"{header_len} header bytes, the file has {actual}). Delete it and download it again.")
        try:
            header = json.loads(f.read(header_len).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{name} is not a valid safetensors file (unreadable header: {e}). "
                                  "Delete it and download it again.") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name} is not a valid safetensors file (header is not a table).")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = 0
    for key, info in tensors.items():
        try:
            start, stop = (int(x) for x in info["data_offsets"])
            count = math.prod(int(s) for s in info["shape"])
            item = _DTYPE_SIZES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{name} is not a valid safetensors file (bad entry for {key!r}).") from None
        if stop - start != count * item:
            raise CheckpointError(f"{name} is damaged: tensor {key!r} has {stop - start} bytes for shape "
                                  f"{tuple(info['shape'])}. Delete it and download it again.")
        end = max(end, stop)
    expected = 8 + header_len + end
    if actual < expected:
        raise CheckpointError(f"{name} is truncated: it has {actual:,} bytes but its header describes {expected:,}. "
                              "The download is incomplete; delete it and download it again.")
    return tensors


def _open_safetensors(path: str) -> _TensorSource:
    from safetensors import SafetensorError, safe_open

    table = read_safetensors_header(path)
    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{_file_name(path)} could not be opened as safetensors ({e}).") from None

    def get(key: str) -> torch.Tensor:
        try:
            return handle.get_tensor(key)
        except Exception as e:  # the library's own errors: report them as a damaged file
            raise CheckpointError(f"{_file_name(path)}: tensor {key!r} could not be read ({e}).") from None

    shapes = {k: tuple(int(s) for s in v["shape"]) for k, v in table.items()}
    dtypes = {k: _SAFETENSORS_DTYPES.get(v["dtype"], "other") for k, v in table.items()}
    return _TensorSource(path, shapes, dtypes, get)


def _torch_load(path: str) -> object:
    import torch

    name = _file_name(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # old (non-zip) torch.save format
    except Exception as e:
        text = str(e).strip()
        reason = text.splitlines()[0] if text else type(e).__name__
        if "Unsupported global" in text:
            raise CheckpointError(f"{name} contains Python objects other than tensors and plain data, so it is not an "
                                  "official SadTalker checkpoint (refusing to run code from it). Download the "
                                  "official file again.") from None
        if "Weights only load failed" in text:
            reason = "its data is not a pickled dict of tensors"
        raise CheckpointError(f"{name} is not a readable PyTorch checkpoint ({reason}); the file is truncated, "
                              "damaged or not the right file. Delete it and download it again.") from None


def _open_torch(path: str) -> _TensorSource:
    import torch

    data = _torch_load(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{_file_name(path)} does not hold a dict of state dicts (found {type(data).__name__}); "
                              "it is not an official SadTalker checkpoint.")
    flat: dict[str, torch.Tensor] = {}
    for container, state in data.items():
        if isinstance(state, dict):
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    flat[f"{container}/{key}"] = value
    shapes = {k: tuple(v.shape) for k, v in flat.items()}
    dtypes = {k: ("float" if v.is_floating_point() else "bool" if v.dtype == torch.bool else "int")
              for k, v in flat.items()}
    containers = [str(k) for k, v in data.items() if isinstance(v, dict)]
    return _TensorSource(path, shapes, dtypes, flat.__getitem__, containers)


def _open_source(path: str) -> _TensorSource:
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint file {path!r} is missing.")
    return _open_safetensors(path) if path.endswith(".safetensors") else _open_torch(path)


def _require_section(source: _TensorSource, section: str, path: str, label: str) -> None:
    if not any(k.startswith(section) for k in source.shapes):
        found = f" (it has: {', '.join(source.containers)})" if source.containers else ""
        raise CheckpointError(f"{_file_name(path)} has no {label}{found}; it is not the expected SadTalker "
                              "checkpoint. Download the official file again.")


def _load_strict(module: nn.Module, source: _TensorSource, section: str, path: str, label: str,
                 unused: Iterable[str]) -> None:
    """Copy ``section`` of ``source`` into ``module``: same keys (bar listed unused ones), same shapes."""
    name = _file_name(path)
    expected = module.state_dict()
    stored = {k[len(section):]: k for k in source.shapes if k.startswith(section)}
    unused = tuple(unused)
    missing = [k for k in expected if k not in stored]
    unknown = [k for k in stored if k not in expected and not k.startswith(unused)]
    wrong = [(k, source.shapes[stored[k]], tuple(v.shape)) for k, v in expected.items()
             if k in stored and source.shapes[stored[k]] != tuple(v.shape)]
    wrong_kind = [k for k, v in expected.items() if k in stored and source.dtypes[stored[k]]
                  != ("float" if v.is_floating_point() else "int")]
    if missing or unknown or wrong or wrong_kind:
        problems = []
        if missing:
            problems.append(f"{len(missing)} tensor(s) missing (e.g. {', '.join(missing[:3])})")
        if wrong:
            k, got, want = wrong[0]
            problems.append(f"{len(wrong)} with the wrong shape (e.g. {k}: {got} in the file, {want} expected)")
        if wrong_kind:
            problems.append(f"{len(wrong_kind)} with the wrong data type (e.g. {wrong_kind[0]})")
        if unknown:
            problems.append(f"{len(unknown)} unexpected tensor(s) (e.g. {', '.join(unknown[:3])})")
        raise CheckpointError(f"{name} {label} does not match the official SadTalker network: {'; '.join(problems)}. "
                              "The file is damaged or not the official one; download it again.")
    state = {}
    for key, ref in expected.items():
        tensor = source.get(stored[key])
        state[key] = tensor.to(ref.dtype) if tensor.dtype != ref.dtype else tensor
    module.load_state_dict(state, strict=True)


def _reject_unknown_sections(layout: CheckpointLayout, parts: Collection[str]) -> None:
    """A safetensors file holding tensors outside the five official sections is not the official file."""
    paths = {layout.files[p] for p in parts if p in SAFETENSORS_SECTIONS and p in layout.files}
    prefixes = tuple(SAFETENSORS_SECTIONS.values())
    for path in paths:
        stray = [k for k in read_safetensors_header(path) if not k.startswith(prefixes)]
        if stray:
            raise CheckpointError(f"{_file_name(path)} has {len(stray)} tensor(s) outside the official sections "
                                  f"(e.g. {stray[0]!r}); it is not an official SadTalker file.")
