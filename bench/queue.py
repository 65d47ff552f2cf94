"""Message-driven livestreams: what one worker sustains, how soon a message is seen speaking, two workers sharing.

    python -m bench.queue [--amqp amqp://guest:guest@127.0.0.1/] [--sessions 1,2,4] [--seconds 60]

Needs a RabbitMQ broker with the consistent-hash exchange (README). Workers run as ``app.py worker`` processes, as a
user runs them. Printed:

1. messages per minute one worker speaks with 5 s utterances, for 1, 2, 4 concurrent sessions fed at once (a
   session speaks in real time, so one session tops out at 12 a minute; the worker holds as many sessions as the CPU
   renders at 25 fps — its sessions' late frames are printed too);
2. publish -> first speaking frame at an RTMP receiver (a local PyAV listener, as ``ffmpeg -listen 1``): a beep is
   published while the session idles; the time until its sound is decoded from the RTMP stream (target <= 1.5 s);
3. two workers on this box: 10 sessions started; how many each worker took.
"""
from __future__ import annotations

if __name__ in ("queue",):  # imported by that name: bench/ is on the import path because a bench ran as a file
    raise ImportError("bench/queue.py stands in for the standard library's queue here: run benchmarks as modules "
                      "from the repository root, e.g. python -m bench.session")

import argparse
import asyncio
import base64
import json
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_IMAGE = ROOT / "examples" / "portrait.png"
EXAMPLE_AUDIO = ROOT / "examples" / "speech.wav"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def publish(url: str, exchange: str, messages: list[dict]) -> list[float]:
    import aio_pika

    async def run():
        connection = await aio_pika.connect(url)
        channel = await connection.channel()
        target = await channel.declare_exchange(exchange, "x-consistent-hash", durable=True)
        times = []
        for message in messages:
            times.append(time.monotonic())
            await target.publish(aio_pika.Message(json.dumps(message).encode()), routing_key=message["session"])
        await connection.close()
        return times

    return asyncio.run(run())


def cleanup(url: str, exchange: str, workers: list[str]) -> None:
    import aio_pika

    async def run():
        connection = await aio_pika.connect(url)
        channel = await connection.channel()
        for queue in [f"{exchange}.{w}" for w in workers] + [f"{exchange}.dead"]:
            await channel.queue_delete(queue)
        await channel.exchange_delete(exchange)
        await connection.close()

    asyncio.run(run())


class Worker:
    def __init__(self, url: str, exchange: str, name: str, media: str, folder: str):
        self.name = name
        self.log_path = Path(folder) / f"{name}.log"
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "worker", "--amqp", url, "--queue", exchange, "--worker-name", name,
             "--media-root", media, "--outputs", str(Path(folder) / name), "--max-sessions", "16"],
            stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while f"worker {name} consuming" not in self.log():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"worker {name} did not start:\n{self.log()[-2000:]}")
            time.sleep(0.3)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def spoken(self) -> int:
        return self.log().count("spoke a message for")

    def sessions(self) -> set[str]:
        return set(re.findall(r"session (\S+) is live as", self.log()))

    def close(self):
        self.process.terminate()
        self.process.wait(30)


def five_seconds_b64(folder: str) -> str:
    """The example speech cut to 5 s, as a wav file in base64 (what audio_b64 carries)."""
    import wave

    with wave.open(str(EXAMPLE_AUDIO)) as w:
        rate, data = w.getframerate(), w.readframes(w.getnframes())
    path = Path(folder) / "five.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(rate)
        out.writeframes(data[:rate * 2 * 5])
    return base64.b64encode(path.read_bytes()).decode()


