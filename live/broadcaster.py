"""WebSocket broadcaster: every live stream's frames, speech and state to any number of viewer tabs.

The server (``websockets.asyncio.server``) runs its own asyncio loop in a daemon thread; producers publish from any
thread without blocking. Every message is JSON with a ``type`` and the ``job`` (stream id) it belongs to:

* ``hello``    on connect: the job the viewer follows (``null`` if none yet), the protocol version, ``app_port``
* ``clock``    ``now``: the stream's clock at the moment the message is sent (also on every frame and audio message)
* ``status``   ``stage``, ``message``
* ``progress`` ``done``, ``total``, ``eta_s`` (``null`` while unknown), ``stage``
* ``frame``    ``seq``, ``t``, ``now``, ``quality`` (``idle|preview|final``), ``width``, ``height``, ``jpeg`` (base64)
* ``audio``    ``t``, ``now``, ``sample_rate``, ``channels``, ``format`` (``s16le``), ``pcm`` (base64), at most 200 ms
* ``done``     ``video_url``, ``duration_s``, ``engine``, ``num_frames``
* ``error``    ``message``

``t`` is where a frame or a piece of speech sits on the stream's timeline (seconds since the stream started);
speech is sent a little ahead of the frames it belongs to, frames as their time comes (a playing clip's, and a
session's, up to a few ticks before it: a viewer holds them until their time). A viewer follows the latest
stream unless it sends ``{"type": "follow", "job": "<id>"}`` (``"job": null`` goes back to following the latest).

Each frame is JPEG-encoded once, on the broadcaster's encoder thread, whatever the number of viewers. A viewer gets,
per stream and message type, only the newest message that it has not been sent yet — except speech, which is queued
in order (a bounded queue), and frames sent ahead of their time, which wait in order until their time is past
(``STALE_FRAME_S``): a slow viewer skips frames (memory stays bounded) and never slows the producer. A viewer
that joins late is sent the stream's clock, its current status, progress, latest frame and the speech from the
current position on.

Who may connect: a browser only from the app's own origins (plus ``allowed_origins``); a client that sends no
Origin (a script, another service) only from loopback unless a ``token`` is set; with a ``token`` every client must
present it (``?token=``). At most ``max_viewers`` connections; refusals carry a reason.
"""
from __future__ import annotations

import asyncio
import base64
import http
import io
import ipaddress
import json
import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np
from PIL import Image
from websockets.asyncio.connection import broadcast
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from core.options import SAMPLE_RATE

from .clock import StreamClock

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 2
JPEG_QUALITY = 80
MAX_CLIENT_MESSAGE_BYTES = 256 * 1024  # control messages, and speech from a microphone in pieces of <= 1 s
# A viewer whose socket holds more unsent bytes than this is behind: its messages wait in its latest-only slots.
WRITE_BACKLOG_BYTES = 256 * 1024
MAX_REMEMBERED_JOBS = 16  # finished jobs stay joinable (a late viewer still gets their result) up to this many
# A frame this long past its time is of no use to a player (it plays ~0.1 s behind and drops late frames): one that
# waits (for the encoder, or for a slow viewer's socket) is replaced by a newer one. Frames sent ahead of their time
# wait in order, each needed when its time comes.
STALE_FRAME_S = 0.1
MAX_WAITING_FRAMES = 8  # per stream, for the encoder and per viewer (frames go out at most ~0.2 s ahead)
MAX_QUEUED_AUDIO = 40  # speech messages (8 s) a slow viewer may have waiting; older ones are dropped
RECENT_AUDIO = 50  # speech messages kept per stream for viewers that join mid-utterance (those not yet over)
DEFAULT_MAX_VIEWERS = 300
# Message types that describe a job's state; a late joiner is sent the latest of each, in this order.
_SNAPSHOT_ORDER = ("status", "progress", "frame", "done", "error")


