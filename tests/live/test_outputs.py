"""Standard live outputs with real parts: WHEP with aiortc as the client, HLS read by ffmpeg, RTMP pushed to a local
``ffmpeg -listen 1`` receiver that goes away and comes back."""
from __future__ import annotations

import asyncio
import subprocess
import time

import numpy as np
import pytest

from core.audio import ffmpeg_exe, load_audio
from support.live_server import Server
from support.paths import EXAMPLE_AUDIO, free_port


@pytest.fixture
def server(tmp_path):
    server = Server(tmp_path)
    yield server
    server.close()


def speak_example(server, session: str) -> None:
    response = server.http.post(f"/api/sessions/{session}/speech?final=1", content=EXAMPLE_AUDIO.read_bytes(),
                                headers={"Content-Type": "audio/wav"})
    assert response.status_code == 202, response.text


def streams_of(path: str) -> tuple[str, float]:
    """ffmpeg's description of a media file and its duration in seconds."""
    info = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", path], capture_output=True, text=True).stderr
    duration = 0.0
    if "Duration: " in info and "N/A" not in info.split("Duration: ")[1][:11]:
        h, m, s = info.split("Duration: ")[1].split(",")[0].split(":")
        duration = int(h) * 3600 + int(m) * 60 + float(s)
    return info, duration


def receiver(port: int, out: str, seconds: float, wait_s: int = 20) -> subprocess.Popen:
    """A local RTMP server that records what it receives (stream copy) for ``seconds``."""
    return subprocess.Popen([ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-listen", "1", "-timeout", str(wait_s),
                             "-i", f"rtmp://127.0.0.1:{port}/live/key", "-t", str(seconds), "-c", "copy", out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_whep_gives_video_and_opus_audio_of_the_stream_and_bad_requests_are_refused(server):
    from aiortc import RTCPeerConnection, RTCSessionDescription

    session = server.create({"size": 256})["session"]
    speak_example(server, session)

    async def watch():
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        tracks = {}
        pc.on("track", lambda track: tracks.setdefault(track.kind, track))
        await pc.setLocalDescription(await pc.createOffer())
        response = await asyncio.to_thread(server.http.post, f"/whep/{session}", content=pc.localDescription.sdp,
                                           headers={"Content-Type": "application/sdp"})
        assert response.status_code == 201, response.text
        assert response.headers["content-type"].startswith("application/sdp")
        location = response.headers["location"]
        assert location.startswith(f"/whep/{session}/")
        answer = response.text
        assert "m=video" in answer and "m=audio" in answer and "opus" in answer.lower()
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        for _ in range(100):
            if {"video", "audio"} <= set(tracks):
                break
            await asyncio.sleep(0.05)
        video = [await asyncio.wait_for(tracks["video"].recv(), 10) for _ in range(25)]
        audio = [await asyncio.wait_for(tracks["audio"].recv(), 10) for _ in range(50)]
        await pc.close()
        return location, video, audio

    location, video, audio = asyncio.run(watch())
    assert video[-1].width == 256 and video[-1].height == 256
    pixels = video[-1].to_ndarray(format="rgb24")
    assert pixels.std() > 10  # the face, not a blank frame
    loud = max(float(np.abs(frame.to_ndarray()).max()) for frame in audio)
    assert loud > 1000  # the speech is in the Opus track (int16 scale)
    assert server.http.delete(location).status_code in (200, 404)  # the peer may already be gone after close()

    assert server.http.post(f"/whep/{session}", content="hello", headers={"Content-Type": "application/sdp"}
                            ).status_code == 400
    assert server.http.post("/whep/no-such-stream", content="v=0\r\nm=video 9",
                            headers={"Content-Type": "application/sdp"}).status_code == 404
    assert server.http.post("/whip/no-such-session", content="v=0").status_code == 404
    assert server.http.delete("/whep/x/not-a-peer").status_code == 404


def test_hls_serves_h264_and_aac_segments_of_a_second_in_a_bounded_window(server, tmp_path):
    session = server.create({"size": 256})["session"]
    speak_example(server, session)
    playlist = server.http.get(f"/hls/{session}/index.m3u8")
    assert playlist.status_code == 200 and "#EXTM3U" in playlist.text
    assert "application/vnd.apple.mpegurl" in playlist.headers["content-type"]
    out = tmp_path / "hls.ts"
    read = subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-i",
                           f"{server.url}/hls/{session}/index.m3u8", "-t", "4", "-c", "copy", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert read.returncode == 0, read.stderr
    info, duration = streams_of(str(out))
    assert "Video: h264" in info and "Audio: aac" in info and duration >= 2.5, info
    targets = [line for line in playlist.text.splitlines() if line.startswith("#EXT-X-TARGETDURATION")]
    assert targets and int(targets[0].split(":")[1]) <= 1
    time.sleep(9)  # the window moves on: old segments are deleted, the folder stays small
    segments = list((tmp_path / "hls" / session).glob("*.ts"))
    assert 0 < len(segments) <= 9
    assert server.http.delete(f"/api/sessions/{session}").status_code == 200
    time.sleep(0.5)
    assert not (tmp_path / "hls" / session).exists()  # removed when the stream ends
    assert server.http.get(f"/hls/{session}/index.m3u8").status_code == 404


def test_rtmp_push_is_continuous_h264_and_aac_and_comes_back_after_the_server_drops(server, tmp_path):
    port = free_port()
    first = tmp_path / "first.flv"
    listener = receiver(port, str(first), 5)
    time.sleep(0.5)
    session = server.create({"size": 256}, rtmp_url=f"rtmp://127.0.0.1:{port}/live/key")["session"]
    speak_example(server, session)
    listener.wait(30)
    info, duration = streams_of(str(first))
    assert "Video: h264" in info and "Audio: aac" in info and duration >= 4.0, info
    sound = load_audio(str(first), max_seconds=60)
    assert np.abs(sound).max() > 0.1  # the speech went out in the same stream

    # the receiver is gone: the push retries with back-off; a new receiver gets the stream again
    time.sleep(2.0)
    second = tmp_path / "second.flv"
    listener = receiver(port, str(second), 3, wait_s=60)  # the push retries after 1, 2, 4, 8 ... s
    listener.wait(90)
    info, duration = streams_of(str(second))
    assert "Video: h264" in info and "Audio: aac" in info and duration >= 2.0, info
    state = server.http.get(f"/api/sessions/{session}").json()
    assert state["rtmp"]["connects"] >= 2 and state["state"] in ("idle", "speaking")
    bad = server.http.post("/api/sessions", files={"image": ("p.png", open(EXAMPLE_AUDIO.parent / "portrait.png",
                                                                                "rb"), "image/png")},
                           data={"rtmp_url": "http://not-rtmp/"})
    assert bad.status_code == 400 and "rtmp://" in bad.json()["error"]


def test_whip_speech_from_a_webrtc_client_is_spoken_by_the_session(server):
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from aiortc.contrib.media import MediaPlayer

    session = server.create({"size": 128})["session"]

    async def send():
        pc = RTCPeerConnection()
        player = MediaPlayer(str(EXAMPLE_AUDIO))  # a file as the microphone, played at real time
        pc.addTrack(player.audio)
        await pc.setLocalDescription(await pc.createOffer())
        response = await asyncio.to_thread(server.http.post, f"/whip/{session}", content=pc.localDescription.sdp,
                                           headers={"Content-Type": "application/sdp"})
        assert response.status_code == 201, response.text
        assert response.headers["location"].startswith(f"/whip/{session}/")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=response.text, type="answer"))
        for _ in range(100):
            if server.sessions.get(session).stats.speech_frames > 50:
                break
            await asyncio.sleep(0.1)
        await pc.close()

    asyncio.run(send())
    assert server.sessions.get(session).stats.speech_frames > 50  # two seconds of the microphone were spoken
    no_audio = "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"
    response = server.http.post(f"/whip/{session}", content=no_audio, headers={"Content-Type": "application/sdp"})
    assert response.status_code == 400 and "audio" in response.json()["error"]


