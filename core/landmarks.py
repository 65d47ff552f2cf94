"""Face box and 68 facial landmarks (iBUG 300-W convention, x/y in pixels), loaded once per process.

Two backends with the same 68-point convention:

* ``dlib``: the HOG face detector plus the 68-point shape predictor shipped by the ``face-recognition-models``
  wheel. Works offline on a fresh install; the default.
* ``face_alignment``: S3FD + 2DFAN4 from the ``face-alignment`` package, used when their weights
  (``s3fd-*.pth``, ``2DFAN4-*.pth.tar``) are already on disk. Nothing is ever downloaded.

Faces are searched on a downscaled copy (HOG on a 2048 px photo takes over a second) and the landmarks are then
fitted on the full-resolution image. The largest confident face wins. A small cache keyed on the image content
lets the idle animation and the engine share one detection of the same upload.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.util
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from .errors import CheckpointError, NoFaceError

Backend = Literal["auto", "dlib", "face_alignment"]

NUM_LANDMARKS = 68
# Long side of the copies the face is searched on, smallest first: a portrait's face is found on the first,
# a small face in a big group photo on a later one. Each step costs about 4x the previous one.
SEARCH_SIDES = (400, 800, 1600)
MIN_FACE_PX = 40  # below this (in the original image) landmarks are too coarse to animate
# A detection this much weaker (HOG margin) than the best one is treated as a false positive, even if larger.
SCORE_MARGIN = 1.0

NO_FACE_HINT = ("Use a frontal, well-lit photo where the face is at least about 80 pixels wide, "
                "not covered (hands, masks, strong shadows) and not turned far to the side.")


@dataclass(frozen=True)
class Face:
    """One detected face in the coordinates of the image it was detected on."""

    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) pixels
    points: np.ndarray  # (68, 2) float32, (x, y) pixels; read-only
    backend: str  # "dlib" or "face_alignment"

    def scaled(self, factor: float) -> "Face":
        """The same face in an image resized by ``factor``."""
        box = tuple(float(v) * factor for v in self.box)
        return Face(box=box, points=_frozen(self.points * factor), backend=self.backend)


def face_recognition_models_dir() -> str:
    """Folder with dlib's .dat models from the ``face-recognition-models`` wheel (importing it needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("The 68-point landmark model is missing: pip install face-recognition-models==0.3.0")
    return os.path.join(list(spec.submodule_search_locations)[0], "models")


def find_face_alignment_weights(weights_dir: str | None = None) -> tuple[str, str] | None:
    """(2DFAN4 path, s3fd path) if both are on disk in ``weights_dir`` or torch's hub cache, else None."""
    folders = [weights_dir] if weights_dir else []
    folders.append(os.path.join(_torch_hub_dir(), "checkpoints"))
    for folder in folders:
        fan = sorted(glob.glob(os.path.join(folder, "2DFAN4-*.pth.tar")))
        s3fd = sorted(glob.glob(os.path.join(folder, "s3fd-*.pth")))
        if fan and s3fd:
            return fan[-1], s3fd[-1]
    return None


def _torch_hub_dir() -> str:
    """torch.hub.get_dir() without importing torch (slow) when nothing has imported it yet."""
    import sys

    if "torch" in sys.modules:
        return sys.modules["torch"].hub.get_dir()
    if os.environ.get("TORCH_HOME"):
        return os.path.join(os.path.expanduser(os.environ["TORCH_HOME"]), "hub")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "torch", "hub")