def encode_jpeg(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """The same bytes as Pillow's encoder (both are libjpeg-turbo, 4:2:0), but OpenCV's releases the GIL while it
    encodes: with Pillow's, the encoder thread held the GIL for ~30 % of the time that 4 live sessions' frame makers
    needed it, and their frames came late (bench/session.py, concurrency)."""
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"could not encode a frame of shape {rgb.shape} as JPEG")
    return encoded.tobytes()


def _json_with_base64(message: dict, key: str, payload: bytes) -> bytes:
    """``message`` as compact JSON with ``key`` set to ``payload`` in base64, appended as bytes: base64 needs no JSON
    escaping, and letting ``json.dumps`` scan a frame's ~60 kB of it held the GIL for ~7 % of a busy stream's time."""
    head = json.dumps(message, separators=(",", ":")).encode("utf-8")
    return b"".join((head[:-1], b',"', key.encode("ascii"), b'":"', base64.b64encode(payload), b'"}'))


def _stale(t: float, now: float | None) -> bool:
    """A frame at ``t`` whose time is past (without the stream's clock: every frame but the newest)."""
    return now is None or t + STALE_FRAME_S < now


class RateLimitedLog:
    """At most one log line per ``interval_s`` and kind; the lines say how many were folded into them."""

    def __init__(self, logger: logging.Logger, interval_s: float = 1.0):
        self._logger, self._interval = logger, interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, kind: str, message: str, *args) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -1e9) < self._interval:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return
            self._last[kind] = now
            folded = self._suppressed.pop(kind, 0)
        suffix = f" (and {folded} more like it)" if folded else ""
        self._logger.warning(message + suffix, *args)


@dataclass
class _Job:
    clock: StreamClock | None = None
    latest: dict[str, bytes] = field(default_factory=dict)  # message type -> serialized message
    recent_audio: deque = field(default_factory=lambda: deque(maxlen=RECENT_AUDIO))  # (t_end, message bytes)


@dataclass(eq=False)
class _Viewer:
    connection: ServerConnection
    follow: str | None = None  # a job id, or None for "the latest job"
    # (job, type) -> the newest unsent message of that kind; job None = not about a job (hello, pong);
    # speech has one entry per message: (job, "audio", id), frames one per frame still of use: (job, "frame", t)
    pending: "OrderedDict[tuple, bytes]" = field(default_factory=OrderedDict)
    queued_audio: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    sending: bool = False  # the viewer's send task is writing (or waiting for its socket to drain)

    def keeping_up(self) -> bool:
        transport = self.connection.transport
        return (not self.pending and not self.sending and transport is not None and not transport.is_closing()
                and transport.get_write_buffer_size() < WRITE_BACKLOG_BYTES)


