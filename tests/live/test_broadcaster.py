"""The live-frame broadcaster against a real websockets server on port 0 and real clients."""
from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image
from websockets.sync.client import connect

from live.broadcaster import Broadcaster


@pytest.fixture
def broadcaster():
    server = Broadcaster(port=0).start()
    yield server
    server.stop()


def solid(colour, size=(48, 64)) -> np.ndarray:
    frame = np.zeros((*size, 3), np.uint8)
    frame[:] = colour
    return frame


def decode(message: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(message["jpeg"]))).convert("RGB"))


def receive(ws, timeout=5.0) -> dict:
    return json.loads(ws.recv(timeout=timeout))


def receive_until(ws, predicate, timeout=5.0) -> list[dict]:
    """All messages up to and including the first one that matches."""
    seen, deadline = [], time.monotonic() + timeout
    while True:
        message = receive(ws, max(0.01, deadline - time.monotonic()))
        seen.append(message)
        if predicate(message):
            return seen


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def test_binds_localhost_by_default(broadcaster):
    assert broadcaster.host == "127.0.0.1"
    assert broadcaster.port > 0
    assert broadcaster.url == f"ws://127.0.0.1:{broadcaster.port}/"
    with connect(broadcaster.url) as ws:
        hello = receive(ws)
    assert hello["type"] == "hello" and hello["job"] is None


def test_busy_port_gives_a_clear_error(broadcaster):
    with pytest.raises(OSError, match="--ws-port"):
        Broadcaster(port=broadcaster.port).start()


def test_late_joiner_gets_status_progress_and_latest_frame_at_once(broadcaster):
    broadcaster.publish_status("job1", "render", "Rendering frames")
    broadcaster.publish_progress("job1", 3, 10, 1.5)
    broadcaster.publish_frame("job1", 0, 0.0, "preview", solid((255, 0, 0)))
    broadcaster.publish_frame("job1", 1, 0.04, "final", solid((0, 0, 255)))
    wait_for(lambda: broadcaster.frames_encoded + broadcaster.frames_dropped_before_encoding == 2)
    time.sleep(0.05)  # let the loop thread store the encoded frame

    with connect(broadcaster.url) as ws:
        started = time.monotonic()
        messages = [receive(ws) for _ in range(4)]
        elapsed = time.monotonic() - started
    assert [m["type"] for m in messages] == ["hello", "status", "progress", "frame"]
    assert all(m["job"] == "job1" for m in messages)
    assert messages[1]["stage"] == "render" and messages[1]["message"] == "Rendering frames"
    assert (messages[2]["done"], messages[2]["total"], messages[2]["eta_s"]) == (3, 10, 1.5)
    frame = messages[3]
    assert (frame["seq"], frame["quality"], frame["width"], frame["height"]) == (1, "final", 64, 48)
    pixels = decode(frame)
    assert pixels.shape == (48, 64, 3)
    assert pixels[..., 2].mean() > 200 and pixels[..., 0].mean() < 40  # the blue (latest) frame
    assert elapsed < 1.0


def test_late_joiner_after_the_job_finished_gets_done(broadcaster):
    broadcaster.publish_status("job1", "done", "Finished")
    broadcaster.publish_done("job1", "/outputs/job1/video.mp4", 4.2, "lite", 105)
    time.sleep(0.05)
    with connect(broadcaster.url) as ws:
        messages = receive_until(ws, lambda m: m["type"] == "done")
    done = messages[-1]
    assert done == {"type": "done", "job": "job1", "video_url": "/outputs/job1/video.mp4", "duration_s": 4.2,
                    "engine": "lite", "num_frames": 105}


def test_each_frame_is_encoded_once_whatever_the_number_of_viewers(broadcaster):
    with contextlib.ExitStack() as stack:
        viewers = [stack.enter_context(connect(broadcaster.url)) for _ in range(5)]
        for ws in viewers:
            assert receive(ws)["type"] == "hello"
        for seq in range(10):
            broadcaster.publish_frame("job1", seq, seq / 25, "idle", solid((seq * 20, 0, 0)))
            time.sleep(0.02)
        for ws in viewers:
            last = receive_until(ws, lambda m: m["type"] == "frame" and m["seq"] == 9)[-1]
            assert abs(int(decode(last)[..., 0].mean()) - 180) < 8
        assert broadcaster.frames_encoded + broadcaster.frames_dropped_before_encoding == 10
        assert broadcaster.frames_encoded <= 10


