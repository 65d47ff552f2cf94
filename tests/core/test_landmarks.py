"""Face box + 68 landmarks (sadtalker/landmarks.py) on real images, with the real dlib models."""
from __future__ import annotations

import os

import numpy as np
import pytest
import skimage.data

from support.paths import ROOT as PROJECT_ROOT
from core.errors import CheckpointError, NoFaceError
from core.image import load_image
from core.landmarks import LandmarkDetector

ROOT = str(PROJECT_ROOT)
PORTRAIT = os.path.join(ROOT, "examples", "portrait.png")


@pytest.fixture(scope="module")
def detector() -> LandmarkDetector:
    return LandmarkDetector(backend="dlib")


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    return load_image(PORTRAIT)


def _centres(points: np.ndarray) -> dict[str, np.ndarray]:
    return {"eye_a": points[36:42].mean(0), "eye_b": points[42:48].mean(0), "nose": points[30],
            "mouth": points[48:68].mean(0), "chin": points[8]}


def test_landmarks_on_the_example_portrait_are_where_the_face_is(detector, portrait):
    face = detector.detect(portrait)
    assert face.backend == "dlib"
    assert face.points.shape == (68, 2) and face.points.dtype == np.float32
    c = _centres(face.points)
    # vertical order of the features, and left/right order of the eyes around the nose
    assert max(c["eye_a"][1], c["eye_b"][1]) < c["nose"][1] < c["mouth"][1] < c["chin"][1]
    assert c["eye_a"][0] < c["nose"][0] < c["eye_b"][0]
    x0, y0, x1, y1 = face.box
    for name in ("eye_a", "eye_b", "nose", "mouth"):
        x, y = c[name]
        assert x0 <= x <= x1 and y0 <= y <= y1, f"{name} at {(x, y)} outside the face box {face.box}"
    # the astronaut's face: eye centres ~44 px apart, nose tip near (225, 127) in the 512 px picture
    assert 35 < np.linalg.norm(c["eye_b"] - c["eye_a"]) < 55
    assert abs(c["nose"][0] - 225) < 15 and abs(c["nose"][1] - 127) < 15


def test_big_image_is_searched_downscaled_and_fitted_at_full_resolution(detector, portrait):
    big = np.ascontiguousarray(np.kron(portrait, np.ones((4, 4, 1), dtype=np.uint8)))[:, :, :3]  # 2048 x 2048
    big = np.pad(big, ((0, 952), (0, 1952), (0, 0)), mode="edge")  # 4000 wide, 3000 high
    assert big.shape == (3000, 4000, 3)
    face = detector.detect(big)
    small = detector.detect(portrait)
    # same landmarks, 4x the coordinates (within the predictor's few-pixel jitter at this scale)
    assert np.abs(face.points / 4.0 - small.points).mean() < 3.0


def test_cache_returns_the_same_face_for_the_same_content(detector, portrait):
    first = detector.detect(portrait)
    again = detector.detect(portrait.copy())
    assert again is first
    with pytest.raises(ValueError):
        first.points[0, 0] = 0.0  # cached results cannot be corrupted by a caller
    shifted = np.ascontiguousarray(np.roll(portrait, 7, axis=1))
    moved = detector.detect(shifted)
    assert moved is not first
    assert abs((moved.points[:, 0] - first.points[:, 0]).mean() - 7.0) < 1.5


def test_one_pixel_wide_image_gives_the_clear_error(detector):
    with pytest.raises(NoFaceError, match="80 pixels"):
        detector.detect(np.zeros((600, 1, 3), dtype=np.uint8))


def test_image_without_a_face_gives_the_clear_error(detector):
    with pytest.raises(NoFaceError, match="frontal, well-lit") as info:
        detector.detect(np.ascontiguousarray(skimage.data.coffee()))
    assert "No face" in str(info.value)


def test_face_alignment_without_weights_is_a_checkpoint_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(CheckpointError, match="2DFAN4"):
        LandmarkDetector(backend="face_alignment", weights_dir=str(tmp_path))
    assert LandmarkDetector(backend="auto", weights_dir=str(tmp_path)).backend == "dlib"


def test_face_alignment_loads_local_weights_without_downloading(tmp_path, monkeypatch):
    """Random-initialised networks saved under the official file names are loaded from the folder, not the web.

    (Running them is left out: with random weights the answer is meaningless, and face-alignment's first call
    JIT-compiles for ~20 s.)
    """
    torch = pytest.importorskip("torch")
    from face_alignment.detection.sfd.net_s3fd import s3fd
    from face_alignment.models import FAN

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = tmp_path / "hub" / "checkpoints"
    weights.mkdir(parents=True)
    torch.manual_seed(0)
    fan_state, s3fd_state = FAN(4).state_dict(), s3fd().state_dict()
    torch.save(fan_state, weights / "2DFAN4-cd938726ad.zip.pth.tar")
    torch.save(s3fd_state, weights / "s3fd-619a316812.pth")
    import torch.hub

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    detector = LandmarkDetector(backend="auto", weights_dir=str(weights))
    assert detector.backend == "face_alignment"
    loaded_fan = detector._fa.face_alignment_net.state_dict()
    loaded_s3fd = detector._fa.face_detector.face_detector.state_dict()
    for key in ("conv1.weight", "m0.b1_1.conv1.weight"):
        assert torch.equal(loaded_fan[key], fan_state[key])
    assert torch.equal(loaded_s3fd["conv1_1.weight"], s3fd_state["conv1_1.weight"])
