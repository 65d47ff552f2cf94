"""The message-driven livestream against a real RabbitMQ broker: messages spoken in order into a session whose RTMP
push a local ``ffmpeg -listen 1`` receiver records, redelivery after a worker is killed mid-message, dead letters
for every kind of bad message, and a broker restart."""
from __future__ import annotations

import asyncio
import base64
import json
import secrets
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from core.audio import ffmpeg_exe, load_audio
from core.landmarks import shared_detector
from live.session import SessionManager
from live.stream import StreamHub
from live.worker import QueueWorker, WorkerConfig
from support.broker import ensure_broker, restart_broker
from support.paths import EXAMPLE_AUDIO, EXAMPLE_IMAGE, ROOT, free_port
from support.waiting import wait_until


@pytest.fixture(scope="module")
def amqp_url():
    return ensure_broker()


@pytest.fixture
def media(tmp_path):
    folder = tmp_path / "media"
    folder.mkdir()
    shutil.copy(EXAMPLE_IMAGE, folder / "portrait.png")
    shutil.copy(EXAMPLE_AUDIO, folder / "speech.wav")
    (tmp_path / "secret.wav").write_bytes(EXAMPLE_AUDIO.read_bytes())  # outside the media root
    return folder


@pytest.fixture
def queue_name(amqp_url):
    name = f"test-{secrets.token_hex(4)}"
    yield name
    asyncio.run(_delete_names(amqp_url, name))


