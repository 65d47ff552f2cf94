"""The official SadTalker files: check them (size, SHA-256) and download them (resumable, verified).

What is known about each file (release URL, size, checksum, whether the engine needs it) is in
``sadtalker/data/checksums.json``. ``python app.py weights verify|download`` is the command line.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, TextIO

from core.errors import CheckpointError

CHECKSUMS_PATH = os.path.join(os.path.dirname(__file__), "data", "checksums.json")



@dataclass(frozen=True)
class FileFacts:
    name: str
    url: str
    size: int | None  # bytes, None when not recorded
    sha256: str | None  # hex, None when not recorded
    required: bool
    purpose: str = ""


@lru_cache(maxsize=1)
def official_files() -> dict[str, FileFacts]:
    """name -> facts of every official file this project knows (sadtalker/data/checksums.json)."""
    with open(CHECKSUMS_PATH, encoding="utf-8") as f:
        data = json.load(f)["files"]
    return {name: FileFacts(name=name, url=v["url"], size=v.get("size"), sha256=v.get("sha256"),
                            required=bool(v.get("required")), purpose=v.get("purpose", ""))
            for name, v in data.items()}


@dataclass(frozen=True)
class FileStatus:
    name: str
    path: str
    status: str  # "ok", "unverified" (present, nothing recorded to check), "missing", "wrong-size", "bad-checksum"
    size: int | None
    sha256: str | None
    message: str

    @property
    def bad(self) -> bool:
        return self.status in ("wrong-size", "bad-checksum")


def sha256_of(path: str, progress: Callable[[int], None] | None = None, chunk: int = 4 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            if progress:
                progress(len(block))
    return digest.hexdigest()


def verify_file(path: str, facts: FileFacts, progress: Callable[[int], None] | None = None) -> FileStatus:
    """Compare one file's size and SHA-256 with the recorded facts."""
    if not os.path.isfile(path):
        where = "needed" if facts.required else "optional"
        return FileStatus(facts.name, path, "missing", None, None, f"missing ({where}: {facts.purpose})")
    size = os.path.getsize(path)
    if facts.size is not None and size != facts.size:
        hint = "truncated download?" if size < facts.size else "not the official file?"
        return FileStatus(facts.name, path, "wrong-size", size, None,
                          f"WRONG SIZE: {size:,} bytes, expected {facts.size:,} ({hint} download it again)")
    if facts.sha256 is None:
        return FileStatus(facts.name, path, "unverified", size, None,
                          f"present, {size:,} bytes (no checksum recorded, not verified)")
    digest = sha256_of(path, progress)
    if digest != facts.sha256.lower():
        return FileStatus(facts.name, path, "bad-checksum", size, digest,
                          f"BAD CHECKSUM: sha256 {digest[:16]}..., expected {facts.sha256[:16]}... "
                          "(damaged or not the official file; download it again)")
    return FileStatus(facts.name, path, "ok", size, digest, f"OK, {size:,} bytes, sha256 verified")


def verify_dir(directory: str, files: dict[str, FileFacts] | None = None,
               out: TextIO | None = None) -> list[FileStatus]:
    """Check every known file in ``directory``; prints one line per file to ``out`` when given."""
    results = []
    for facts in (files or official_files()).values():
        path = os.path.join(directory, facts.name)
        bar = _ProgressBar(f"hashing {facts.name}", os.path.getsize(path), out) if (
            out is not None and os.path.isfile(path) and facts.sha256) else None
        status = verify_file(path, facts, bar.advance if bar else None)
        if bar:
            bar.clear()
        if out is not None:
            print(f"{facts.name:36s} {status.message}", file=out, flush=True)
        results.append(status)
    return results


# ----------------------------------------------------------------------------------------------------------------
# Download
# ----------------------------------------------------------------------------------------------------------------

class _ProgressBar:
    """A progress bar on a text stream: redrawn in place on a terminal, one line every few seconds in a log."""

    def __init__(self, label: str, total: int | None, out: TextIO | None, start: int = 0):
        self.label, self.total, self.out, self.done = label, total, out, start
        self.started, self.start_bytes = time.monotonic(), start
        self.last_draw = self.started  # first redraw after one interval: quick jobs print nothing but the end
        self.interactive = bool(out is not None and getattr(out, "isatty", lambda: False)())
        self.interval = 0.2 if self.interactive else 5.0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.out is not None and now - self.last_draw >= self.interval:
            self.last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-6)
        rate = (self.done - self.start_bytes) / elapsed
        mb = self.done / 1e6
        if self.total:
            fraction = min(self.done / self.total, 1.0)
            filled = int(fraction * 30)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            eta_text = f"{eta:4.0f}s" if math.isfinite(eta) else "   ?s"
            line = (f"{self.label} [{'#' * filled}{'.' * (30 - filled)}] {fraction * 100:5.1f}% "
                    f"{mb:7.1f}/{self.total / 1e6:.1f} MB {rate / 1e6:6.2f} MB/s ETA {eta_text}")
        else:
            line = f"{self.label} {mb:7.1f} MB {rate / 1e6:6.2f} MB/s"
        self.out.write("\r" + line if self.interactive else line + "\n")
        self.out.flush()

    def finish(self) -> None:
        if self.out is not None:
            self._draw(time.monotonic())
            if self.interactive:
                self.out.write("\n")
            self.out.flush()

    def clear(self) -> None:
        """Remove an in-place bar (a terminal) before the next line is printed."""
        if self.out is not None and self.interactive and self.last_draw > self.started:
            self.out.write("\r" + " " * 110 + "\r")
            self.out.flush()


class _Interrupted(Exception):
    """The transfer stopped early; the .partial file keeps what arrived."""


