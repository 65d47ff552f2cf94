"""3DMM input alignment: the 5-point fit and the no-landmark fallback (the golden case pins the official crop)."""
from __future__ import annotations

import numpy as np

from sadtalker import align


def test_fit_recovers_a_known_scale_and_shift():
    points = 80.0 * align.LM3D_STD[:, :2].astype(np.float64) + np.array([120.0, 130.0])
    scale, tx, ty = align.fit_scale_translation(points)
    assert abs(scale - 80.0) < 1e-3 and abs(tx - 120.0) < 1e-3 and abs(ty - 130.0) < 1e-3


def test_five_points_are_eye_centres_nose_and_mouth_corners():
    lm = np.arange(136, dtype=np.float32).reshape(68, 2)
    five = align.five_points(lm)
    np.testing.assert_array_equal(five[0], (lm[36] + lm[39]) / 2)
    np.testing.assert_array_equal(five[1], (lm[42] + lm[45]) / 2)
    np.testing.assert_array_equal(five[2:], lm[[30, 48, 54]])


def test_no_landmarks_uses_the_standard_face():
    image = np.full((300, 200, 3), 128, np.uint8)
    aligned = align.align_face(image, None)
    assert aligned.image.shape == (224, 224, 3) and aligned.image.dtype == np.uint8
    w, h, s, tx, ty = aligned.trans_params
    assert (w, h) == (200, 300) and s > 0 and 0 < tx < 200 and 0 < ty < 300
    assert aligned.landmarks.shape == (5, 2)


def test_crop_outside_the_image_is_black_and_layout_of_73():
    image = np.full((64, 64, 3), 200, np.uint8)
    lm = np.tile(np.array([[6.0, 6.0]], np.float32), (68, 1))  # a tiny face in the top-left corner
    lm[36:42] = (4.0, 5.0)
    lm[42:48] = (8.0, 5.0)
    lm[48], lm[54] = (4.5, 8.0), (7.5, 8.0)
    aligned = align.align_face(image, lm)
    assert aligned.image.min() == 0 and aligned.image.max() == 200  # the crop reaches beyond the frame: black
    full = np.arange(257, dtype=np.float32)[None]
    coeffs = align.coeff_3dmm(full, aligned.trans_params)
    np.testing.assert_array_equal(coeffs[0, :64], np.arange(80, 144))
    np.testing.assert_array_equal(coeffs[0, 64:70], [224, 225, 226, 254, 255, 256])
    np.testing.assert_array_equal(coeffs[0, 70:], aligned.trans_params[2:])
