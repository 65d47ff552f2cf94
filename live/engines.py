"""Which engine runs a generation, and why; engines (and the landmark detector) load once per process.

``auto`` picks the SadTalker engine when its official weights are in the checkpoint folder (the same finder the
pipeline loads them with), otherwise the weight-free Lite engine. The reason is a sentence for the engine line.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Literal

from core.engine import Engine
from core.errors import CheckpointError, InputError
from core.landmarks import shared_detector
from sadtalker.checkpoints import find_checkpoints, installed_sizes

log = logging.getLogger(__name__)

EngineName = Literal["lite", "sadtalker"]
ENGINE_CHOICES: tuple[str, ...] = ("auto", "lite", "sadtalker")


@dataclass(frozen=True)
class EngineChoice:
    name: EngineName
    reason: str  # one line for the UI, e.g. "Lite — no SadTalker weights in checkpoints/, see README"
    honours_sadtalker_options: bool  # preprocess, still, pose style, ... (the Lite engine ignores them)


def choose_engine(requested: str, checkpoint_dir: str) -> EngineChoice:
    """Resolve ``auto|lite|sadtalker`` to the engine that will run; raise InputError if it cannot."""
    if requested not in ENGINE_CHOICES:
        raise InputError(f"engine must be one of {', '.join(ENGINE_CHOICES)} (got {requested!r}).")
    if requested == "lite":
        return EngineChoice("lite", "Lite — chosen explicitly (weight-free animator; SadTalker options do not apply)",
                            False)
    folder = _display_dir(checkpoint_dir)
    sizes = installed_sizes(checkpoint_dir)
    if sizes:
        detail = "" if sizes == (256, 512) else f" ({' and '.join(map(str, sizes))} only)"
        return EngineChoice("sadtalker", f"SadTalker — official weights found in {folder}{detail}", True)
    try:
        find_checkpoints(checkpoint_dir, 256)
    except CheckpointError as exc:
        problem = str(exc)
    else:  # pragma: no cover - installed_sizes would have found 256
        problem = ""
    if any(_is_official_file(name) for name in _listing(checkpoint_dir)):
        unavailable = f"SadTalker weights incomplete in {folder} ({problem.rstrip('.')})"
    else:
        unavailable = f"no SadTalker weights in {folder}, see README"
    if requested == "sadtalker":
        raise InputError(f"The SadTalker engine cannot run: {unavailable}. "
                         "Add the official weights (checkpoints/README.md) or choose the lite engine.")
    return EngineChoice("lite", f"Lite — {unavailable}", False)


_engines: dict[tuple[str, str, str, str], Engine] = {}
_engines_lock = threading.Lock()
DTYPE_CHOICES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
_dtype = "auto"  # the SadTalker renderer's precision in this process (app.py --dtype)


def set_dtype(dtype: str) -> None:
    """The SadTalker renderer's precision for engines loaded from now on: ``auto`` (float16 on a GPU, float32 on a
    CPU), ``float32`` (faithful to the official code), or ``bfloat16`` / ``float16`` (faster convolutions, about a
    grey level of difference on average; bfloat16 needs a CPU with bf16 instructions, else float32 runs)."""
    global _dtype
    if dtype not in DTYPE_CHOICES:
        raise InputError(f"dtype must be one of {', '.join(DTYPE_CHOICES)} (got {dtype!r}).")
    _dtype = dtype


def load_engine(name: EngineName, checkpoint_dir: str, device: str = "cpu") -> Engine:
    """The process-wide instance of an engine (models load on the first call only). Both engines share the
    landmark detector of ``checkpoint_dir`` with the idle animation (``shared_detector``)."""
    key = (name, os.path.abspath(checkpoint_dir), device, _dtype)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            log.info("loading the %s engine", name)
            detector = shared_detector(checkpoint_dir)
            if name == "lite":
                from preview.lite import LiteEngine

                engine = LiteEngine(detector)
            else:
                from sadtalker.pipeline import SadTalkerPipeline

                import torch

                dtype = None if _dtype == "auto" else getattr(torch, _dtype)
                engine = SadTalkerPipeline.from_checkpoints(checkpoint_dir, device=device, dtype=dtype,
                                                            detector=detector)
            _engines[key] = engine
        return engine


def _listing(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _is_official_file(name: str) -> bool:
    return name.startswith(("SadTalker_V0.0.2_", "mapping_0", "facevid2vid_", "auido2", "epoch_20"))


def _display_dir(path: str) -> str:
    shown = os.path.relpath(path) if not os.path.isabs(path) or path.startswith(os.getcwd()) else path
    return shown.rstrip("/") + "/"