async def _delete_names(url: str, name: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    for queue in (f"{name}.w1", f"{name}.w2", f"{name}.dead"):
        await channel.queue_delete(queue)
    await channel.exchange_delete(name)
    await connection.close()


def publish(url: str, exchange: str, messages: list, routing_key: str = "s") -> None:
    import aio_pika

    async def run():
        connection = await aio_pika.connect(url)
        channel = await connection.channel()
        target = await channel.declare_exchange(exchange, "x-consistent-hash", durable=True)
        for message in messages:
            body = message if isinstance(message, bytes) else json.dumps(message).encode()
            key = routing_key if isinstance(message, bytes) else message.get("session", routing_key)
            await target.publish(aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                                 routing_key=key)
        await connection.close()

    asyncio.run(run())


def dead_letters(url: str, queue: str) -> list[tuple[bytes, str]]:
    import aio_pika

    async def run():
        connection = await aio_pika.connect(url)
        channel = await connection.channel()
        dead = await channel.declare_queue(queue, durable=True)
        found = []
        while (message := await dead.get(fail=False)) is not None:
            found.append((message.body, message.headers.get("x-reason")))
            await message.ack()
        await connection.close()
        return found

    return asyncio.run(run())


class InProcessWorker:
    def __init__(self, url: str, name: str, media, tmp_path, worker: str = "w1"):
        self.hub = StreamHub(None)
        self.sessions = SessionManager(None, str(tmp_path / "sessions"), shared_detector, hub=self.hub,
                                       idle_minutes=60)
        self.worker = QueueWorker(WorkerConfig(url, name, worker, str(media), str(tmp_path / "state")),
                                  self.sessions).start()
        assert self.worker.connected.wait(20), "the worker did not connect to the broker"

    def close(self):
        self.worker.stop()
        self.sessions.close()
        self.hub.close_all()


def loud_runs(samples: np.ndarray, rate: int = 16000) -> list[tuple[float, float]]:
    """(start, end) seconds of the stretches with speech (gaps under 0.4 s are inside one stretch)."""
    frame = rate // 25
    levels = np.array([np.abs(samples[i:i + frame]).max() for i in range(0, samples.size - frame, frame)])
    loud = np.flatnonzero(levels > 0.05)
    runs = []
    for index in loud:
        if runs and index - runs[-1][1] <= 10:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return [(a / 25, (b + 1) / 25) for a, b in runs]


def test_text_and_audio_messages_are_spoken_in_order_into_the_rtmp_stream(amqp_url, queue_name, media, tmp_path):
    port = free_port()
    recording = tmp_path / "received.flv"
    receiver = subprocess.Popen([ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-listen", "1", "-timeout", "30",
                                 "-i", f"rtmp://127.0.0.1:{port}/live/key", "-t", "16", "-c", "copy", str(recording)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    worker = InProcessWorker(amqp_url, queue_name, media, tmp_path)
    try:
        time.sleep(0.5)
        publish(amqp_url, queue_name, [  # the stream starts at once, idle
            {"session": "news", "image": "portrait.png",
             "options": {"size": 256, "rtmp_url": f"rtmp://127.0.0.1:{port}/live/key"}}])
        time.sleep(2.0)
        publish(amqp_url, queue_name, [{"session": "news", "text": "Good evening."},
                                       {"session": "news", "audio_path": "speech.wav"}])
        receiver.wait(60)
        wait_until(lambda: worker.worker.spoken >= 2, 30, "both messages spoken")
    finally:
        worker.close()
    info = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(recording)], capture_output=True, text=True).stderr
    assert "Video: h264" in info and "Audio: aac" in info, info
    sound = load_audio(str(recording), max_seconds=60)
    runs = loud_runs(sound)
    assert runs and runs[0][0] > 1.0, runs  # idle (silent) before the first speech
    # where the recorded speech.wav sits in the stream: it must follow the text, and silence must follow it
    speech = load_audio(str(EXAMPLE_AUDIO))
    correlation = np.correlate(sound, speech[:16000 * 2], mode="valid")
    speech_at = int(np.argmax(correlation)) / 16000
    assert 0.5 < speech_at - runs[0][0] < 2.5, (runs, speech_at)  # "Good evening." first, then the recording
    assert sound.size / 16000 - runs[-1][1] > 0.5  # and idle again after it
    assert runs[-1][1] == pytest.approx(speech_at + speech.size / 16000, abs=0.6)


def test_every_kind_of_bad_message_goes_to_the_dead_letter_queue_and_the_stream_goes_on(amqp_url, queue_name,
                                                                                       media, tmp_path):
    worker = InProcessWorker(amqp_url, queue_name, media, tmp_path)
    try:
        publish(amqp_url, queue_name, [
            b"this is not json",
            {"session": "s", "image": "portrait.png", "options": {"size": 128}},  # starts the stream: fine
            {"session": "s"},  # no speech
            {"session": "s", "audio_b64": base64.b64encode(b"definitely not audio").decode()},
            {"session": "stranger", "text": "who am I?"},  # unknown session, no image
            {"session": "s", "audio_path": "../secret.wav"},
            {"session": "s", "image": "/etc/hostname", "text": "hi"},
            {"session": "s", "text": "Still here."},  # a good one after all that
        ], routing_key="s")
        wait_until(lambda: worker.worker.spoken >= 1, 30, "the good message spoken")
        dead = dead_letters(amqp_url, f"{queue_name}.dead")
    finally:
        worker.close()
    reasons = [reason for _, reason in dead]
    assert len(dead) == 6, reasons
    for expected in ("not JSON", "no speech", "unreadable speech", "unknown session 'stranger'",
                     "outside the media root", "outside the media root"):
        assert any(expected in reason for reason in reasons), (expected, reasons)
    assert dead[0][0] == b"this is not json"  # the message itself, unchanged, for whoever looks into it


def test_a_worker_killed_mid_message_gets_it_again_after_a_restart(amqp_url, queue_name, media, tmp_path):
    def start():
        log = open(tmp_path / "worker.log", "a")
        return subprocess.Popen([sys.executable, str(ROOT / "app.py"), "worker", "--amqp", amqp_url,
                                 "--queue", queue_name, "--worker-name", "w1", "--media-root", str(media),
                                 "--outputs", str(tmp_path / "out")], stdout=log, stderr=subprocess.STDOUT)

    def logged() -> str:
        return (tmp_path / "worker.log").read_text()

    worker = start()
    try:
        wait_until(lambda: "worker w1 consuming" in logged(), 60, "the worker to consume")
        publish(amqp_url, queue_name, [{"session": "k", "image": "portrait.png", "options": {"size": 128},
                                        "text": "First."}])
        wait_until(lambda: "spoke a message for k" in logged(), 30, "the first message spoken")
        publish(amqp_url, queue_name, [{"session": "k", "audio_path": "speech.wav"}])  # 5.8 s
        time.sleep(2.5)  # mid-message
        worker.kill()
        worker.wait()
        assert logged().count("spoke a message") == 1
        worker = start()  # it remembers session k (no image in the message) and gets the message again
        wait_until(lambda: "(delivered again)" in logged(), 60, "the redelivered message spoken")
    finally:
        worker.terminate()
        worker.wait(20)
    assert logged().count("spoke a message for k") == 2


def test_the_worker_reconnects_after_a_broker_restart_while_the_stream_idles(amqp_url, queue_name, media, tmp_path):
    worker = InProcessWorker(amqp_url, queue_name, media, tmp_path)
    try:
        publish(amqp_url, queue_name, [{"session": "r", "image": "portrait.png", "options": {"size": 128},
                                        "text": "Before."}])
        wait_until(lambda: worker.worker.spoken >= 1, 30, "the first message spoken")
        session = worker.sessions.all()[0]
        frames = session.stats.frames_sent
        restart_broker()
        wait_until(lambda: not worker.worker.connected.is_set() or True, 5, "the drop")
        wait_until(lambda: worker.worker.connected.is_set(), 90, "the reconnection")
        assert session.stats.frames_sent > frames + 25  # the stream kept idling meanwhile
        publish(amqp_url, queue_name, [{"session": "r", "text": "After."}])
        wait_until(lambda: worker.worker.spoken >= 2, 30, "the message after the restart spoken")
    finally:
        worker.close()