def _fetch_into(url: str, partial: str, facts: FileFacts, out: TextIO | None, timeout: float) -> None:
    """Download (the rest of) ``url`` into ``partial``, resuming from its current size with an HTTP Range request."""
    have = os.path.getsize(partial) if os.path.exists(partial) else 0
    if facts.size is not None and have > facts.size:
        os.remove(partial)
        have = 0
    if facts.size is not None and have == facts.size:
        return  # complete already; the caller verifies it
    headers = {"User-Agent": "sadtalker-live-checkpoints/1"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left after our offset: the partial file is already complete
            return
        raise CheckpointError(f"Downloading {facts.name} failed: the server answered HTTP {e.code} ({e.reason}) "
                              f"for {url}.") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise CheckpointError(
            f"Could not download {facts.name} from {url}: {reason}. This machine seems to be offline (or the host "
            f"is blocked). Download the file another way, put it in the checkpoint folder and run "
            f"`python app.py weights verify`.") from None
    with response:
        resume = have > 0 and response.status == 206
        if resume:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {have}-"):
                raise CheckpointError(f"Downloading {facts.name}: the server resumed at the wrong offset "
                                      f"({content_range!r}, expected byte {have}); delete {partial} and try again.")
            total_text = content_range.rsplit("/", 1)[-1]
            total = int(total_text) if total_text.isdigit() else None
        else:
            have = 0  # the server sent the whole file (it ignored the Range request, or there was none)
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if facts.size is not None and total is not None and total != facts.size:
            raise CheckpointError(f"Downloading {facts.name}: the server offers {total:,} bytes but the official file "
                                  f"has {facts.size:,}; {url} is not the official file.")
        bar = _ProgressBar(facts.name, total, out, start=have)
        try:
            with open(partial, "ab" if resume else "wb") as f:
                while True:
                    block = response.read(1 << 20)
                    if not block:
                        break
                    f.write(block)
                    bar.advance(len(block))
        except (OSError, ValueError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
            bar.finish()
            raise _Interrupted(str(e) or type(e).__name__) from None
        bar.finish()
        received = os.path.getsize(partial)
        if total is not None and received < total:
            raise _Interrupted(f"connection closed at {received:,} of {total:,} bytes")


def download_file(url: str, directory: str, facts: FileFacts, *, retries: int = 3, timeout: float = 60.0,
                  out: TextIO | None = None, retry_wait_s: float = 1.0) -> str:
    """Download one file into ``directory`` (resumable, verified by size and SHA-256 when they are known).

    The data goes to ``<name>.partial`` first and is renamed only once complete and verified; an interrupted
    transfer is resumed automatically up to ``retries`` times, and by running the download again after that.
    """
    os.makedirs(directory, exist_ok=True)
    final = os.path.join(directory, facts.name)
    partial = final + ".partial"
    for attempt in range(retries + 1):
        try:
            _fetch_into(url, partial, facts, out, timeout)
            break
        except _Interrupted as e:
            done = os.path.getsize(partial) if os.path.exists(partial) else 0
            if attempt == retries:
                raise CheckpointError(f"The download of {facts.name} was interrupted ({e}); {done:,} bytes are kept "
                                      f"in {partial}. Run the same command again to resume.") from None
            if out is not None:
                print(f"{facts.name}: interrupted ({e}); resuming from byte {done:,}", file=out, flush=True)
            time.sleep(retry_wait_s)
    status = verify_file(partial, facts)
    if status.bad:
        os.remove(partial)
        raise CheckpointError(f"The downloaded {facts.name} is not the official file: {status.message}. The bad "
                              f"download was deleted; try again, or fetch {url} another way.")
    os.replace(partial, final)
    return final


def download(directory: str, names: Iterable[str] | None = None, base_url: str | None = None,
             files: dict[str, FileFacts] | None = None, *, retries: int = 3, timeout: float = 60.0,
             out: TextIO | None = None) -> list[str]:
    """Fetch the official files (all known ones by default) that are not already present and verified.

    ``base_url`` replaces the release addresses (a mirror): each file is fetched from ``<base_url>/<name>``.
    """
    catalog = files or official_files()
    selected = list(names) if names else list(catalog)
    unknown = [n for n in selected if n not in catalog]
    if unknown:
        raise CheckpointError(f"Unknown checkpoint file(s): {', '.join(unknown)}. Known: {', '.join(catalog)}.")
    paths = []
    for name in selected:
        facts = catalog[name]
        final = os.path.join(directory, name)
        if os.path.isfile(final):
            status = verify_file(final, facts)
            if not status.bad:
                if out is not None:
                    print(f"{name:36s} already present ({status.message})", file=out, flush=True)
                paths.append(final)
                continue
            if out is not None:
                print(f"{name:36s} present but {status.message}; downloading it again", file=out, flush=True)
            os.remove(final)
        url = f"{base_url.rstrip('/')}/{name}" if base_url else facts.url
        paths.append(download_file(url, directory, facts, retries=retries, timeout=timeout, out=out))
        if out is not None:
            verified = "size and sha256 verified" if facts.sha256 else "no checksum recorded"
            print(f"{name:36s} downloaded ({verified})", file=out, flush=True)
    return paths


def verify_report(directory: str, out: TextIO) -> bool:
    """Check every official file in ``directory``, printing a line each and a verdict; True when nothing is wrong."""
    print(f"Checkpoint folder: {os.path.abspath(directory)}", file=out)
    results = verify_dir(directory, out=out)
    bad = [r for r in results if r.bad]
    missing = [r for r in results if r.status == "missing" and official_files()[r.name].required]
    if bad or missing:
        print(f"{len(bad)} damaged, {len(missing)} required missing: run `python app.py weights download "
              f"--checkpoints {directory}`.", file=out)
        return False
    print("All present files verified.", file=out)
    return True
