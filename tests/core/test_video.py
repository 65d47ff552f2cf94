"""The streaming mp4 writer with the real ffmpeg: nothing exists under the video's name until it is complete."""
from __future__ import annotations

import os

import numpy as np
import pytest

from core.video import Mp4Writer


def frame(level: int) -> np.ndarray:
    return np.full((64, 48, 3), level, np.uint8)


def test_the_video_gets_its_name_only_when_complete(tmp_path):
    path = tmp_path / "video.mp4"
    writer = Mp4Writer(str(path), 48, 64)
    for level in range(0, 250, 10):
        writer.write(frame(level))
    partial = writer.partial_path
    assert os.path.dirname(partial) == str(tmp_path) and os.path.basename(partial).startswith(".")
    assert not path.exists()  # mid-way: only the hidden partial file exists
    assert writer.close() == str(path)
    assert path.stat().st_size > 1000 and not os.path.exists(partial)
    assert os.listdir(tmp_path) == ["video.mp4"]


def test_stopping_mid_way_leaves_nothing_and_keeps_an_older_file_of_that_name(tmp_path):
    path = tmp_path / "out.mp4"
    path.write_bytes(b"the user's earlier video")
    with pytest.raises(KeyError):
        with Mp4Writer(str(path), 48, 64) as writer:
            writer.write(frame(100))
            raise KeyError("stopped")
    assert path.read_bytes() == b"the user's earlier video"
    assert os.listdir(tmp_path) == ["out.mp4"]
