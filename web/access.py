"""Who may use the app, and how many: where it listens, the login of ``--auth``, the token the logged-in page hands
to its viewers, the file handles the live viewers may take, and the folder of this run's uploads.

The rules (``Access.check`` refuses to start otherwise, with a message that says what to add):

* on this computer only (``--host`` 127.0.0.1, ::1 or localhost): no login needed;
* beyond this computer (``--host 0.0.0.0`` or an address of this machine) or with a public ``--share`` link:
  ``--auth USER:PASSWORD`` is required. Gradio asks for it on the page and its API; ``/viewer``, ``/outputs/...``
  and the live stream's WebSocket take the login cookie or the viewer token, a random secret that only the
  logged-in page hands out (in the embedded player and the "Open live viewer" link).
"""
from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import resource
import secrets
import shutil
import tempfile
from dataclasses import dataclass

from core.errors import SadTalkerError

log = logging.getLogger(__name__)

# File handles kept for everything but the live viewers: the page and its API (a browser holds ~6 connections),
# Generate (ffmpeg pipes, its log, the audio decoder, the finished video read back), Python's and Gradio's own.
FILE_HANDLE_RESERVE = 256


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def url_host(host: str) -> str:
    """``host`` as it goes in a URL (IPv6 in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@dataclass(frozen=True)
class Access:
    host: str
    credentials: tuple[str, str] | None = None  # (user, password) of --auth
    token: str | None = None  # the viewer token: set when a login is required

    @classmethod
    def from_flags(cls, host: str, auth: str | None, share: bool, ws_port: int) -> "Access":
        """The access rules of ``app.py serve``; raises SadTalkerError saying what to add when they are unsafe."""
        credentials = parse_auth(auth) if auth else None
        if credentials is None and share:
            raise SadTalkerError(
                "--share publishes the page, its API (/generate) and the finished videos (/outputs/...) on a public "
                "gradio.live link that anyone may find. Add --auth USER:PASSWORD so that visitors must log in.")
        if credentials is None and not is_loopback(host):
            raise SadTalkerError(
                f"--host {host} lets other computers reach the page, its API, the finished videos and the live "
                f"stream (port {ws_port}), and anyone reaching them could use the app. Add --auth USER:PASSWORD so "
                "that they must log in, or keep the app on this computer (--host 127.0.0.1).")
        return cls(host, credentials, secrets.token_urlsafe(32) if credentials else None)

    def exposure(self, port: int, ws_port: int, share: bool) -> list[str]:
        """What the app exposes, for the start-up log: one warning line per thing a user should know."""
        lines = []
        if not is_loopback(self.host):
            where = "every interface" if self.host in ("0.0.0.0", "::", "") else self.host
            lines.append(f"WARNING: listening on {where}: other computers can reach the page and its API "
                         f"(port {port}) and the live stream (port {ws_port}). Everyone must log in (--auth); "
                         "the viewer, the videos and the live stream take the login or the page's viewer token. "
                         "Plain HTTP: the password crosses the network unencrypted, so use a network you trust "
                         "or put the app behind HTTPS.")
        if share:
            lines.append("WARNING: --share publishes the page, its API and the finished videos on a public "
                         "gradio.live link, behind the login of --auth (the live stream stays local).")
        return lines

    def allows(self, app, request) -> bool:
        """May this HTTP request see the viewer or a video: no login needed, the login cookie, or the token."""
        if self.token is None:
            return True
        if secrets.compare_digest(request.query_params.get("token", ""), self.token):
            return True
        return logged_in(app, request)


def parse_auth(value: str) -> tuple[str, str]:
    user, colon, password = value.partition(":")
    if not colon or not user or not password:
        raise SadTalkerError("--auth needs USER:PASSWORD (both non-empty), e.g. --auth ana:correct-horse-battery.")
    return user, password


def logged_in(app, request) -> bool:
    """Whether the request carries the cookie of a Gradio login (Gradio keeps its sessions in ``app.tokens``)."""
    cookie_id = getattr(app, "cookie_id", None)
    tokens = getattr(app, "tokens", None)
    if cookie_id is None or tokens is None:
        return False
    token = (request.cookies.get(f"access-token-{cookie_id}")
             or request.cookies.get(f"access-token-unsecure-{cookie_id}"))
    return token is not None and token in tokens


# ----------------------------------------------------------------------------------------------- connections
def raise_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (Linux starts many at 1024); the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            log.warning("could not raise the open-file limit above %d", soft)
    return soft


def viewer_cap(requested: int, file_limit: int) -> int:
    """At most ``requested`` live viewers, and never so many that the page and Generate run out of file handles."""
    return max(1, min(requested, file_limit - FILE_HANDLE_RESERVE))


# ----------------------------------------------------------------------------------------------- this run's uploads
def upload_cache_dir(outputs_dir: str) -> str:
    """Gradio's cache for this app (uploads, result copies): one folder per outputs folder, so that the next start
    can empty what a killed run left there (the outputs folder's lock says no other app uses it)."""
    base = os.environ.get("GRADIO_TEMP_DIR") or os.path.join(tempfile.gettempdir(), "gradio")
    digest = hashlib.sha256(os.path.abspath(outputs_dir).encode()).hexdigest()[:12]
    return os.path.join(base, f"sadtalker-live-{digest}")


def empty_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