class LandmarkDetector:
    """Finds the largest face and its 68 landmarks. Thread-safe; construct once and share."""

    def __init__(self, backend: Backend = "auto", weights_dir: str | None = None, cache_size: int = 8):
        if backend not in ("auto", "dlib", "face_alignment"):
            raise ValueError(f"backend must be 'auto', 'dlib' or 'face_alignment', got {backend!r}")
        fa_weights = find_face_alignment_weights(weights_dir) if backend in ("auto", "face_alignment") else None
        if backend == "face_alignment" and fa_weights is None:
            where = weights_dir or os.path.join("$TORCH_HOME", "hub", "checkpoints")
            raise CheckpointError(f"face-alignment weights (2DFAN4-*.pth.tar and s3fd-*.pth) were not found in {where}; "
                                  "put them there or use the dlib backend.")
        self.backend = "face_alignment" if fa_weights is not None else "dlib"
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, Face] = OrderedDict()
        self._cache_size = cache_size
        if self.backend == "dlib":
            import dlib

            models = face_recognition_models_dir()
            self._hog = dlib.get_frontal_face_detector()
            self._predictor = dlib.shape_predictor(os.path.join(models, "shape_predictor_68_face_landmarks.dat"))
            self._dlib = dlib
        else:
            self._fa = _load_face_alignment(*fa_weights)

    def detect(self, rgb: np.ndarray) -> Face:
        """The largest face in ``rgb`` ((H, W, 3) uint8). Raises NoFaceError saying what to try."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}")
        height, width = rgb.shape[:2]
        if min(height, width) < MIN_FACE_PX:
            raise NoFaceError(f"No face found: the image is only {width}x{height} pixels. {NO_FACE_HINT}")
        rgb = np.ascontiguousarray(rgb)
        key = (rgb.shape, hashlib.sha1(memoryview(rgb).cast("B")).digest())
        with self._lock:
            face = self._cache.get(key)
            if face is not None:
                self._cache.move_to_end(key)
                return face
            face = self._detect_dlib(rgb) if self.backend == "dlib" else self._detect_face_alignment(rgb)
            self._cache[key] = face
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return face

    # --- dlib ---------------------------------------------------------------------------------------------------

    def _detect_dlib(self, rgb: np.ndarray) -> Face:
        box = None
        for small, scale in _search_copies(rgb):
            boxes, scores, _ = self._hog.run(small, 0, 0.0)
            box = _pick_face([(b.left(), b.top(), b.right(), b.bottom()) for b in boxes], list(scores), scale)
            if box is not None:
                break
        if box is None:
            raise NoFaceError(f"No face found in the image. {NO_FACE_HINT}")
        x0, y0, x1, y1 = box
        rect = self._dlib.rectangle(int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1)))
        shape = self._predictor(rgb, rect)
        points = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
        return Face(box=box, points=_frozen(points), backend="dlib")

    # --- face-alignment ---------------------------------------------------------------------------------------

    def _detect_face_alignment(self, rgb: np.ndarray) -> Face:
        box = None
        for small, scale in _search_copies(rgb):
            found = self._fa.face_detector.detect_from_image(small.copy())
            box = _pick_face([tuple(b[:4]) for b in found], [float(b[4]) for b in found], scale, margin=None)
            if box is not None:
                break
        if box is None:
            raise NoFaceError(f"No face found in the image. {NO_FACE_HINT}")
        result = self._fa.get_landmarks_from_image(rgb, detected_faces=[np.array(box + (1.0,), dtype=np.float64)])
        if not result:
            raise NoFaceError(f"No face landmarks could be fitted. {NO_FACE_HINT}")
        points = np.asarray(result[0], dtype=np.float32)[:, :2]
        return Face(box=box, points=_frozen(points), backend="face_alignment")


# Where the app looks for face-alignment's weights inside a checkpoint folder (torch hub's layout).
FACE_ALIGNMENT_SUBDIR = os.path.join("hub", "checkpoints")

_shared: dict[str | None, LandmarkDetector] = {}
_shared_lock = threading.Lock()


def shared_detector(checkpoint_dir: str | None = None) -> LandmarkDetector:
    """The process-wide detector (backend "auto") for a checkpoint folder, created on first use.

    Both engines and the idle animation use this one, so a photo's face is detected once (the detector caches by
    image content) and the models load once.
    """
    weights_dir = os.path.join(os.path.abspath(checkpoint_dir), FACE_ALIGNMENT_SUBDIR) if checkpoint_dir else None
    with _shared_lock:
        detector = _shared.get(weights_dir)
        if detector is None:
            detector = _shared[weights_dir] = LandmarkDetector(weights_dir=weights_dir)
        return detector


def _search_copies(rgb: np.ndarray):
    """Yield (image, scale) copies to search faces on, smallest first; scale maps copy pixels to original pixels."""
    long_side = max(rgb.shape[:2])
    for side in SEARCH_SIDES:
        if side >= long_side:
            yield rgb, 1.0
            return
        factor = side / long_side
        size = (max(1, round(rgb.shape[1] * factor)), max(1, round(rgb.shape[0] * factor)))
        yield cv2.resize(rgb, size, interpolation=cv2.INTER_AREA), 1.0 / factor
    # a face that small in a huge photo is not worth a slower full-resolution search


def _pick_face(boxes: list[tuple], scores: list[float], scale: float,
               margin: float | None = SCORE_MARGIN) -> tuple[float, float, float, float] | None:
    """Largest box among the confident ones, in original-image pixels (None if none is big enough)."""
    if not boxes:
        return None
    best = max(scores)
    candidates = [(b, s) for b, s in zip(boxes, scores) if margin is None or s >= best - margin]
    (x0, y0, x1, y1), _ = max(candidates, key=lambda bs: (bs[0][2] - bs[0][0]) * (bs[0][3] - bs[0][1]))
    box = (float(x0) * scale, float(y0) * scale, float(x1) * scale, float(y1) * scale)
    if min(box[2] - box[0], box[3] - box[1]) < MIN_FACE_PX:
        return None
    return box


def _frozen(points: np.ndarray) -> np.ndarray:
    points = np.array(points, dtype=np.float32).reshape(NUM_LANDMARKS, 2)
    points.setflags(write=False)
    return points


_fa_lock = threading.Lock()


def _load_face_alignment(fan_path: str, s3fd_path: str):
    """face_alignment.FaceAlignment on CPU from local files only (its own loader would download by URL)."""
    import face_alignment
    import face_alignment.api as fa_api

    def local_only(url, *args, **kwargs):
        if "2DFAN4" not in url:
            raise CheckpointError(f"face-alignment asked for {url}, which is not installed locally.")
        return fan_path

    with _fa_lock, _patched(fa_api, "load_file_from_url", local_only):
        return face_alignment.FaceAlignment(face_alignment.LandmarksType.TWO_D, device="cpu",
                                            face_detector="sfd", face_detector_kwargs={"path_to_detector": s3fd_path},
                                            compile=False)


@contextlib.contextmanager
def _patched(module, name: str, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)
