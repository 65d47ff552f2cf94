"""The outputs folder: one folder per job (``<outputs>/<job>/video.mp4``), owned by one running app.

* A lock file keeps a second app off the same folder (its start-up clean-up would remove the first one's running
  jobs); the lock goes with the process, however it ends.
* At start-up, job folders without a complete video are removed: what a crash, a kill or a power cut left behind
  mid-render (the mp4 gets its name only when complete, see ``core.video.Mp4Writer``).
* Finished job folders beyond the newest ``keep_jobs`` or older than ``keep_hours`` are pruned, at start-up and
  after each job.

Only folders named like a job id are ever touched, so pointing ``--outputs`` at a folder with other things in it
removes none of them.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import time

from core.errors import SadTalkerError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one app per outputs folder is then the user's to keep
    fcntl = None

log = logging.getLogger(__name__)

VIDEO_NAME = "video.mp4"
LOCK_NAME = ".sadtalker-live.lock"
DEFAULT_KEEP_JOBS = 50
DEFAULT_KEEP_HOURS = 24.0
# <date>-<time>-<random hex>: 32 hex digits now, 6 in folders made by older versions
_JOB_FOLDER = re.compile(r"^\d{8}-\d{6}-(?:[0-9a-f]{32}|[0-9a-f]{6})$")


def is_job_folder_name(name: str) -> bool:
    return bool(_JOB_FOLDER.match(name))


class JobFolders:
    def __init__(self, path: str, keep_jobs: int | None = DEFAULT_KEEP_JOBS,
                 keep_hours: float | None = DEFAULT_KEEP_HOURS):
        if (keep_jobs or 0) < 0 or (keep_hours or 0) < 0:
            raise SadTalkerError("--keep-outputs and --keep-hours take 0 (no limit) or more.")
        self.path = os.path.abspath(path)
        self.keep_jobs = keep_jobs or None  # None or 0: no limit
        self.keep_hours = keep_hours or None
        self._lock_file = None

    def claim(self) -> "JobFolders":
        """Take the folder for this process; raises SadTalkerError if another running app has it."""
        os.makedirs(self.path, exist_ok=True)
        if fcntl is None:
            return self
        lock = open(os.path.join(self.path, LOCK_NAME), "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            owner = lock.read().strip() or "another process"
            lock.close()
            raise SadTalkerError(f"Another SadTalker Live ({owner}) uses the outputs folder {self.path}. "
                                 "Stop it, or give this one its own folder with --outputs DIR.") from None
        lock.truncate(0)
        lock.write(f"pid {os.getpid()}")
        lock.flush()
        self._lock_file = lock
        return self

    def release(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing the file releases the lock
            self._lock_file = None

    def remove_incomplete(self) -> list[str]:
        """Remove the job folders without a complete video (only safe while no job runs: at start-up)."""
        removed = []
        for name in self._job_folders():
            if not os.path.isfile(os.path.join(self.path, name, VIDEO_NAME)):
                shutil.rmtree(os.path.join(self.path, name), ignore_errors=True)
                removed.append(name)
        if removed:
            log.info("removed %d unfinished job folder(s) from %s", len(removed), self.path)
        return removed

    def prune(self) -> list[str]:
        """Remove finished job folders beyond the newest ``keep_jobs`` or older than ``keep_hours``."""
        finished = []
        for name in self._job_folders():
            try:
                finished.append((os.stat(os.path.join(self.path, name, VIDEO_NAME)).st_mtime, name))
            except FileNotFoundError:  # running (or removed meanwhile): not ours to prune
                continue
        finished.sort(reverse=True)
        oldest_kept = time.time() - self.keep_hours * 3600 if self.keep_hours else None
        removed = []
        for rank, (mtime, name) in enumerate(finished):
            if (self.keep_jobs and rank >= self.keep_jobs) or (oldest_kept is not None and mtime < oldest_kept):
                shutil.rmtree(os.path.join(self.path, name), ignore_errors=True)
                removed.append(name)
        if removed:
            log.info("pruned %d old job folder(s) from %s", len(removed), self.path)
        return removed

    def _job_folders(self) -> list[str]:
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []
        return [name for name in names if is_job_folder_name(name) and os.path.isdir(os.path.join(self.path, name))]
