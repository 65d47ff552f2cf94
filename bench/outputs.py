"""Standard live outputs of a session (WebRTC/WHEP, HLS, RTMP): delay, A/V offset over time, and CPU cost.

    python -m bench.outputs [--minutes 10] [--beeps 5]

The real app runs (``app.py``); a Lite session (512x512) is created with an RTMP push to a local receiver. Three
clients watch it at once, each in this process: a WHEP client (aiortc), an HLS reader (PyAV reading the playlist,
as ffmpeg does) and the RTMP receiver (PyAV listening, as ``ffmpeg -listen 1`` does). Printed per output:

* delay: a short beep is posted as a speech chunk while the face idles; from the POST to the moment the beep's
  sound is decoded by the client (median of ``--beeps``);
* A/V offset at minute 0 and at the end: the example speech is spoken near the start and near the end of the run;
  on what the client received, the lag (frames; + = picture late) at which the mouth opening (68-point landmarks on
  the received frames) correlates best with the loudness of the received sound (RTMP/HLS on the stream's own
  timestamps; WebRTC on arrival time, as a player without RTCP-based sync would) — target 0 +- 1 frame, no drift;
* CPU: the app process's CPU (with its ffmpeg children) over 20 s with only a WebSocket viewer, then with each
  output added on its own.

Targets on this box: WebRTC <= 400 ms, HLS <= 3.5 s, RTMP <= 1 s; offset 0 +- 1 frame at both ends.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from bench.lipsync import lip_opening, lip_sync

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_IMAGE = ROOT / "examples" / "portrait.png"
EXAMPLE_AUDIO = ROOT / "examples" / "speech.wav"
BEEP_THRESHOLD = 0.2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    def __init__(self, folder: str):
        import psutil

        self.port, self.ws_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(self.port),
                                         "--ws-port", str(self.ws_port), "--outputs", folder],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.ps = psutil.Process(self.process.pid)
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(self.url + "/viewer", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("the app did not start")
                time.sleep(0.3)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, dict(response.headers), response.read()

    def cpu_seconds(self) -> float:
        total = sum(self.ps.cpu_times()[:2])
        for child in self.ps.children(recursive=True):
            try:
                total += sum(child.cpu_times()[:2])
            except Exception:
                pass
        return total

    def close(self):
        self.process.terminate()
        self.process.wait(20)


def create_session(app: App, rtmp_url: str) -> str:
    boundary = "----bench"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="p.png"\r\n'
             f"Content-Type: image/png\r\n\r\n".encode() + EXAMPLE_IMAGE.read_bytes() + b"\r\n",
             f'--{boundary}\r\nContent-Disposition: form-data; name="options"\r\n\r\n{{"size": 512}}\r\n'.encode(),
             f'--{boundary}\r\nContent-Disposition: form-data; name="rtmp_url"\r\n\r\n{rtmp_url}\r\n'.encode()]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    _, _, answer = app.request("POST", "/api/sessions", body,
                               {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return json.loads(answer)["session"]


def beep() -> bytes:
    t = np.arange(int(0.2 * 16000)) / 16000
    return (0.6 * np.sin(2 * np.pi * 1000 * t) * 32767).astype(">i2").tobytes()


class Receiver:
    """What a client received: sound (16 kHz mono, with its media time and arrival time) and small frames."""

    def __init__(self, name: str):
        self.name = name
        self.sound: list[tuple[float, float, np.ndarray]] = []  # (media t, arrival, samples)
        self.frames: list[tuple[float, float, np.ndarray]] = []  # (media t, arrival, rgb 256)
        self.beeps: list[float] = []  # arrival times of loud onsets after quiet
        self.keep_frames = False
        self._last_loud = 0.0
        self.error = None

    def on_sound(self, t: float, samples: np.ndarray) -> None:
        arrival = time.monotonic()
        loud = samples.size > 0 and float(np.abs(samples).max()) > BEEP_THRESHOLD
        if loud and arrival - self._last_loud > 1.0:  # a loud onset after a second of quiet: a beep arriving
            self.beeps.append(arrival)
        if loud:
            self._last_loud = arrival
        if self.keep_frames:
            self.sound.append((t, arrival, samples))

    def on_frame(self, t: float, rgb: np.ndarray) -> None:
        if self.keep_frames:
            self.frames.append((t, time.monotonic(), rgb))


def pyav_receiver(receiver: Receiver, url: str, options: dict) -> None:
    import av

    try:
        container = av.open(url, options=options, timeout=(30.0, 10.0))
        resampler = av.AudioResampler(format="flt", layout="mono", rate=16000)
        for packet in container.demux():
            for frame in packet.decode():
                t = float(frame.pts * frame.time_base) if frame.pts is not None else 0.0
                if isinstance(frame, av.AudioFrame):
                    for piece in resampler.resample(frame):
                        receiver.on_sound(t, piece.to_ndarray().reshape(-1))
                elif receiver.keep_frames:
                    receiver.on_frame(t, frame.to_ndarray(format="rgb24", width=256, height=256))
    except Exception as exc:  # the run ended (the app closed the stream)
        receiver.error = exc


def whep_receiver(receiver: Receiver, app: App, session: str, stop: threading.Event) -> None:
    import av
    from aiortc import RTCPeerConnection, RTCSessionDescription

    async def run():
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        tracks = {}
        pc.on("track", lambda track: tracks.setdefault(track.kind, track))
        await pc.setLocalDescription(await pc.createOffer())
        _, _, answer = await asyncio.to_thread(app.request, "POST", f"/whep/{session}",
                                               pc.localDescription.sdp.encode(), {"Content-Type": "application/sdp"})
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer.decode(), type="answer"))
        while len(tracks) < 2:
            await asyncio.sleep(0.05)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=16000)

        async def audio():
            while not stop.is_set():
                frame = await tracks["audio"].recv()
                for piece in resampler.resample(frame):
                    receiver.on_sound(time.monotonic(), piece.to_ndarray().reshape(-1))

        async def video():
            while not stop.is_set():
                frame = await tracks["video"].recv()
                if receiver.keep_frames:
                    receiver.on_frame(time.monotonic(), frame.to_ndarray(format="rgb24", width=256, height=256))

        await asyncio.gather(audio(), video())
        await pc.close()

    try:
        asyncio.run(run())
    except Exception as exc:
        receiver.error = exc


def av_offset(receiver: Receiver, detector) -> int | None:
    """Lag (frames) of best correlation between the mouth on the received frames and the received loudness."""
    if len(receiver.frames) < 50 or not receiver.sound:
        return None
    times = np.concatenate([np.full(s.size, t) + np.arange(s.size) / 16000 for t, _, s in receiver.sound])
    samples = np.concatenate([s for _, _, s in receiver.sound])
    openings, levels = [], []
    for t, _, rgb in receiver.frames:
        window = (times >= t) & (times < t + 0.04)
        if window.sum() < 100:
            continue
        value = lip_opening(detector, np.ascontiguousarray(rgb))
        if value is None:
            continue
        openings.append(value)
        levels.append(float(np.sqrt(np.mean(samples[window].astype(np.float64) ** 2))))
    if len(openings) < 30:
        return None
    return lip_sync(np.array(openings), np.array(levels))[1]


def measure_offsets(app: App, session: str, receivers: list[Receiver], detector) -> dict[str, int | None]:
    for receiver in receivers:
        receiver.frames.clear(), receiver.sound.clear()
        receiver.keep_frames = True
    app.request("POST", f"/api/sessions/{session}/speech?final=1", EXAMPLE_AUDIO.read_bytes(),
                {"Content-Type": "audio/wav"})
    time.sleep(10.0)  # the speech (5.8 s) reaches every client, HLS included
    for receiver in receivers:
        receiver.keep_frames = False
    return {r.name: av_offset(r, detector) for r in receivers}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--beeps", type=int, default=5)
    args = parser.parse_args()
    from core.landmarks import shared_detector

    detector = shared_detector()
    with tempfile.TemporaryDirectory() as folder:
        app = App(folder)
        rtmp_port = free_port()
        stop = threading.Event()
        try:
            rtmp = Receiver("RTMP")
            threading.Thread(target=pyav_receiver, args=(rtmp, f"rtmp://127.0.0.1:{rtmp_port}/live/key",
                                                         {"listen": "1"}), daemon=True).start()
            time.sleep(0.5)
            session = create_session(app, f"rtmp://127.0.0.1:{rtmp_port}/live/key")
            whep = Receiver("WebRTC")
            threading.Thread(target=whep_receiver, args=(whep, app, session, stop), daemon=True).start()
            hls = Receiver("HLS")
            threading.Thread(target=pyav_receiver, args=(hls, f"{app.url}/hls/{session}/index.m3u8", {}),
                             daemon=True).start()
            receivers = [whep, hls, rtmp]
            time.sleep(8.0)  # every client is receiving (HLS needs its first segments)

            posted = []
            for _ in range(args.beeps):
                before = {r.name: len(r.beeps) for r in receivers}
                posted.append((time.monotonic(), before))
                app.request("POST", f"/api/sessions/{session}/speech?final=1", beep(),
                            {"Content-Type": "audio/L16; rate=16000"})
                time.sleep(6.0)
            delays = {r.name: [] for r in receivers}
            for at, before in posted:
                for r in receivers:
                    later = [b for b in r.beeps[before[r.name]:] if b > at]
                    if later:
                        delays[r.name].append((later[0] - at) * 1000)
            start_offsets = measure_offsets(app, session, receivers, detector)
            remaining = args.minutes * 60 - 60
            end_at = time.monotonic() + max(0.0, remaining)
            while time.monotonic() < end_at:  # mixed idle and speech until the end of the run
                app.request("POST", f"/api/sessions/{session}/speech?final=1", EXAMPLE_AUDIO.read_bytes(),
                            {"Content-Type": "audio/wav"})
                time.sleep(min(20.0, max(0.0, end_at - time.monotonic())))
            end_offsets = measure_offsets(app, session, receivers, detector)
            for r in receivers:
                values = delays[r.name]
                delay = f"{statistics.median(values):6.0f} ms (of {len(values)})" if values else "   n/a"
                print(f"{r.name:6s} delay {delay} | A/V offset minute 0: {start_offsets[r.name]} frames, "
                      f"minute {args.minutes:g}: {end_offsets[r.name]} frames"
                      + (f" | client error: {r.error}" if r.error else ""), flush=True)

            # CPU: WebSocket only vs each output (the session idles and speaks the example every 10 s)
            stop.set()
            app.request("DELETE", f"/api/sessions/{session}")
        finally:
            stop.set()
            app.close()
        cpu_costs(folder)
    print("targets: WebRTC <= 400 ms, HLS <= 3.5 s, RTMP <= 1 s; A/V offset 0 +- 1 frame at both ends")
    return 0


def cpu_costs(folder: str, seconds: float = 20.0) -> None:
    app = App(folder)
    try:
        def measure(setup, rtmp_url: str | None = None) -> float:
            session = create_session(app, rtmp_url) if rtmp_url else create_session_plain(app)
            teardown = setup(session)
            time.sleep(2.0)
            start, cpu = time.monotonic(), app.cpu_seconds()
            while time.monotonic() - start < seconds:
                app.request("POST", f"/api/sessions/{session}/speech?final=1", EXAMPLE_AUDIO.read_bytes(),
                            {"Content-Type": "audio/wav"})
                time.sleep(10.0)
            used = (app.cpu_seconds() - cpu) / (time.monotonic() - start) * 100
            if teardown:
                teardown()
            app.request("DELETE", f"/api/sessions/{session}")
            return used

        base = measure(lambda s: None)
        print(f"CPU of the app with one session (512x512, WebSocket stream): {base:.0f} % of a core")

        def with_hls(session):
            reader = subprocess.Popen([sys.executable, "-c", "import av,sys\nc=av.open(sys.argv[1])\n"
                                       "for p in c.demux(): pass", f"{app.url}/hls/{session}/index.m3u8"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return reader.kill

        def with_whep(session):
            receiver, stop = Receiver("w"), threading.Event()
            threading.Thread(target=whep_receiver, args=(receiver, app, session, stop), daemon=True).start()
            return stop.set

        port = free_port()
        listener = subprocess.Popen([sys.executable, "-c", "import av,sys\nc=av.open(sys.argv[1], "
                                     "options={'listen':'1'})\nfor p in c.demux(): pass",
                                     f"rtmp://127.0.0.1:{port}/live/key"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        rtmp = measure(lambda s: listener.kill, f"rtmp://127.0.0.1:{port}/live/key")
        print(f"CPU + RTMP push: +{rtmp - base:.0f} % of a core")
        print(f"CPU + HLS: +{measure(with_hls) - base:.0f} % of a core")
        print(f"CPU + WebRTC (one peer): +{measure(with_whep) - base:.0f} % of a core")
    finally:
        app.close()


def create_session_plain(app: App) -> str:
    boundary = "----bench"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="p.png"\r\n'
            f"Content-Type: image/png\r\n\r\n".encode() + EXAMPLE_IMAGE.read_bytes()
            + f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="options"\r\n\r\n{{"size": 512}}\r\n'
              f"--{boundary}--\r\n".encode())
    _, _, answer = app.request("POST", "/api/sessions", body,
                               {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return json.loads(answer)["session"]


if __name__ == "__main__":
    sys.exit(main())
