"""WebSocket broadcaster: live frames and job state to any number of viewer tabs.

The server (``websockets.asyncio.server``) runs its own asyncio loop in a daemon thread; producers publish from any
thread without blocking. Every message is JSON with a ``type`` and the ``job`` it belongs to:

* ``hello``    on connect: the job the viewer follows (``null`` if none yet), the protocol version, ``app_port``
* ``status``   ``stage``, ``message``
* ``progress`` ``done``, ``total``, ``eta_s`` (``null`` while unknown), ``stage``
* ``frame``    ``seq``, ``t``, ``quality`` (``idle|preview|final``), ``width``, ``height``, ``jpeg`` (base64)
* ``done``     ``video_url``, ``duration_s``, ``engine``, ``num_frames``
* ``error``    ``message``

A viewer follows the latest job unless it sends ``{"type": "follow", "job": "<id>"}`` (``"job": null`` goes back to
following the latest). Each frame is JPEG-encoded once, on the broadcaster's encoder thread, whatever the number of
viewers. A viewer gets, per job and message type, only the newest message that it has not been sent yet: a slow viewer
skips frames (memory stays bounded) and never slows the producer. A viewer that joins late is sent the current
status, progress and latest frame of its job at once.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from websockets.asyncio.connection import broadcast
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
JPEG_QUALITY = 80
MAX_CLIENT_MESSAGE_BYTES = 4096  # viewers only ever send tiny control messages
# A viewer whose socket holds more unsent bytes than this is behind: its messages wait in its latest-only slots.
WRITE_BACKLOG_BYTES = 256 * 1024
MAX_REMEMBERED_JOBS = 16  # finished jobs stay joinable (a late viewer still gets their result) up to this many
# Message types that describe a job's state; a late joiner is sent the latest of each, in this order.
_SNAPSHOT_ORDER = ("status", "progress", "frame", "done", "error")


def encode_jpeg(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@dataclass
class _Job:
    latest: dict[str, bytes] = field(default_factory=dict)  # message type -> serialized message


@dataclass(eq=False)
class _Viewer:
    connection: ServerConnection
    follow: str | None = None  # a job id, or None for "the latest job"
    # (job, type) -> the newest unsent message of that kind; job None = not about a job (hello, pong)
    pending: "OrderedDict[tuple[str | None, str], bytes]" = field(default_factory=OrderedDict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    sending: bool = False  # the viewer's send task is writing (or waiting for its socket to drain)

    def keeping_up(self) -> bool:
        transport = self.connection.transport
        return (not self.pending and not self.sending and transport is not None and not transport.is_closing()
                and transport.get_write_buffer_size() < WRITE_BACKLOG_BYTES)


class Broadcaster:
    """Start with ``start()`` (returns once the port is bound); publish from any thread; ``stop()`` to shut down."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8765, hello_info: dict | None = None):
        self.host = host
        self.hello_info = dict(hello_info or {})  # extra fields for the hello message (e.g. the app's HTTP port)
        self.port = port  # replaced by the bound port after start() (port 0 = any free port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._viewers: set[_Viewer] = set()
        self._jobs: "OrderedDict[str, _Job]" = OrderedDict()
        self._latest_job: str | None = None
        # Frames waiting for the encoder thread: only the newest per job is kept.
        self._frames_lock = threading.Condition()
        self._frames_waiting: "OrderedDict[str, dict]" = OrderedDict()
        self._encoder: threading.Thread | None = None
        self._stopping = False
        self.frames_encoded = 0  # counters for tests and benchmarks
        self.frames_dropped_before_encoding = 0

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

    def _run_loop(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()

    async def _serve(self) -> None:
        try:
            # No per-message compression: frames are JPEG already, and deflating them once per viewer costs CPU
            # that belongs to generation.
            server = await serve(self._handle, self.host, self.port, compression=None,
                                 max_size=MAX_CLIENT_MESSAGE_BYTES, ping_interval=20, ping_timeout=20)
        except OSError as exc:
            self._start_error = exc
            self._ready.set()
            return
        self._server = server
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        log.info("live viewer server listening on %s", self.url)
        await server.wait_closed()

    # ----------------------------------------------------------------------------------------------- publishing
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

    def publish_frame(self, job: str, seq: int, t: float, quality: str, rgb: np.ndarray | None = None,
                      jpeg: bytes | None = None) -> None:
        """Queue a frame (pixels to encode, or a JPEG already encoded); if the encoder is behind, an older queued
        frame of this job is dropped."""
        if jpeg is None and (rgb is None or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3):
            raise ValueError(f"frame must be (H, W, 3) uint8 or a JPEG, got {getattr(rgb, 'shape', None)}")
        with self._frames_lock:
            if job in self._frames_waiting:
                self.frames_dropped_before_encoding += 1
            self._frames_waiting[job] = {"type": "frame", "job": job, "seq": int(seq), "t": round(float(t), 3),
                                         "quality": quality, "rgb": rgb, "jpeg": jpeg}
            self._frames_waiting.move_to_end(job)
            self._frames_lock.notify()

    def _publish(self, message: dict) -> None:
        data = json.dumps(message, separators=(",", ":")).encode("utf-8")
        self._deliver_threadsafe(message["job"], message["type"], data)

    def _deliver_threadsafe(self, job: str, kind: str, data: bytes) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._deliver, job, kind, data)
        except RuntimeError:  # the loop closed between the check and the call (shutdown)
            pass

    def _run_encoder(self) -> None:
        while True:
            with self._frames_lock:
                while not self._frames_waiting and not self._stopping:
                    self._frames_lock.wait()
                if self._stopping:
                    return
                job, frame = self._frames_waiting.popitem(last=False)
            rgb, jpeg = frame.pop("rgb"), frame.pop("jpeg")
            if jpeg is None:
                jpeg = encode_jpeg(rgb)
                self.frames_encoded += 1
                frame["width"], frame["height"] = int(rgb.shape[1]), int(rgb.shape[0])
            else:
                frame["width"], frame["height"] = Image.open(io.BytesIO(jpeg)).size  # reads the header only
            frame["jpeg"] = base64.b64encode(jpeg).decode("ascii")
            self._deliver_threadsafe(job, "frame", json.dumps(frame, separators=(",", ":")).encode("utf-8"))

    # ----------------------------------------------------------------------------------------------- the loop side
    def _deliver(self, job: str, kind: str, data: bytes) -> None:
        state = self._jobs.get(job)
        if state is None:
            state = self._jobs[job] = _Job()
            self._latest_job = job
            while len(self._jobs) > MAX_REMEMBERED_JOBS:
                self._jobs.popitem(last=False)
            for viewer in self._viewers:
                if viewer.follow is None:  # latest-job followers switch to the new job
                    self._queue_snapshot(viewer, job)
        state.latest[kind] = data
        for viewer in self._viewers:
            if self._followed_job(viewer) == job:
                self._queue(viewer, job, kind, data)

    def _followed_job(self, viewer: _Viewer) -> str | None:
        return viewer.follow if viewer.follow is not None else self._latest_job

    def _queue(self, viewer: _Viewer, job: str | None, kind: str, data: bytes) -> None:
        if viewer.keeping_up():
            # Fast path: hand the message to the socket now, without a task switch per viewer and message.
            broadcast([viewer.connection], data, text=True)
            return
        # One slot per (job, type): a newer message replaces an unsent older one, keeping its place in the order.
        viewer.pending[(job, kind)] = data
        viewer.wake.set()

    def _queue_snapshot(self, viewer: _Viewer, job: str | None) -> None:
        state = self._jobs.get(job) if job is not None else None
        if state is None:
            return
        for kind in _SNAPSHOT_ORDER:
            if kind in state.latest:
                self._queue(viewer, job, kind, state.latest[kind])

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
        job = self._followed_job(viewer)
        hello = {**self.hello_info, "type": "hello", "job": job, "protocol": PROTOCOL_VERSION,
                 "following": "latest" if viewer.follow is None else "job"}
        self._queue(viewer, None, "hello", json.dumps(hello).encode("utf-8"))
        self._queue_snapshot(viewer, job)

    async def _send_loop(self, viewer: _Viewer) -> None:
        try:
            while True:
                await viewer.wake.wait()
                viewer.wake.clear()
                while viewer.pending:
                    (job, kind), data = viewer.pending.popitem(last=False)
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
            log.warning("ignored a malformed viewer message (not JSON): %.80r", raw)
            return
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            log.warning("ignored a malformed viewer message (no type): %.80r", raw)
            return
        kind = message["type"]
        if kind == "follow":
            job = message.get("job")
            if job is not None and not isinstance(job, str):
                log.warning("ignored a malformed follow message (job must be a string or null): %.80r", raw)
                return
            viewer.follow = job or None
            self._queue_hello_and_snapshot(viewer)
        elif kind == "ping":
            self._queue(viewer, None, "pong", json.dumps({"type": "pong", "job": None}).encode("utf-8"))
        else:
            log.warning("ignored a viewer message of unknown type %.40r", kind)
