"""Which engine runs a generation, and why; engines are loaded once per process and shared by jobs.

``auto`` picks the SadTalker engine when its official weights are in the checkpoint folder, otherwise the
weight-free lite engine. The reason is a sentence for the UI's engine line.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Iterator, Literal, Protocol

import numpy as np

from core.errors import InputError
from core.engine import Event
from core.options import Options

log = logging.getLogger(__name__)

EngineName = Literal["lite", "sadtalker"]
ENGINE_CHOICES: tuple[str, ...] = ("auto", "lite", "sadtalker")

# The official files the SadTalker engine cannot run without (checkpoints/README.md says where to get them).
SADTALKER_REQUIRED = ("SadTalker_V0.0.2_256.safetensors", "mapping_00229-model.pth.tar", "mapping_00109-model.pth.tar")
# Optional: size 512 and the face enhancer.
SADTALKER_OPTIONAL = ("SadTalker_V0.0.2_512.safetensors", "GFPGANv1.4.pth")


class Engine(Protocol):
    name: str

    def generate(self, image: "str | np.ndarray", audio: str, options: Options) -> Iterator[Event]: ...


@dataclass(frozen=True)
class EngineChoice:
    name: EngineName
    reason: str  # one line for the UI, e.g. "Lite — no SadTalker weights in checkpoints/, see README"
    honours_sadtalker_options: bool  # preprocess, still, pose style, ... (the lite engine ignores them)


def missing_sadtalker_files(checkpoint_dir: str) -> list[str]:
    return [name for name in SADTALKER_REQUIRED if not os.path.isfile(os.path.join(checkpoint_dir, name))]


def choose_engine(requested: str, checkpoint_dir: str) -> EngineChoice:
    """Resolve ``auto|lite|sadtalker`` to the engine that will run; raise InputError if it cannot."""
    if requested not in ENGINE_CHOICES:
        raise InputError(f"engine must be one of {', '.join(ENGINE_CHOICES)} (got {requested!r}).")
    folder = _display_dir(checkpoint_dir)
    if requested == "lite":
        return EngineChoice("lite", "Lite — chosen explicitly (weight-free animator; SadTalker options do not apply)",
                            False)
    missing = missing_sadtalker_files(checkpoint_dir)
    unavailable = None
    if missing:
        unavailable = (f"no SadTalker weights in {folder}, see README" if len(missing) == len(SADTALKER_REQUIRED)
                       else f"SadTalker weights incomplete in {folder} (missing {', '.join(missing)}), see README")
    elif not _sadtalker_engine_installed():
        unavailable = "SadTalker weights found, but this build has no SadTalker engine yet"
    if unavailable is None:
        return EngineChoice("sadtalker", f"SadTalker — official weights found in {folder}", True)
    if requested == "sadtalker":
        raise InputError(f"The SadTalker engine cannot run: {unavailable}. "
                         "Add the official weights (checkpoints/README.md) or choose the lite engine.")
    return EngineChoice("lite", f"Lite — {unavailable}", False)


_engines: dict[tuple[str, str, str], Engine] = {}
_engines_lock = threading.Lock()


def load_engine(name: EngineName, checkpoint_dir: str = "checkpoints", device: str = "cpu") -> Engine:
    """The process-wide instance of an engine (models load on the first call only)."""
    key = (name, os.path.abspath(checkpoint_dir), device)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            log.info("loading the %s engine", name)
            engine = _build_lite() if name == "lite" else _build_sadtalker(checkpoint_dir, device)
            _engines[key] = engine
        return engine


def _build_lite() -> Engine:
    from preview.lite import LiteEngine

    return LiteEngine()


def _sadtalker_engine_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("sadtalker.pipeline") is not None


def _build_sadtalker(checkpoint_dir: str, device: str) -> Engine:
    """The seam where the SadTalker engine plugs in: everything else already treats it like the lite engine."""
    if not _sadtalker_engine_installed():
        raise InputError("The SadTalker engine is not part of this build yet; use the lite engine.")
    from sadtalker.pipeline import SadTalkerPipeline

    return SadTalkerPipeline.from_checkpoints(checkpoint_dir, device=device)


def _display_dir(path: str) -> str:
    shown = os.path.relpath(path) if not os.path.isabs(path) or path.startswith(os.getcwd()) else path
    return shown.rstrip("/") + "/"
