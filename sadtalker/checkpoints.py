"""Official SadTalker checkpoint files: find them, load them strictly into our networks, verify and download them.

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
file and what was expected.

Command line::

    python -m sadtalker.checkpoints verify   [--dir D]
    python -m sadtalker.checkpoints download [--dir D] [--base-url U] [--files NAME ...]
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import http.client
import json
import math
import os
import struct
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Collection, Iterable, TextIO

from .errors import CheckpointError, SadTalkerError

if TYPE_CHECKING:  # torch is imported only when networks are loaded, so `verify` / `download` start instantly
    import torch
    from torch import nn

DEFAULT_CHECKPOINT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints")
CHECKSUMS_PATH = os.path.join(os.path.dirname(__file__), "data", "checksums.json")

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

_DOWNLOAD_HINT = "run `python -m sadtalker.checkpoints download --dir {dir}` (or see checkpoints/README.md)"


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

    def mapping_for(self, preprocess: str) -> nn.Module:
        """The MappingNet the official code uses for a preprocess mode ('full' modes: 73 coefficients)."""
        net = self.mapping_still if "full" in preprocess else self.mapping_crop
        if net is None:
            raise CheckpointError(f"The MappingNet for preprocess {preprocess!r} was not loaded.")
        return net


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


# ----------------------------------------------------------------------------------------------------------------
# Verify
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FileFacts:
    name: str
    url: str
    size: int | None  # bytes, None when not recorded
    sha256: str | None  # hex, None when not recorded
    required: bool
    purpose: str = ""


@lru_cache(maxsize=1)
def official_files() -> dict[str, FileFacts]:
    """name -> facts of every official file this project knows (sadtalker/data/checksums.json)."""
    with open(CHECKSUMS_PATH, encoding="utf-8") as f:
        data = json.load(f)["files"]
    return {name: FileFacts(name=name, url=v["url"], size=v.get("size"), sha256=v.get("sha256"),
                            required=bool(v.get("required")), purpose=v.get("purpose", ""))
            for name, v in data.items()}


@dataclass(frozen=True)
class FileStatus:
    name: str
    path: str
    status: str  # "ok", "unverified" (present, nothing recorded to check), "missing", "wrong-size", "bad-checksum"
    size: int | None
    sha256: str | None
    message: str

    @property
    def bad(self) -> bool:
        return self.status in ("wrong-size", "bad-checksum")


def sha256_of(path: str, progress: Callable[[int], None] | None = None, chunk: int = 4 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            if progress:
                progress(len(block))
    return digest.hexdigest()


def verify_file(path: str, facts: FileFacts, progress: Callable[[int], None] | None = None) -> FileStatus:
    """Compare one file's size and SHA-256 with the recorded facts."""
    if not os.path.isfile(path):
        where = "needed" if facts.required else "optional"
        return FileStatus(facts.name, path, "missing", None, None, f"missing ({where}: {facts.purpose})")
    size = os.path.getsize(path)
    if facts.size is not None and size != facts.size:
        hint = "truncated download?" if size < facts.size else "not the official file?"
        return FileStatus(facts.name, path, "wrong-size", size, None,
                          f"WRONG SIZE: {size:,} bytes, expected {facts.size:,} ({hint} download it again)")
    if facts.sha256 is None:
        return FileStatus(facts.name, path, "unverified", size, None,
                          f"present, {size:,} bytes (no checksum recorded, not verified)")
    digest = sha256_of(path, progress)
    if digest != facts.sha256.lower():
        return FileStatus(facts.name, path, "bad-checksum", size, digest,
                          f"BAD CHECKSUM: sha256 {digest[:16]}..., expected {facts.sha256[:16]}... "
                          "(damaged or not the official file; download it again)")
    return FileStatus(facts.name, path, "ok", size, digest, f"OK, {size:,} bytes, sha256 verified")


def verify_dir(directory: str, files: dict[str, FileFacts] | None = None,
               out: TextIO | None = None) -> list[FileStatus]:
    """Check every known file in ``directory``; prints one line per file to ``out`` when given."""
    results = []
    for facts in (files or official_files()).values():
        path = os.path.join(directory, facts.name)
        bar = _ProgressBar(f"hashing {facts.name}", os.path.getsize(path), out) if (
            out is not None and os.path.isfile(path) and facts.sha256) else None
        status = verify_file(path, facts, bar.advance if bar else None)
        if bar:
            bar.clear()
        if out is not None:
            print(f"{facts.name:36s} {status.message}", file=out, flush=True)
        results.append(status)
    return results