def throughput(url: str, media: str, folder: str, counts: list[int], seconds: float) -> None:
    audio = five_seconds_b64(folder)
    for count in counts:
        exchange = f"bench-{secrets.token_hex(3)}"
        worker = Worker(url, exchange, "w1", media, folder)
        try:
            names = [f"s{k}" for k in range(count)]
            publish(url, exchange, [{"session": n, "image": "portrait.png", "options": {"size": 512}} for n in names])
            time.sleep(3.0)
            per_session = int(seconds / 5) + 2
            publish(url, exchange, [{"session": n, "audio_b64": audio} for _ in range(per_session) for n in names])
            start, before = time.monotonic(), worker.spoken()
            time.sleep(seconds)
            rate = (worker.spoken() - before) * 60 / (time.monotonic() - start)
            print(f"1. one worker, {count} session(s) fed 5 s utterances: {rate:.0f} messages a minute "
                  f"({rate / count:.1f} per session; real time allows 12)", flush=True)
        finally:
            worker.close()
            cleanup(url, exchange, ["w1"])


def first_frame(url: str, media: str, folder: str, repeats: int = 5) -> None:
    import av

    exchange = f"bench-{secrets.token_hex(3)}"
    port = free_port()
    onsets: list[float] = []

    def receive():
        container = av.open(f"rtmp://127.0.0.1:{port}/live/key", options={"listen": "1"}, timeout=(60.0, 10.0))
        last_loud = 0.0
        try:
            for packet in container.demux(audio=0):
                for frame in packet.decode():
                    now = time.monotonic()
                    if float(np.abs(frame.to_ndarray()).max()) > 0.2:
                        if now - last_loud > 1.0:
                            onsets.append(now)
                        last_loud = now
        except Exception:
            pass

    threading.Thread(target=receive, daemon=True).start()
    worker = Worker(url, exchange, "w1", media, folder)
    try:
        publish(url, exchange, [{"session": "beep", "image": "portrait.png",
                                 "options": {"size": 512, "rtmp_url": f"rtmp://127.0.0.1:{port}/live/key"}}])
        time.sleep(4.0)
        t = np.arange(int(0.3 * 16000)) / 16000
        tone = Path(folder) / "beep.wav"
        import wave

        with wave.open(str(tone), "wb") as out:
            out.setnchannels(1), out.setsampwidth(2), out.setframerate(16000)
            out.writeframes((0.6 * np.sin(2 * np.pi * 1000 * t) * 32767).astype("<i2").tobytes())
        beep = base64.b64encode(tone.read_bytes()).decode()
        delays = []
        for _ in range(repeats):
            seen = len(onsets)
            sent = publish(url, exchange, [{"session": "beep", "audio_b64": beep}])[0]
            deadline = time.monotonic() + 10
            while len(onsets) == seen and time.monotonic() < deadline:
                time.sleep(0.01)
            if len(onsets) > seen:
                delays.append((onsets[seen] - sent) * 1000)
            time.sleep(3.0)
        print(f"2. publish -> first speaking frame's sound at the RTMP receiver: median "
              f"{statistics.median(delays):.0f} ms, max {max(delays):.0f} ms over {len(delays)} (target <= 1500 ms)"
              if delays else "2. no beep reached the RTMP receiver", flush=True)
    finally:
        worker.close()
        cleanup(url, exchange, ["w1"])


def two_workers(url: str, media: str, folder: str) -> None:
    exchange = f"bench-{secrets.token_hex(3)}"
    workers = [Worker(url, exchange, name, media, folder) for name in ("w1", "w2")]
    try:
        publish(url, exchange, [{"session": f"news{k}", "image": "portrait.png", "options": {"size": 256},
                                 "text": "Hello."} for k in range(10)])
        time.sleep(20.0)
        taken = {w.name: len(w.sessions()) for w in workers}
        print(f"3. two workers, 10 sessions: {taken} (both take messages: "
              f"{'yes' if all(taken.values()) else 'no'})", flush=True)
    finally:
        for worker in workers:
            worker.close()
        cleanup(url, exchange, ["w1", "w2"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1/")
    parser.add_argument("--sessions", default="1,2,4")
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        media = Path(folder) / "media"
        media.mkdir()
        shutil.copy(EXAMPLE_IMAGE, media / "portrait.png")
        first_frame(args.amqp, str(media), folder)
        two_workers(args.amqp, str(media), folder)
        throughput(args.amqp, str(media), folder, [int(c) for c in args.sessions.split(",")], args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