def test_frames_sent_ahead_of_their_time_all_arrive_in_order_and_past_ones_give_way(broadcaster):
    from live.clock import StreamClock

    clock = StreamClock()
    broadcaster.open_stream("job1", clock)
    noise = np.random.default_rng(1).integers(0, 256, (384, 384, 3), dtype=np.uint8)  # ~100 kB JPEG each
    with connect(broadcaster.url) as ws:
        receive(ws)
        now = clock.now()
        for seq in range(6):  # a clip's next frames, published at once ahead of their time (a burst of ~600 kB)
            broadcaster.publish_frame("job1", seq, now + 0.04 * seq, "final", noise)
        got = receive_until(ws, lambda m: m["type"] == "frame" and m["seq"] == 5)
        assert [m["seq"] for m in got if m["type"] == "frame"] == list(range(6))
        # frames whose time is long past when they would go out are replaced by the newer ones
        for seq in range(6, 12):
            broadcaster.publish_frame("job1", seq, now - 1.0 + 0.04 * seq, "final", noise)
        got = receive_until(ws, lambda m: m["type"] == "frame" and m["seq"] == 11)
        assert [m["seq"] for m in got if m["type"] == "frame"][-1] == 11


def test_slow_viewer_gets_only_latest_frames_and_never_slows_the_producer(broadcaster):
    noise = np.random.default_rng(0).integers(0, 256, (384, 384, 3), dtype=np.uint8)  # ~100 kB JPEG each
    fast_received: list[dict] = []

    # A slow viewer: a raw TCP socket that completes the handshake and then does not read at all.
    # A small receive buffer keeps the kernel from absorbing megabytes of frames on its behalf.
    slow = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    slow.connect(("127.0.0.1", broadcaster.port))
    slow.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    assert b"101" in slow.recv(4096).split(b"\r\n")[0]

    with connect(broadcaster.url) as fast:
        receive(fast)
        wait_for(lambda: broadcaster.viewer_count == 2)

        def read_fast():
            while True:
                message = receive(fast, 10)
                fast_received.append(message)
                if message["type"] == "frame" and message["seq"] == 299:
                    return

        reader = threading.Thread(target=read_fast)
        reader.start()
        started = time.monotonic()
        for seq in range(300):
            frame = noise.copy()
            frame[:8, :8] = seq % 256
            broadcaster.publish_frame("job1", seq, seq / 25, "final", frame)
            time.sleep(0.004)
        publish_time = time.monotonic() - started
        reader.join(20)
        assert not reader.is_alive(), "the fast viewer did not get the last frame"

    # Publishing never waited for the stalled viewer: 300 calls with 4 ms sleeps take ~1.2 s.
    assert publish_time < 3.0
    # The fast viewer got frames in order and the very last one.
    seqs = [m["seq"] for m in fast_received if m["type"] == "frame"]
    assert seqs == sorted(seqs) and seqs[-1] == 299
    # The stalled viewer holds at most one queued message per kind at the server, however far behind it is.
    wait_for(lambda: broadcaster.viewer_count == 1)
    assert all(len(viewer.pending) <= 1 for viewer in list(broadcaster._viewers))

    # When the slow viewer finally reads, it catches up to the latest frame instead of replaying all 300.
    slow.settimeout(5)
    data = b""
    deadline = time.monotonic() + 10
    while b'"seq":299' not in data and time.monotonic() < deadline:
        data += slow.recv(1 << 20)
    slow.close()
    assert b'"seq":299' in data
    assert data.count(b'"type":"frame"') < 150


def test_malformed_client_messages_are_ignored_and_logged_at_most_once_a_second(broadcaster, caplog):
    caplog.set_level(logging.WARNING, logger="live.broadcaster")
    with connect(broadcaster.url) as ws:
        receive(ws)
        bad_ones = ["not json", "[1, 2]", '{"no": "type"}', '{"type": 5}', '{"type": "follow", "job": 5}',
                    b"\xff\xfe\x00binary"] * 50
        for bad in bad_ones:
            ws.send(bad)
        ws.send('{"type": "ping"}')
        assert receive(ws)["type"] == "pong"  # still connected and answering after all that
        time.sleep(1.05)
        ws.send("still not json")
        ws.send('{"type": "ping"}')
        assert receive(ws)["type"] == "pong"
        broadcaster.publish_status("job1", "idle", "Animating the face")
        assert receive(ws)["type"] == "status"
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "malformed" in r.getMessage()]
    assert len(lines) == 2, lines  # 301 bad messages, two lines: the first, then one a second later with a count
    assert f"(and {len(bad_ones) - 1} more like it)" in lines[1]


