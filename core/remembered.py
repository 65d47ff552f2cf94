"""A small memory of recent results (decoded uploads, their analyses), bounded by count and bytes; thread-safe.

The app decodes a photo and a speech clip when they are uploaded; a click then finds them decoded. Results of files
are keyed by ``file_key``: a file changed since is decoded again.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any, Hashable


class Remembered:
    """The last ``items`` values put, at most ``max_bytes`` together (the newest one is always kept)."""

    def __init__(self, items: int, max_bytes: int):
        self.items, self.max_bytes = items, max_bytes
        self._values: "OrderedDict[Hashable, tuple[Any, int]]" = OrderedDict()  # key -> (value, bytes)
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            entry = self._values.get(key)
            if entry is None:
                return None
            self._values.move_to_end(key)
            return entry[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        with self._lock:
            self._values[key] = (value, nbytes)
            self._values.move_to_end(key)
            while len(self._values) > self.items or (
                    len(self._values) > 1 and sum(size for _, size in self._values.values()) > self.max_bytes):
                self._values.popitem(last=False)


def file_key(path) -> tuple | None:
    """What identifies a file's content for remembering: path, size, modification time, inode (None: no file)."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    try:
        info = os.stat(path)
    except OSError:
        return None
    return os.path.realpath(path), info.st_size, info.st_mtime_ns, info.st_ino