# ----------------------------------------------------------------------------------------------------------------
# Download
# ----------------------------------------------------------------------------------------------------------------

class _ProgressBar:
    """A progress bar on a text stream: redrawn in place on a terminal, one line every few seconds in a log."""

    def __init__(self, label: str, total: int | None, out: TextIO | None, start: int = 0):
        self.label, self.total, self.out, self.done = label, total, out, start
        self.started, self.start_bytes = time.monotonic(), start
        self.last_draw = self.started  # first redraw after one interval: quick jobs print nothing but the end
        self.interactive = bool(out is not None and getattr(out, "isatty", lambda: False)())
        self.interval = 0.2 if self.interactive else 5.0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.out is not None and now - self.last_draw >= self.interval:
            self.last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-6)
        rate = (self.done - self.start_bytes) / elapsed
        mb = self.done / 1e6
        if self.total:
            fraction = min(self.done / self.total, 1.0)
            filled = int(fraction * 30)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            eta_text = f"{eta:4.0f}s" if math.isfinite(eta) else "   ?s"
            line = (f"{self.label} [{'#' * filled}{'.' * (30 - filled)}] {fraction * 100:5.1f}% "
                    f"{mb:7.1f}/{self.total / 1e6:.1f} MB {rate / 1e6:6.2f} MB/s ETA {eta_text}")
        else:
            line = f"{self.label} {mb:7.1f} MB {rate / 1e6:6.2f} MB/s"
        self.out.write("\r" + line if self.interactive else line + "\n")
        self.out.flush()

    def finish(self) -> None:
        if self.out is not None:
            self._draw(time.monotonic())
            if self.interactive:
                self.out.write("\n")
            self.out.flush()

    def clear(self) -> None:
        """Remove an in-place bar (a terminal) before the next line is printed."""
        if self.out is not None and self.interactive and self.last_draw > self.started:
            self.out.write("\r" + " " * 110 + "\r")
            self.out.flush()


class _Interrupted(Exception):
    """The transfer stopped early; the .partial file keeps what arrived."""