def test_the_pages_rtmp_push_follows_each_new_job_in_one_continuous_stream(tmp_path):
    """``serve --rtmp-url``: one FLV stream across jobs, the newest job's picture and speech, idle in between."""
    from live.broadcaster import Broadcaster
    from live.job import Job
    from live.outputs import PageRtmpOutput
    from live.stream import StreamHub
    from core.options import Options
    from support.scripted import ScriptedEngine, ScriptedIdle

    port = free_port()
    received = tmp_path / "page.flv"
    listener = receiver(port, str(received), 30)
    time.sleep(0.5)
    broadcaster = Broadcaster(port=0).start()
    hub = StreamHub(broadcaster)
    push = PageRtmpOutput(hub, f"rtmp://127.0.0.1:{port}/live/key")
    image = tmp_path / "face.png"
    from PIL import Image

    Image.fromarray(np.random.default_rng(1).integers(0, 255, (80, 64, 3), dtype=np.uint8)).save(image)
    try:
        for run in range(2):  # two jobs one after the other, each with the example's speech
            out = tmp_path / f"job{run}"
            out.mkdir()
            job = Job(f"job{run}", ScriptedEngine(final_fps=300, motion_delay_s=0.05), str(image), str(EXAMPLE_AUDIO),
                      Options(output=str(out / "video.mp4")), str(out), None, broadcaster, ScriptedIdle, hub)
            job.start()
            assert job.wait(30)
        assert push.connects == 1  # one stream from the first job through the second: never reconnected
        push.close()  # the receiver's recording ends with the stream
        listener.wait(60)
    finally:
        push.close()
        hub.close_all()
        broadcaster.stop()
    info, duration = streams_of(str(received))
    assert "Video: h264" in info and "Audio: aac" in info and duration >= 8.0, info
    sound = load_audio(str(received), max_seconds=60)
    frames = sound[:sound.size // 640 * 640].reshape(-1, 640)
    speaking = np.abs(frames).max(axis=1) > 0.05
    assert speaking.mean() > 0.5, speaking.mean()  # most of the time one of the jobs spoke, in one stream
