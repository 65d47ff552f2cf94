"""Message-driven livestreams: speech from RabbitMQ into always-on sessions, on any number of workers.

Topology (declared by every worker, idempotently):

* exchange ``NAME`` of type ``x-consistent-hash`` (RabbitMQ's consistent-hash plugin): publishers publish every
  message there with the session's name as the routing key;
* one durable queue per worker, ``NAME.<worker>``, bound to the exchange: a session's messages always land in the
  same worker's queue, in the order they were published, and the sessions spread over the workers (add a worker,
  and new sessions go to it as well);
* queue ``NAME.dead``: messages that cannot be spoken, with the reason in the ``x-reason`` header.

A message is JSON: ``{"session": name, "image": path, "options": {"rtmp_url": ..., "size": ..., ...},
"text": ... | "audio_b64": ... | "audio_path": ...}``. The first message for a name carries ``image`` (and the
outputs it wants) and starts that session streaming at once (idle); every message's speech is spoken there, in
order. A message is acknowledged only once it has been spoken (a worker that dies mid-message leaves it, and those
after it, to be delivered again); the sessions a worker holds are remembered on disk, so a restarted worker picks
them up again. ``image`` and ``audio_path`` are read only from under the media root; anything else is a bad message.
A broker that goes away is reconnected with back-off while the streams keep idling.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import threading
from dataclasses import dataclass

from core.audio import decode_audio_bytes, load_audio
from core.errors import DependencyError, InputError

from .session import SessionManager, SessionOptions

log = logging.getLogger(__name__)

PREFETCH = 32  # messages a worker holds unacknowledged (queued in its sessions, in order)
HASH_RING_POINTS = 50
RECONNECT_FIRST_S, RECONNECT_MAX_S = 1.0, 30.0
MAX_AUDIO_S = 600.0


class BadMessage(Exception):
    """A message that cannot be spoken; its text is the dead-letter reason."""


@dataclass(frozen=True)
class WorkerConfig:
    amqp_url: str
    queue: str  # the name publishers use: the exchange, and the prefix of the worker queues
    worker: str  # this worker's name (stable across restarts: its queue is NAME.<worker>)
    media_root: str  # images and audio files are read only from under here
    state_dir: str  # where the worker remembers its sessions


class QueueWorker:
    """Consumes its queue on an asyncio loop in a thread; ``start()``, then ``stop()``."""

    def __init__(self, config: WorkerConfig, sessions: SessionManager):
        self.config = config
        self.sessions = sessions
        self.media_root = os.path.realpath(config.media_root)
        self.names: dict[str, str] = {}  # session name -> live session id
        self.known = _load_known(self._state_path())  # session name -> {"image": path, "options": {...}}
        self.spoken = self.dead = 0
        self.connected = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name=f"worker-{config.worker}", daemon=True)
        self._reader: asyncio.Future | None = None

    @property
    def queue_name(self) -> str:
        return f"{self.config.queue}.{self.config.worker}"

    @property
    def dead_queue(self) -> str:
        return f"{self.config.queue}.dead"

    def start(self) -> "QueueWorker":
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(15)

    # --- the connection ------------------------------------------------------------------------------------
    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        import aio_pika

        self._stopping = asyncio.Event()
        wait_s = RECONNECT_FIRST_S
        while not self._stopping.is_set():
            try:
                connection = await aio_pika.connect(self.config.amqp_url, timeout=10)
            except (OSError, aio_pika.exceptions.AMQPError, asyncio.TimeoutError) as exc:
                log.warning("worker %s: broker %s unreachable (%s); retrying in %.0f s", self.config.worker,
                            _safe_url(self.config.amqp_url), exc, wait_s)
                await self._pause(wait_s)
                wait_s = min(RECONNECT_MAX_S, wait_s * 2)
                continue
            wait_s = RECONNECT_FIRST_S
            closed = asyncio.Event()
            connection.close_callbacks.add(lambda *_: closed.set())
            try:
                await self._consume(connection)
                self.connected.set()
                log.info("worker %s consuming %s", self.config.worker, self.queue_name)
                stop = asyncio.ensure_future(self._stopping.wait())
                lost = asyncio.ensure_future(closed.wait())
                await asyncio.wait({stop, lost}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel(), lost.cancel()
            except (aio_pika.exceptions.AMQPError, OSError) as exc:
                log.warning("worker %s: lost the broker (%s); reconnecting", self.config.worker, exc)
            finally:
                self.connected.clear()
                if self._reader is not None:
                    self._reader.cancel()
                    await asyncio.gather(self._reader, return_exceptions=True)
                    self._reader = None
                if not connection.is_closed:
                    try:
                        await connection.close()
                    except Exception:  # the broker is gone already
                        pass
            if not self._stopping.is_set():
                await self._pause(wait_s)

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _consume(self, connection) -> None:
        import aio_pika

        channel = await connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        try:
            exchange = await channel.declare_exchange(self.config.queue, "x-consistent-hash", durable=True)
        except aio_pika.exceptions.ChannelClosed as exc:
            raise DependencyError("RabbitMQ's consistent-hash exchange is not enabled: run "
                                  "`rabbitmq-plugins enable rabbitmq_consistent_hash_exchange` on the broker.") from exc
        queue = await channel.declare_queue(self.queue_name, durable=True)
        # the weight of this worker on the hash ring: points per worker (more points, a more even share)
        await queue.bind(exchange, routing_key=str(HASH_RING_POINTS))
        await channel.declare_queue(self.dead_queue, durable=True)
        self._channel = channel
        # one message at a time, in queue order: a session's speech is queued in the order it was published
        self._reader = asyncio.ensure_future(self._read(queue))

    async def _read(self, queue) -> None:
        async with queue.iterator() as messages:
            async for message in messages:
                await self._on_message(message)

    # --- one message ---------------------------------------------------------------------------------------
    async def _on_message(self, message) -> None:
        loop = asyncio.get_running_loop()
        try:
            payload = _parse(message.body)
            name = payload["session"]
            if payload.get("image") is not None:
                self._media_path(payload["image"], "image")  # checked even when the session is live already
            session = await asyncio.to_thread(self._session_for, name, payload)
            if not _has_speech(payload) and payload.get("image") is not None:
                await message.ack()  # a message that only starts the stream: it is streaming (idle) now
                return
            samples = await asyncio.to_thread(self._speech_of, payload)
        except BadMessage as exc:
            await self._dead_letter(message, str(exc))
            return
        except DependencyError as exc:
            await self._dead_letter(message, str(exc))
            return
        redelivered = bool(message.redelivered)

        def spoken() -> None:  # on the session's thread: acknowledge on the loop
            self.spoken += 1
            log.info("worker %s: spoke a message for %s%s", self.config.worker, name,
                     " (delivered again)" if redelivered else "")
            asyncio.run_coroutine_threadsafe(_ack(message), loop)

        try:
            session.speak(samples, final=True, when_spoken=spoken)
        except InputError as exc:
            await self._dead_letter(message, str(exc))

    async def _dead_letter(self, message, reason: str) -> None:
        import aio_pika

        self.dead += 1
        log.warning("worker %s: message to %s: %s", self.config.worker, self.dead_queue, reason)
        headers = dict(message.headers or {})
        headers["x-reason"] = reason[:500]
        await self._channel.default_exchange.publish(
            aio_pika.Message(message.body, headers=headers, content_type=message.content_type,
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=self.dead_queue)
        await message.ack()

    # --- sessions and speech (blocking: run in threads) ----------------------------------------------------
    def _session_for(self, name: str, payload: dict):
        session_id = self.names.get(name)
        session = self.sessions.get(session_id) if session_id else None
        if session is not None:
            return session
        definition = None
        if payload.get("image") is not None:
            definition = {"image": self._media_path(payload["image"], "image"), "options": payload.get("options") or {}}
        elif name in self.known:
            definition = self.known[name]  # this worker held it before a restart
        if definition is None:
            raise BadMessage(f"unknown session {name!r} and no image: the first message for a session must carry "
                             "\"image\"")
        options = dict(definition["options"])
        rtmp_url = options.pop("rtmp_url", None)
        try:
            session = self.sessions.create(definition["image"], SessionOptions.from_json(options), rtmp_url=rtmp_url)
        except InputError as exc:
            raise BadMessage(f"cannot start session {name!r}: {exc}") from None
        self.names[name] = session.id
        self.known[name] = definition
        _save_known(self._state_path(), self.known)
        log.info("worker %s: session %s is live as %s", self.config.worker, name, session.id)
        return session

    def _speech_of(self, payload: dict):
        try:
            if isinstance(payload.get("text"), str):
                from core.tts import synthesize

                return synthesize(payload["text"], payload.get("voice") or "en")
            if isinstance(payload.get("audio_b64"), str):
                data = base64.b64decode(payload["audio_b64"], validate=True)
                return decode_audio_bytes(data, MAX_AUDIO_S)
            if isinstance(payload.get("audio_path"), str):
                return load_audio(self._media_path(payload["audio_path"], "audio_path"), MAX_AUDIO_S)
        except (binascii.Error, ValueError):
            raise BadMessage("audio_b64 is not valid base64") from None
        except InputError as exc:
            raise BadMessage(f"unreadable speech: {exc}") from None
        raise BadMessage("no speech: the message needs \"text\", \"audio_b64\" or \"audio_path\"")

    def _media_path(self, value, field: str) -> str:
        if not isinstance(value, str) or not value:
            raise BadMessage(f"{field} must be a path under the media root")
        path = os.path.realpath(os.path.join(self.media_root, value))
        if os.path.commonpath([path, self.media_root]) != self.media_root:
            raise BadMessage(f"{field} {value!r} is outside the media root (--media-root)")
        if not os.path.isfile(path):
            raise BadMessage(f"{field} {value!r} does not exist under the media root")
        return path

    def _state_path(self) -> str:
        return os.path.join(self.config.state_dir, f"worker-{self.config.worker}-sessions.json")


async def _ack(message) -> None:
    """Acknowledge a spoken message; if the channel is gone meanwhile, the broker redelivers it (spoken twice is
    better than never)."""
    try:
        await message.ack()
    except Exception as exc:
        log.warning("could not acknowledge a spoken message (%s); the broker will deliver it again", exc)


def _has_speech(payload: dict) -> bool:
    return any(isinstance(payload.get(key), str) for key in ("text", "audio_b64", "audio_path"))


def _parse(body: bytes) -> dict:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadMessage("not JSON") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("session"), str) or not payload["session"]:
        raise BadMessage("the message must be a JSON object with a \"session\" name")
    return payload


def _load_known(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError):
        return {}


def _save_known(path: str, known: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8") as file:
        json.dump(known, file)
    os.replace(partial, path)


def _safe_url(url: str) -> str:
    """The broker URL without its password, for the log."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def worker_config(args) -> WorkerConfig:
    """The worker's settings from the command line (``app.py worker`` and ``app.py serve --amqp``)."""
    if not args.media_root:
        raise InputError("--media-root is required with --amqp: message images and audio are read only from there.")
    if not os.path.isdir(args.media_root):
        raise InputError(f"--media-root {args.media_root!r} is not a folder.")
    return WorkerConfig(amqp_url=args.amqp, queue=args.queue, worker=args.worker_name,
                        media_root=args.media_root, state_dir=os.path.join(os.path.abspath(args.outputs), "workers"))


def run_worker(args) -> int:
    """``app.py worker``: sessions fed from the queue, pushed to their RTMP outputs, until Ctrl-C or SIGTERM."""
    import signal

    from core.landmarks import shared_detector

    from .engines import load_engine
    from .stream import StreamHub

    config = worker_config(args)
    load_engine("lite", args.checkpoints)  # the landmark detector loads once, before the first message
    hub = StreamHub(None)
    sessions = SessionManager(None, os.path.join(os.path.abspath(args.outputs), "sessions"),
                              lambda: shared_detector(args.checkpoints), max_sessions=args.max_sessions,
                              idle_minutes=float("inf"), hub=hub, checkpoint_dir=args.checkpoints,
                              device=getattr(args, "device", "cpu"))
    worker = QueueWorker(config, sessions).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    print(f"Worker {config.worker} consuming {worker.queue_name} (publish to exchange {config.queue!r} with the "
          f"session name as routing key) on {_safe_url(config.amqp_url)}", flush=True)
    try:
        while not done.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        worker.stop()
        sessions.close()
        hub.close_all()
    return 0