def _fetch_into(url: str, partial: str, facts: FileFacts, out: TextIO | None, timeout: float) -> None:
    """Download (the rest of) ``url`` into ``partial``, resuming from its current size with an HTTP Range request."""
    have = os.path.getsize(partial) if os.path.exists(partial) else 0
    if facts.size is not None and have > facts.size:
        os.remove(partial)
        have = 0
    if facts.size is not None and have == facts.size:
        return  # complete already; the caller verifies it
    headers = {"User-Agent": "sadtalker-live-checkpoints/1"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left after our offset: the partial file is already complete
            return
        raise CheckpointError(f"Downloading {facts.name} failed: the server answered HTTP {e.code} ({e.reason}) "
                              f"for {url}.") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise CheckpointError(
            f"Could not download {facts.name} from {url}: {reason}. This machine seems to be offline (or the host "
            f"is blocked). Download the file another way, put it in the checkpoint folder and run "
            f"`python -m sadtalker.checkpoints verify`.") from None
    with response:
        resume = have > 0 and response.status == 206
        if resume:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {have}-"):
                raise CheckpointError(f"Downloading {facts.name}: the server resumed at the wrong offset "
                                      f"({content_range!r}, expected byte {have}); delete {partial} and try again.")
            total_text = content_range.rsplit("/", 1)[-1]
            total = int(total_text) if total_text.isdigit() else None
        else:
            have = 0  # the server sent the whole file (it ignored the Range request, or there was none)
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if facts.size is not None and total is not None and total != facts.size:
            raise CheckpointError(f"Downloading {facts.name}: the server offers {total:,} bytes but the official file "
                                  f"has {facts.size:,}; {url} is not the official file.")
        bar = _ProgressBar(facts.name, total, out, start=have)
        try:
            with open(partial, "ab" if resume else "wb") as f:
                while True:
                    block = response.read(1 << 20)
                    if not block:
                        break
                    f.write(block)
                    bar.advance(len(block))
        except (OSError, ValueError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
            bar.finish()
            raise _Interrupted(str(e) or type(e).__name__) from None
        bar.finish()
        received = os.path.getsize(partial)
        if total is not None and received < total:
            raise _Interrupted(f"connection closed at {received:,} of {total:,} bytes")


def download_file(url: str, directory: str, facts: FileFacts, *, retries: int = 3, timeout: float = 60.0,
                  out: TextIO | None = None, retry_wait_s: float = 1.0) -> str:
    """Download one file into ``directory`` (resumable, verified by size and SHA-256 when they are known).

    The data goes to ``<name>.partial`` first and is renamed only once complete and verified; an interrupted
    transfer is resumed automatically up to ``retries`` times, and by running the download again after that.
    """
    os.makedirs(directory, exist_ok=True)
    final = os.path.join(directory, facts.name)
    partial = final + ".partial"
    for attempt in range(retries + 1):
        try:
            _fetch_into(url, partial, facts, out, timeout)
            break
        except _Interrupted as e:
            done = os.path.getsize(partial) if os.path.exists(partial) else 0
            if attempt == retries:
                raise CheckpointError(f"The download of {facts.name} was interrupted ({e}); {done:,} bytes are kept "
                                      f"in {partial}. Run the same command again to resume.") from None
            if out is not None:
                print(f"{facts.name}: interrupted ({e}); resuming from byte {done:,}", file=out, flush=True)
            time.sleep(retry_wait_s)
    status = verify_file(partial, facts)
    if status.bad:
        os.remove(partial)
        raise CheckpointError(f"The downloaded {facts.name} is not the official file: {status.message}. The bad "
                              f"download was deleted; try again, or fetch {url} another way.")
    os.replace(partial, final)
    return final


def download(directory: str, names: Iterable[str] | None = None, base_url: str | None = None,
             files: dict[str, FileFacts] | None = None, *, retries: int = 3, timeout: float = 60.0,
             out: TextIO | None = None) -> list[str]:
    """Fetch the official files (all known ones by default) that are not already present and verified.

    ``base_url`` replaces the release addresses (a mirror): each file is fetched from ``<base_url>/<name>``.
    """
    catalog = files or official_files()
    selected = list(names) if names else list(catalog)
    unknown = [n for n in selected if n not in catalog]
    if unknown:
        raise CheckpointError(f"Unknown checkpoint file(s): {', '.join(unknown)}. Known: {', '.join(catalog)}.")
    paths = []
    for name in selected:
        facts = catalog[name]
        final = os.path.join(directory, name)
        if os.path.isfile(final):
            status = verify_file(final, facts)
            if not status.bad:
                if out is not None:
                    print(f"{name:36s} already present ({status.message})", file=out, flush=True)
                paths.append(final)
                continue
            if out is not None:
                print(f"{name:36s} present but {status.message}; downloading it again", file=out, flush=True)
            os.remove(final)
        url = f"{base_url.rstrip('/')}/{name}" if base_url else facts.url
        paths.append(download_file(url, directory, facts, retries=retries, timeout=timeout, out=out))
        if out is not None:
            verified = "size and sha256 verified" if facts.sha256 else "no checksum recorded"
            print(f"{name:36s} downloaded ({verified})", file=out, flush=True)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sadtalker.checkpoints",
                                     description="Verify or download the official SadTalker checkpoint files.")
    commands = parser.add_subparsers(dest="command", required=True)
    verify_cmd = commands.add_parser("verify", help="check size and SHA-256 of the files in the checkpoint folder")
    verify_cmd.add_argument("--dir", default=DEFAULT_CHECKPOINT_DIR, help="checkpoint folder (default: %(default)s)")
    download_cmd = commands.add_parser("download", help="download the official files (resumable, verified)")
    download_cmd.add_argument("--dir", default=DEFAULT_CHECKPOINT_DIR, help="checkpoint folder (default: %(default)s)")
    download_cmd.add_argument("--base-url", default=None, help="fetch <BASE_URL>/<file name> instead of the release URLs")
    download_cmd.add_argument("--files", nargs="+", default=None, metavar="NAME",
                              help=f"only these files (default: all of {', '.join(official_files())})")
    download_cmd.add_argument("--retries", type=int, default=3, help="automatic resumes per file (default: 3)")
    download_cmd.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds")
    args = parser.parse_args(argv)
    try:
        if args.command == "verify":
            print(f"Checkpoint folder: {os.path.abspath(args.dir)}")
            results = verify_dir(args.dir, out=sys.stdout)
            bad = [r for r in results if r.bad]
            missing = [r for r in results if r.status == "missing" and official_files()[r.name].required]
            if bad or missing:
                print(f"{len(bad)} damaged, {len(missing)} required missing: run `python -m sadtalker.checkpoints "
                      f"download --dir {args.dir}`.")
                return 1
            print("All present files verified.")
            return 0
        download(args.dir, args.files, args.base_url, retries=args.retries, timeout=args.timeout, out=sys.stderr)
        return 0
    except SadTalkerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume the download.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a command that stopped reading (e.g. `| head`)
        sys.stderr.close()
        return 1


if __name__ == "__main__":
    sys.exit(main())