class Broadcaster:
    """Start with ``start()`` (returns once the port is bound); publish from any thread; ``stop()`` to shut down."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8765, hello_info: dict | None = None,
                 allowed_origins: set[str] | None = None, token: str | None = None,
                 max_viewers: int = DEFAULT_MAX_VIEWERS, app_port: int | None = None):
        self.host = host
        self.hello_info = dict(hello_info or {})  # extra fields for the hello message (e.g. the app's HTTP port)
        self.port = port  # replaced by the bound port after start() (port 0 = any free port)
        self.allowed_origins = {o.rstrip("/") for o in (allowed_origins or set())}
        self.app_port = app_port  # the page's port: a page served by the app on the host the viewer dialled may watch
        self.token = token
        self.max_viewers = max_viewers
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._viewers: set[_Viewer] = set()
        self._jobs: "OrderedDict[str, _Job]" = OrderedDict()
        self._clocks: dict[str, StreamClock] = {}  # read by producer threads (stamping) and the loop
        self._latest_job: str | None = None
        # Frames waiting for the encoder thread, per job in order: those still of use (see STALE_FRAME_S).
        self._frames_lock = threading.Condition()
        self._frames_waiting: "OrderedDict[str, deque[dict]]" = OrderedDict()
        self._encoder: threading.Thread | None = None
        self._stopping = False
        self._complaints = RateLimitedLog(log)
        self.frames_encoded = 0  # counters for tests and benchmarks
        self.frames_dropped_before_encoding = 0
        self.refused = 0
        # speech sent by a client for a stream (a live session): handler(stream id, 16 kHz float32 samples, final)
        self.speech_handler = None

    # ----------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> "Broadcaster":
        self._thread = threading.Thread(target=self._run_loop, name="broadcaster", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            raise OSError(f"Could not start the live viewer server on {self.host}:{self.port} "
                          f"({self._start_error}). Choose another port with --ws-port.") from self._start_error
        self._encoder = threading.Thread(target=self._run_encoder, name="broadcaster-jpeg", daemon=True)
        self._encoder.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        with self._frames_lock:
            self._frames_lock.notify_all()
        if self._loop is not None and self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._encoder is not None:
            self._encoder.join(timeout=5)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"ws://{host}:{self.port}/"

    @property
    def viewer_count(self) -> int:
        return len(self._viewers)

    def viewers_of(self, job: str) -> int:
        return sum(1 for viewer in list(self._viewers) if self._followed_job(viewer) == job)

    def _run_loop(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(self._loop_exception)
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        # accept() failing for want of file handles repeats on every loop turn: one line a second, with a count
        exc = context.get("exception")
        kind = type(exc).__name__ if exc is not None else "loop"
        self._complaints.warning(f"loop-{kind}", "live viewer server: %s", context.get("message") or exc)

    async def _serve(self) -> None:
        try:
            # No per-message compression: frames are JPEG already, and deflating them once per viewer costs CPU
            # that belongs to generation.
            server = await serve(self._handle, self.host, self.port, compression=None,
                                 max_size=MAX_CLIENT_MESSAGE_BYTES, ping_interval=20, ping_timeout=20,
                                 process_request=self._admit)
        except OSError as exc:
            self._start_error = exc
            self._ready.set()
            return
        self._server = server
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        log.info("live viewer server listening on %s", ", ".join(  # as bound: 0.0.0.0 is every interface
            "%s:%d" % sock.getsockname()[:2] for sock in server.sockets))
        await server.wait_closed()

    # ----------------------------------------------------------------------------------------------- admission
    def _admit(self, connection: ServerConnection, request):
        """Refuse (with a reason) what must not watch: other origins, strangers without the token, too many."""
        reason = self.refusal(request.headers.get("Origin"), _peer_host(connection), _query_token(request.path),
                              request.headers.get("Host"))
        if reason is None and len(self._viewers) >= self.max_viewers:
            reason = f"The live viewer is full ({self.max_viewers} connections); try again later."
            status = http.HTTPStatus.SERVICE_UNAVAILABLE
        else:
            status = http.HTTPStatus.FORBIDDEN
        if reason is None:
            return None
        self.refused += 1
        self._complaints.warning("refused", "refused a viewer connection from %s: %s", _peer_host(connection), reason)
        return connection.respond(status, reason + "\n")

    def refusal(self, origin: str | None, peer: str | None, token: str | None, host: str | None = None) -> str | None:
        """Why a client may not connect (None: it may). Shared with the HTTP routes that stream the same data."""
        if self.token is not None and token != self.token:
            return "This live stream needs the app's token (open it from the app's page, or pass ?token=)."
        if origin is not None and not self._own_origin(origin, host):
            return f"Origin {origin} may not watch this app's live streams (see --allowed-origin)."
        if origin is None and self.token is None and not _is_loopback(peer):
            return "Only this computer may connect without a browser origin (start the app with --auth)."
        return None

    def _own_origin(self, origin: str, host: str | None) -> bool:
        """The app's page (same host as the one the viewer dialled, the app's port) or an allowed origin."""
        origin = origin.rstrip("/")
        if origin in self.allowed_origins:
            return True
        if self.app_port is None or not host:
            return False
        try:
            page, dialled = urlsplit(origin), urlsplit(f"//{host}")
            if _is_loopback(self.host) and not _is_loopback(dialled.hostname):
                return False  # a name that resolves to this computer is another site's page (DNS rebinding)
            return (page.scheme in ("http", "https") and page.hostname == dialled.hostname
                    and (page.port or {"http": 80, "https": 443}[page.scheme]) == self.app_port)
        except ValueError:
            return False

    # ----------------------------------------------------------------------------------------------- publishing
    def open_stream(self, job: str, clock: StreamClock) -> None:
        """Announce a stream and its clock (messages of the stream are stamped with its ``now``)."""
        self._clocks[job] = clock
        while len(self._clocks) > 4 * MAX_REMEMBERED_JOBS:
            self._clocks.pop(next(iter(self._clocks)))

    def publish_status(self, job: str, stage: str, message: str) -> None:
        self._publish({"type": "status", "job": job, "stage": stage, "message": message})

    def publish_progress(self, job: str, done: int, total: int, eta_s: float | None, stage: str = "render") -> None:
        eta = None if eta_s is None else round(float(eta_s), 1)
        self._publish({"type": "progress", "job": job, "done": int(done), "total": int(total), "eta_s": eta,
                       "stage": stage})

    def publish_done(self, job: str, video_url: str | None, duration_s: float, engine: str, num_frames: int) -> None:
        self._publish({"type": "done", "job": job, "video_url": video_url, "duration_s": round(float(duration_s), 3),
                       "engine": engine, "num_frames": int(num_frames)})

    def publish_error(self, job: str, message: str) -> None:
        self._publish({"type": "error", "job": job, "message": message})

    def publish_audio(self, job: str, t: float, pcm: np.ndarray) -> None:
        """Speech at ``t`` on the stream's timeline: int16 mono samples at SAMPLE_RATE (at most 200 ms a message)."""
        samples = np.ascontiguousarray(pcm, dtype="<i2")
        message = {"type": "audio", "job": job, "t": round(float(t), 4), "now": self._now(job),
                   "sample_rate": SAMPLE_RATE, "channels": 1, "format": "s16le"}
        data = _json_with_base64(message, "pcm", samples.tobytes())
        self._deliver_threadsafe(job, "audio", data, t + samples.size / SAMPLE_RATE)

    def publish_frame(self, job: str, seq: int, t: float, quality: str, rgb: np.ndarray | None = None,
                      jpeg: bytes | None = None) -> None:
        """Queue a frame (pixels to encode, or a JPEG already encoded); if the encoder is behind, queued frames of
        this job whose time is past are dropped (frames sent ahead of their time wait in order)."""
        if jpeg is None and (rgb is None or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3):
            raise ValueError(f"frame must be (H, W, 3) uint8 or a JPEG, got {getattr(rgb, 'shape', None)}")
        frame = {"type": "frame", "job": job, "seq": int(seq), "t": round(float(t), 4), "quality": quality,
                 "rgb": rgb, "jpeg": jpeg}
        now = self._now(job)
        with self._frames_lock:
            waiting = self._frames_waiting.setdefault(job, deque())
            while waiting and (len(waiting) >= MAX_WAITING_FRAMES or _stale(waiting[0]["t"], now)):
                waiting.popleft()
                self.frames_dropped_before_encoding += 1
            waiting.append(frame)
            self._frames_lock.notify()

    def _now(self, job: str) -> float | None:
        clock = self._clocks.get(job)
        return None if clock is None else round(clock.now(), 4)

    def _publish(self, message: dict) -> None:
        data = json.dumps(message, separators=(",", ":")).encode("utf-8")
        self._deliver_threadsafe(message["job"], message["type"], data)

    def _deliver_threadsafe(self, job: str, kind: str, data: bytes, audio_end: float | None = None,
                            t: float | None = None) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._deliver, job, kind, data, audio_end, t)
        except RuntimeError:  # the loop closed between the check and the call (shutdown)
            pass

    def _run_encoder(self) -> None:
        while True:
            with self._frames_lock:
                while not self._frames_waiting and not self._stopping:
                    self._frames_lock.wait()
                if self._stopping:
                    return
                job, waiting = next(iter(self._frames_waiting.items()))
                frame = waiting.popleft()
                if waiting:
                    self._frames_waiting.move_to_end(job)  # the streams take turns
                else:
                    del self._frames_waiting[job]
            rgb, jpeg = frame.pop("rgb"), frame.pop("jpeg")
            if jpeg is None:
                jpeg = encode_jpeg(rgb)
                self.frames_encoded += 1
                frame["width"], frame["height"] = int(rgb.shape[1]), int(rgb.shape[0])
            else:
                frame["width"], frame["height"] = Image.open(io.BytesIO(jpeg)).size  # reads the header only
            frame["now"] = self._now(job)
            self._deliver_threadsafe(job, "frame", _json_with_base64(frame, "jpeg", jpeg), t=frame["t"])

    # ----------------------------------------------------------------------------------------------- the loop side
    def _deliver(self, job: str, kind: str, data: bytes, audio_end: float | None = None,
                 t: float | None = None) -> None:
        state = self._jobs.get(job)
        if state is None:
            state = self._jobs[job] = _Job()
            self._latest_job = job
            while len(self._jobs) > MAX_REMEMBERED_JOBS:
                self._jobs.popitem(last=False)
            for viewer in self._viewers:
                if viewer.follow is None:  # latest-job followers switch to the new job
                    self._queue_snapshot(viewer, job)
        if kind == "audio":
            now = self._now(job)
            while state.recent_audio and now is not None and state.recent_audio[0][0] < now - 1.0:
                state.recent_audio.popleft()  # over: a viewer joining now does not need it
            state.recent_audio.append((audio_end, data))
        else:
            state.latest[kind] = data
        for viewer in self._viewers:
            if self._followed_job(viewer) == job:
                self._queue(viewer, job, kind, data, t)

    def _followed_job(self, viewer: _Viewer) -> str | None:
        return viewer.follow if viewer.follow is not None else self._latest_job

    def _queue(self, viewer: _Viewer, job: str | None, kind: str, data: bytes, t: float | None = None) -> None:
        if viewer.keeping_up():
            # Fast path: hand the message to the socket now, without a task switch per viewer and message.
            broadcast([viewer.connection], data, text=True)
            return
        if kind == "audio":  # speech is never coalesced: each piece is queued, the oldest dropped past the bound
            viewer.pending[(job, kind, id(data))] = data
            viewer.queued_audio += 1
            if viewer.queued_audio > MAX_QUEUED_AUDIO:
                oldest = next(key for key in viewer.pending if key[1] == "audio")
                del viewer.pending[oldest]
                viewer.queued_audio -= 1
        elif kind == "frame" and t is not None:
            now = self._now(job)
            waiting = [key for key in viewer.pending if key[:2] == (job, "frame") and len(key) == 3]
            for key in waiting[:max(0, len(waiting) + 1 - MAX_WAITING_FRAMES)]:
                del viewer.pending[key]
            for key in waiting:
                if key in viewer.pending and _stale(key[2], now):
                    del viewer.pending[key]  # its time is past: the newer frame replaces it
            viewer.pending[(job, kind, t)] = data
        else:
            # One slot per (job, type): a newer message replaces an unsent older one, keeping its place in the order.
            viewer.pending[(job, kind)] = data
        viewer.wake.set()

    def _queue_snapshot(self, viewer: _Viewer, job: str | None) -> None:
        state = self._jobs.get(job) if job is not None else None
        if state is None:
            return
        now = self._now(job)
        if now is not None:
            self._queue(viewer, job, "clock", json.dumps({"type": "clock", "job": job, "now": now}).encode("utf-8"))
        for kind in _SNAPSHOT_ORDER:
            if kind in state.latest:
                self._queue(viewer, job, kind, state.latest[kind])
        for end, data in state.recent_audio:  # the speech from the current position on
            if now is None or end > now:
                self._queue(viewer, job, "audio", data)

    async def _handle(self, connection: ServerConnection) -> None:
        viewer = _Viewer(connection)
        self._viewers.add(viewer)
        sender = asyncio.create_task(self._send_loop(viewer))
        try:
            self._queue_hello_and_snapshot(viewer)
            async for raw in connection:
                self._on_client_message(viewer, raw)
        except ConnectionClosed:
            pass
        finally:
            self._viewers.discard(viewer)
            sender.cancel()

    def _queue_hello_and_snapshot(self, viewer: _Viewer) -> None:
        viewer.pending.clear()
        viewer.queued_audio = 0
        self._queue(viewer, None, "hello", self._hello(viewer))
        self._queue_snapshot(viewer, self._followed_job(viewer))

    def _hello(self, viewer: _Viewer) -> bytes:
        hello = {**self.hello_info, "type": "hello", "job": self._followed_job(viewer), "protocol": PROTOCOL_VERSION,
                 "following": "latest" if viewer.follow is None else "job"}
        return json.dumps(hello).encode("utf-8")

    async def _send_loop(self, viewer: _Viewer) -> None:
        try:
            while True:
                await viewer.wake.wait()
                viewer.wake.clear()
                while viewer.pending:
                    key, data = viewer.pending.popitem(last=False)
                    job, kind = key[0], key[1]
                    if kind == "audio":
                        viewer.queued_audio -= 1
                    if job is not None and job != self._followed_job(viewer):
                        continue  # queued before the viewer switched jobs: never mix jobs
                    viewer.sending = True
                    try:
                        await viewer.connection.send(data, text=True)  # waits while this viewer's buffer is full
                    finally:
                        viewer.sending = False
        except ConnectionClosed:
            pass

    def _on_client_message(self, viewer: _Viewer, raw: str | bytes) -> None:
        try:
            message = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            self._complaints.warning("malformed", "ignored a malformed viewer message (not JSON): %.80r", raw)
            return
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            self._complaints.warning("malformed", "ignored a malformed viewer message (no type): %.80r", raw)
            return
        kind = message["type"]
        if kind == "follow":
            job = message.get("job")
            if job is not None and not isinstance(job, str):
                self._complaints.warning("malformed", "ignored a malformed follow message (job must be a string "
                                                      "or null): %.80r", raw)
                return
            before = self._followed_job(viewer)
            viewer.follow = job or None
            if self._followed_job(viewer) == before:  # the stream it already plays: what it has stays valid (a
                self._queue(viewer, None, "hello", self._hello(viewer))  # snapshot would play its speech twice)
            else:
                self._queue_hello_and_snapshot(viewer)
        elif kind == "speech":
            self._on_speech(message)
        elif kind == "ping":
            self._queue(viewer, None, "pong", json.dumps({"type": "pong", "job": None}).encode("utf-8"))
        else:
            self._complaints.warning("unknown", "ignored a viewer message of unknown type %.40r", kind)


    def _on_speech(self, message: dict) -> None:
        """Speech from a client's microphone for a live session: s16le PCM at any rate, mono."""
        from core.audio import pcm_from_raw
        from core.errors import InputError

        job, pcm, rate = message.get("job"), message.get("pcm", ""), message.get("sample_rate", 16000)
        if self.speech_handler is None or not isinstance(job, str) or not isinstance(pcm, str):
            self._complaints.warning("speech", "ignored speech for %.40r: no live session takes it", job)
            return
        try:
            data = base64.b64decode(pcm, validate=True)
            samples = pcm_from_raw(data, int(rate), 1, big_endian=False) if data else np.zeros(0, np.float32)
            self.speech_handler(job, samples, bool(message.get("final")))
        except (ValueError, TypeError, InputError) as exc:
            self._complaints.warning("speech", "ignored speech for %.40r: %s", job, exc)


def _peer_host(connection: ServerConnection) -> str | None:
    address = connection.remote_address
    return address[0] if address else None


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host == "localhost"


def _query_token(path: str) -> str | None:
    values = parse_qs(urlsplit(path).query).get("token")
    return values[0] if values else None