def test_two_jobs_at_once_never_mix_frames(broadcaster):
    red, blue = solid((255, 0, 0)), solid((0, 0, 255))
    with contextlib.ExitStack() as stack:
        follow1, follow2, latest = (stack.enter_context(connect(broadcaster.url)) for _ in range(3))
        for ws in (follow1, follow2, latest):
            receive(ws)
        follow1.send(json.dumps({"type": "follow", "job": "job1"}))
        follow2.send(json.dumps({"type": "follow", "job": "job2"}))
        assert receive(follow1) == {"type": "hello", "job": "job1", "protocol": 2, "following": "job"}
        assert receive(follow2)["job"] == "job2"

        broadcaster.publish_status("job1", "idle", "one")
        time.sleep(0.05)
        broadcaster.publish_status("job2", "idle", "two")  # job2 is now the latest job
        time.sleep(0.05)

        def produce(job, colour):
            for seq in range(40):
                broadcaster.publish_frame(job, seq, seq / 25, "preview", colour)
                time.sleep(0.005)
            broadcaster.publish_done(job, f"/outputs/{job}/video.mp4", 1.6, "lite", 40)

        threads = [threading.Thread(target=produce, args=("job1", red)),
                   threading.Thread(target=produce, args=("job2", blue))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        got1 = receive_until(follow1, lambda m: m["type"] == "done")
        got2 = receive_until(follow2, lambda m: m["type"] == "done")
        got_latest = receive_until(latest, lambda m: m["type"] == "done" and m["job"] == "job2")
    assert {m["job"] for m in got1} == {"job1"}
    assert {m["job"] for m in got2} == {"job2"}
    for m in got1:
        if m["type"] == "frame":
            assert decode(m)[..., 0].mean() > 200 and decode(m)[..., 2].mean() < 40
    for m in got2:
        if m["type"] == "frame":
            assert decode(m)[..., 2].mean() > 200 and decode(m)[..., 0].mean() < 40
    # The latest-job viewer switched to job2 when it started and saw nothing of job1 after that.
    switch = next(i for i, m in enumerate(got_latest) if m["job"] == "job2")
    assert all(m["job"] == "job2" for m in got_latest[switch:])
    assert any(m["type"] == "frame" for m in got_latest[switch:])


def test_follow_a_job_that_starts_later_and_back_to_latest(broadcaster):
    with connect(broadcaster.url) as ws:
        receive(ws)
        ws.send(json.dumps({"type": "follow", "job": "future"}))
        assert receive(ws)["job"] == "future"
        broadcaster.publish_status("other", "idle", "not followed")
        broadcaster.publish_status("future", "idle", "followed")
        assert receive(ws)["message"] == "followed"
        ws.send(json.dumps({"type": "follow", "job": None}))
        hello = receive(ws)
        assert hello["following"] == "latest" and hello["job"] == "future"


def test_following_the_stream_already_playing_sends_its_speech_only_once(broadcaster):
    # The page's player follows the latest stream; when a job starts the page also tells it to follow that job:
    # the speech it has scheduled must not come again (it would be heard twice).
    from live.clock import StreamClock

    broadcaster.open_stream("job1", StreamClock())
    pcm = np.zeros(3200, dtype=np.int16)
    with connect(broadcaster.url) as ws:
        receive(ws)
        broadcaster.publish_audio("job1", 0.0, pcm)
        broadcaster.publish_audio("job1", 0.2, pcm)
        receive_until(ws, lambda m: m["type"] == "audio" and m["t"] == pytest.approx(0.2))
        ws.send(json.dumps({"type": "follow", "job": "job1"}))
        hello = receive(ws)
        assert hello["type"] == "hello" and hello["job"] == "job1" and hello["following"] == "job"
        broadcaster.publish_audio("job1", 0.4, pcm)
        after = receive_until(ws, lambda m: m["type"] == "audio")
        assert [m["t"] for m in after if m["type"] == "audio"] == pytest.approx([0.4])
        ws.send(json.dumps({"type": "follow", "job": "job2"}))  # another stream: its hello and its state
        assert receive(ws)["job"] == "job2"


def test_speech_is_queued_in_order_and_a_late_joiner_gets_the_clock_and_the_speech_from_now_on(broadcaster):
    from live.clock import StreamClock

    clock = StreamClock()
    broadcaster.open_stream("job1", clock)
    pcm = np.arange(3200, dtype=np.int16)
    with connect(broadcaster.url) as early:
        receive(early)
        for k in range(20):  # 4 s of speech published at once (a producer sends it ahead): nothing coalesced
            broadcaster.publish_audio("job1", k * 0.2, pcm)
        got = receive_until(early, lambda m: m["type"] == "audio" and m["t"] == pytest.approx(3.8))
        speech = [m for m in got if m["type"] == "audio"]
        assert [m["t"] for m in speech] == pytest.approx([k * 0.2 for k in range(20)])
        assert all(m["now"] == pytest.approx(clock.now(), abs=0.5) for m in speech)
        assert np.array_equal(np.frombuffer(base64.b64decode(speech[3]["pcm"]), "<i2"), pcm)
    clock.origin -= 1.3  # the stream has been running for 1.3 s more: its speech up to 1.2 s is over
    with connect(broadcaster.url) as late:
        assert receive(late)["type"] == "hello"
        sync = receive(late)
        assert sync["type"] == "clock" and sync["now"] == pytest.approx(clock.now(), abs=0.2)
        got = receive_until(late, lambda m: m["type"] == "audio" and m["t"] == pytest.approx(3.8))
        heard = [m["t"] for m in got if m["type"] == "audio"]
    assert heard[0] <= sync["now"] < heard[0] + 0.2 + 0.05 and heard == sorted(heard)


def test_other_origins_are_refused_with_a_reason_and_the_apps_page_may_watch():
    from websockets.exceptions import InvalidStatus

    server = Broadcaster(port=0, app_port=7860, allowed_origins={"https://my.site"}).start()
    try:
        with pytest.raises(InvalidStatus) as refused:
            connect(server.url, origin="http://evil.example").close()
        assert refused.value.response.status_code == 403
        assert b"may not watch" in refused.value.response.body
        for origin in ("http://127.0.0.1:7860", "https://my.site"):
            with connect(server.url, origin=origin) as ws:
                assert receive(ws)["type"] == "hello"
        with pytest.raises(InvalidStatus):  # the right host on another port is another origin
            connect(server.url, origin="http://127.0.0.1:9999").close()
        with connect(server.url) as ws:  # a script (no Origin) on this computer
            assert receive(ws)["type"] == "hello"
    finally:
        server.stop()


def test_a_token_is_required_when_set_and_the_viewer_cap_refuses_with_a_message():
    from websockets.exceptions import InvalidStatus

    server = Broadcaster(port=0, token="s3cret", max_viewers=2).start()
    try:
        with pytest.raises(InvalidStatus) as refused:
            connect(server.url).close()
        assert refused.value.response.status_code == 403 and b"token" in refused.value.response.body
        with connect(server.url + "?token=s3cret") as first, connect(server.url + "?token=s3cret") as second:
            receive(first), receive(second)
            with pytest.raises(InvalidStatus) as full:
                connect(server.url + "?token=s3cret").close()
            assert full.value.response.status_code == 503 and b"full" in full.value.response.body
        assert server.refused == 2
    finally:
        server.stop()


def handshake_status(port: int, host_header: str, origin: str) -> tuple[int, bytes]:
    """A browser's WebSocket handshake sent by hand (to set Host as a browser would after a DNS change)."""
    request = (f"GET / HTTP/1.1\r\nHost: {host_header}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
               f"Origin: {origin}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = sock.recv(4096)
            if not chunk:
                break
            response += chunk
        with contextlib.suppress(OSError):
            response += sock.recv(4096)
    return int(response.split()[1]), response


def test_a_site_whose_name_points_at_this_computer_may_not_watch():
    # DNS rebinding: evil.example resolves to 127.0.0.1, so its page and the dialled host agree -- but an app on
    # this computer only is reached by the names of this computer.
    server = Broadcaster(port=0, app_port=7860).start()
    try:
        status, body = handshake_status(server.port, f"evil.example:{server.port}", "http://evil.example:7860")
        assert status == 403 and b"may not watch" in body
        status, _ = handshake_status(server.port, f"localhost:{server.port}", "http://localhost:7860")
        assert status == 101
    finally:
        server.stop()
