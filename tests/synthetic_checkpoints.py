"""Synthetic official-layout checkpoint files for tests, written once into a cache under the system temp dir.

The files are what ``sadtalker.synthetic.write_official_layout`` writes (the recipe the golden vectors were computed
with), so loading them through ``sadtalker.checkpoints.load_networks`` exercises exactly the path a user's real files
take. The cache folder is keyed by a hash of the manifest and of the recipe's source, so a change to either makes a
fresh folder; a file lock keeps parallel test runs from writing the same files at once.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile

import sadtalker.synthetic as synthetic

FILES_256 = ("SadTalker_V0.0.2_256.safetensors", "mapping_00229-model.pth.tar", "mapping_00109-model.pth.tar")
LEGACY_FACEVID = "facevid2vid_00189-model.pth.tar"


def cache_key() -> str:
    digest = hashlib.sha256()
    for path in (synthetic.MANIFEST_PATH, synthetic.__file__):
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def synthetic_checkpoint_dir(legacy: bool = True) -> str:
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
            synthetic.write_official_layout(directory, sizes=(256,), legacy=legacy)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return directory
