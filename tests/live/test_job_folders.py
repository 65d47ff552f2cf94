"""The outputs folder: one app at a time, unfinished job folders removed at start-up, old ones pruned."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

from core.audio import write_wav
from core.errors import SadTalkerError
from live.job_folders import JobFolders
from live.studio import Studio, new_job_id
from support.paths import EXAMPLE_IMAGE


def job_folder(outputs, name: str, finished: bool, age_h: float = 0.0):
    folder = outputs / name
    folder.mkdir(parents=True)
    if finished:
        video = folder / "video.mp4"
        video.write_bytes(b"mp4")
        then = time.time() - age_h * 3600
        os.utime(video, (then, then))
    else:
        (folder / ".video.partial-1a2b3c4d.mp4").write_bytes(b"half")
    return folder


def test_job_ids_are_unguessable():
    ids = {new_job_id() for _ in range(1000)}
    assert len(ids) == 1000
    random_part = next(iter(ids)).rsplit("-", 1)[1]
    assert len(random_part) == 32 and int(random_part, 16) >= 0  # 128 random bits


def test_start_up_removes_unfinished_job_folders_and_nothing_else(tmp_path):
    done = job_folder(tmp_path, "20250101-120000-" + "a" * 32, finished=True)
    killed = job_folder(tmp_path, "20250101-120500-" + "b" * 32, finished=False)
    old_style = job_folder(tmp_path, "20240101-120500-abcdef", finished=False)
    mine = tmp_path / "my holiday videos"  # not a job folder: never touched
    mine.mkdir()
    (tmp_path / "notes.txt").write_text("keep")
    removed = JobFolders(str(tmp_path)).remove_incomplete()
    assert sorted(removed) == sorted([killed.name, old_style.name])
    assert done.exists() and mine.exists() and (tmp_path / "notes.txt").exists()
    assert not killed.exists() and not old_style.exists()


def test_pruning_keeps_the_newest_jobs_and_drops_old_ones(tmp_path):
    names = [job_folder(tmp_path, f"2025010{i}-120000-" + f"{i}" * 32, True, age_h=10 - i).name for i in range(1, 6)]
    running = job_folder(tmp_path, "20250109-120000-" + "f" * 32, finished=False)
    assert sorted(JobFolders(str(tmp_path), keep_jobs=3, keep_hours=None).prune()) == names[:2]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != running.name) == names[2:]
    assert running.exists()  # no video yet: a running job, not pruned
    assert JobFolders(str(tmp_path), keep_jobs=None, keep_hours=6.5).prune() == [names[2]]  # 7 h old
    assert JobFolders(str(tmp_path), keep_jobs=0, keep_hours=0).prune() == []  # 0: no limit
    with pytest.raises(SadTalkerError, match="0 \\(no limit\\) or more"):
        JobFolders(str(tmp_path), keep_jobs=-1)


def test_a_second_app_may_not_use_the_same_outputs_folder(tmp_path):
    first = JobFolders(str(tmp_path)).claim()
    with pytest.raises(SadTalkerError, match=f"pid {os.getpid()}.*--outputs"):
        JobFolders(str(tmp_path)).claim()
    first.release()
    JobFolders(str(tmp_path)).claim().release()


def test_the_studio_prunes_after_each_job(tmp_path):
    outputs = tmp_path / "outputs"
    for i in range(3):
        job_folder(outputs, f"2025010{i}-120000-" + f"{i}" * 32, True, age_h=3 - i)
    speech = tmp_path / "speech.wav"
    write_wav(str(speech), (0.2 * np.sin(np.arange(int(1.2 * 16000)) / 9)).astype(np.float32))
    studio = Studio(None, outputs_dir=str(outputs), checkpoint_dir=str(tmp_path / "no-weights"),
                    folders=JobFolders(str(outputs), keep_jobs=2, keep_hours=None))
    job = studio.start(str(EXAMPLE_IMAGE), str(speech))
    assert job.wait(120) and job.snapshot().state == "done"
    assert sorted(p.name for p in outputs.iterdir() if not p.name.startswith(".")) == sorted(
        ["20250102-120000-" + "2" * 32, job.id])
