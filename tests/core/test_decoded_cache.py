"""Decoded uploads are remembered (a click does not decode the photo and the speech again), never served stale."""
from __future__ import annotations

import numpy as np
from PIL import Image

from core.audio import load_audio, write_wav
from core.image import load_image


def test_a_photo_is_decoded_once_and_again_when_the_file_changes(tmp_path):
    path = tmp_path / "face.png"
    first = np.random.default_rng(1).integers(0, 255, (60, 40, 3), dtype=np.uint8)
    Image.fromarray(first).save(path)
    a, b = load_image(str(path)), load_image(str(path))
    assert np.array_equal(a, first) and np.array_equal(b, first)
    b[:] = 0  # each caller has its own copy
    assert np.array_equal(load_image(str(path)), first)
    second = 255 - first
    Image.fromarray(second).save(path)
    assert np.array_equal(load_image(str(path)), second)


def test_speech_is_decoded_once_per_limit_and_again_when_the_file_changes(tmp_path):
    path = tmp_path / "speech.wav"
    t = np.arange(16000 * 3) / 16000
    write_wav(str(path), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32))
    a = load_audio(str(path), max_seconds=300)
    a[:] = 0  # a copy
    b = load_audio(str(path), max_seconds=10)  # a lower limit: the remembered decoding serves it
    assert b.size == 48000 and np.abs(b).max() > 0.25
    write_wav(str(path), (0.3 * np.sin(2 * np.pi * 220 * t[:32000])).astype(np.float32))
    assert load_audio(str(path), max_seconds=300).size == 32000


def test_what_is_remembered_is_bounded_by_count_and_bytes():
    from core.remembered import Remembered

    memory = Remembered(items=3, max_bytes=100)
    for key in "abcd":
        memory.put(key, key.upper(), 10)
    assert memory.get("a") is None and memory.get("d") == "D"  # the oldest went at the fourth
    memory.get("b")  # used: the newest but one now
    memory.put("big", "BIG", 85)  # c goes for the count, d for the bytes (105 > 100)
    assert memory.get("big") == "BIG" and memory.get("b") == "B"
    assert memory.get("c") is None and memory.get("d") is None
    memory.put("huge", "HUGE", 500)  # larger than the bound: the newest is kept alone
    assert memory.get("huge") == "HUGE" and memory.get("big") is None
