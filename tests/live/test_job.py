"""The live session's display policy, progress, errors and cancelling, seen by a real viewer over WebSocket.

The engine is the pace-controlled ScriptedEngine (conftest.py): it lets a test make the final renderer slower or
faster than real time, which is what the policy is about. Frames carry their index in the red channel and their
kind in the colour (grey idle, green preview, blue final), so the test checks what the viewer was actually shown.
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import subprocess
import threading
import time

import numpy as np
import psutil
import pytest
from PIL import Image
from websockets.sync.client import connect

from support.scripted import ScriptedEngine, ScriptedIdle, decode_code
from live.broadcaster import Broadcaster
from live.engines import choose_engine
from live.console import run_headless
from live.job import FRAME_LEAD_S, Job
from live.studio import Studio, new_job_id
from core.audio import ffmpeg_exe, write_wav
from core.errors import InputError
from core.options import Options
from sadtalker.synthetic import FILES_256


@pytest.fixture
def broadcaster():
    server = Broadcaster(port=0).start()
    yield server
    server.stop()


@pytest.fixture
def inputs(tmp_path):
    image = tmp_path / "face.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (80, 64, 3), dtype=np.uint8)).save(image)
    audio = tmp_path / "speech.wav"
    t = np.arange(16000 * 2) / 16000
    write_wav(str(audio), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32))
    return str(image), str(audio)


class Recorder:
    """A viewer in a thread: keeps every message (frames decoded to their kind and index)."""

    def __init__(self, url: str):
        self.messages: list[dict] = []
        self._stack = contextlib.ExitStack()
        self._ws = self._stack.enter_context(connect(url))
        assert json.loads(self._ws.recv(timeout=5))["type"] == "hello"
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            while True:
                message = json.loads(self._ws.recv())
                message["received_at"] = time.monotonic()
                if message["type"] == "frame":
                    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(message.pop("jpeg")))).convert("RGB"))
                    red, green, blue = (float(pixels[..., c].mean()) for c in range(3))
                    message["kind"] = "idle" if abs(green - 128) < 20 and abs(blue - 128) < 20 else (
                        "preview" if green > 150 else "final")
                    message["code"] = decode_code(red)
                    message["blue"] = blue
                self.messages.append(message)
        except Exception:
            pass

    def wait_for(self, predicate, timeout=20.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in list(self.messages):
                if predicate(message):
                    return message
            time.sleep(0.02)
        raise AssertionError(f"no matching message; got types {[m['type'] for m in self.messages][-20:]}")

    def frames(self):
        """The frames as a viewer shows them: a later frame for the same moment (the final one for a preview sent
        ahead) replaces the earlier one."""
        shown: dict[float, dict] = {}
        for m in self.messages:
            if m["type"] == "frame":
                shown.pop(round(m["t"], 3), None)
                shown[round(m["t"], 3)] = m
        return sorted(shown.values(), key=lambda m: (m["t"], m["seq"]))

    def close(self):
        self._stack.close()


def start_job(engine, inputs, broadcaster, tmp_path, options=Options()) -> Job:
    job_id = new_job_id()
    out_dir = tmp_path / "outputs" / job_id
    out_dir.mkdir(parents=True)
    options = Options(**{**options.__dict__, "output": str(out_dir / "video.mp4")})
    return Job(job_id, engine, inputs[0], inputs[1], options, str(out_dir), f"/outputs/{job_id}/video.mp4",
               broadcaster, idle_animator_factory=ScriptedIdle).start()


def mp4_streams(path: str) -> str:
    return subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", path], capture_output=True, text=True).stderr


def count_frames(path: str) -> int:
    proc = subprocess.run([ffmpeg_exe(), "-i", path, "-map", "0:v:0", "-c", "copy", "-f", "null", "-"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stderr.rsplit("frame=", 1)[1].split()[0])


def kinds_in_order(frames) -> list[str]:
    runs = []
    for frame in frames:
        if not runs or runs[-1] != frame["kind"]:
            runs.append(frame["kind"])
    return runs


def played_once_in_order(frames: list[dict], num_frames: int = 50) -> bool:
    """The clip's frames in order, each at most once (never looped); a busy CPU may skip a few, not more."""
    indices = [round((f["t"] - frames[0]["t"]) * 25) for f in frames]
    codes_match = all(f["code"] == i % 40 for f, i in zip(frames, indices))
    return (codes_match and indices == sorted(set(indices)) and indices[0] == 0 and indices[-1] == num_frames - 1
            and len(indices) >= 0.9 * num_frames)


def audio_of(messages) -> list[dict]:
    return [m for m in messages if m["type"] == "audio"]


def samples_of(message: dict) -> int:
    return len(base64.b64decode(message["pcm"])) // 2


def playbacks(audio: list[dict]) -> list[tuple[float, float, int]]:
    """(start t, end t, samples) of each run of contiguous speech messages."""
    runs: list[list] = []
    for m in audio:
        end = m["t"] + samples_of(m) / 16000
        if runs and abs(m["t"] - runs[-1][1]) < 1e-3:
            runs[-1][1], runs[-1][2] = end, runs[-1][2] + samples_of(m)
        else:
            runs.append([m["t"], end, samples_of(m)])
    return [tuple(run) for run in runs]


def test_a_fast_renderer_plays_its_final_frames_once_at_real_time_with_the_speech(broadcaster, inputs, tmp_path):
    viewer = Recorder(broadcaster.url)
    engine = ScriptedEngine(final_fps=300, motion_delay_s=0.05)  # 50 frames for the 2 s of speech
    job = start_job(engine, inputs, broadcaster, tmp_path)
    viewer.wait_for(lambda m: m["type"] == "status" and m["stage"] == "finished", timeout=15)
    viewer.close()
    frames = viewer.frames()
    played = [f for f in frames if f["kind"] != "idle"]
    assert kinds_in_order(frames)[-1] == "final" and len(kinds_in_order(played)) <= 2  # at most preview -> final
    assert played_once_in_order(played), [f["code"] for f in played]  # never looped
    # one clock: frame i sits at t0 + i / 25, and it is sent as its time comes (at most FRAME_LEAD_S before it, so
    # a viewer has it at hand when its time comes): paced at real time, never flashed through
    t0 = played[0]["t"]
    assert all(abs((f["t"] - t0) * 25 - round((f["t"] - t0) * 25)) < 0.03 for f in played)  # on the frame grid
    span = played[-1]["received_at"] - played[0]["received_at"]
    assert span >= played[-1]["t"] - t0 - FRAME_LEAD_S - 0.02, span
    assert all(f["now"] >= f["t"] - FRAME_LEAD_S - 1e-3 for f in played)
    assert max(f["t"] - f["now"] for f in played) > FRAME_LEAD_S / 2  # and ahead of their time: not late
    # the speech covers the clip exactly once, in order, in pieces of at most 200 ms, starting with frame 0
    speech = audio_of(viewer.messages)
    assert all(m["sample_rate"] == 16000 and m["channels"] == 1 and m["format"] == "s16le" for m in speech)
    assert all(samples_of(m) <= 3200 for m in speech)
    assert playbacks(speech) == [(t0, pytest.approx(t0 + 2.0, abs=1e-3), 32000)]
    # each piece arrives ahead of the frames it belongs to
    first_frame_at = {round(f["t"], 3): f["received_at"] for f in played}
    for m in speech:
        frame_at = first_frame_at.get(round(m["t"], 3))
        assert frame_at is None or m["received_at"] < frame_at
    # the mp4 is offered as soon as it is written, before the live playback ends
    done_at = next(m["received_at"] for m in viewer.messages if m["type"] == "done")
    assert done_at < played[-1]["received_at"] - 1.0
    assert job.wait(5) and count_frames(job.snapshot().video_path) == 50


def test_a_quick_start_engine_plays_its_motion_at_once_and_the_idle_animation_is_made_only_if_needed(
        broadcaster, inputs, tmp_path):
    made = []

    def idle_factory(rgb):
        made.append(time.monotonic())
        return ScriptedIdle(rgb)

    viewer = Recorder(broadcaster.url)
    # its motion comes in 50 ms: the job starts it at once and does not compete with it to make the idle animation
    engine = ScriptedEngine(final_fps=300, motion_delay_s=0.05, quick_start=True)
    job_id = new_job_id()
    out_dir = tmp_path / "outputs" / job_id
    out_dir.mkdir(parents=True)
    job = Job(job_id, engine, inputs[0], inputs[1], Options(output=str(out_dir / "video.mp4")), str(out_dir),
              f"/outputs/{job_id}/video.mp4", broadcaster, idle_animator_factory=idle_factory).start()
    viewer.wait_for(lambda m: m["type"] == "status" and m["stage"] == "finished", timeout=15)
    viewer.close()
    frames = viewer.frames()
    assert frames and frames[0]["kind"] != "idle" and not made  # the clip's own frames first; no idle was made
    assert played_once_in_order(frames), [f["code"] for f in frames]
    assert job.wait(5)
    # a quick engine whose motion does not come within the head start still gets the idle animation
    slow = ScriptedEngine(final_fps=300, motion_delay_s=1.0, quick_start=True)
    viewer = Recorder(broadcaster.url)
    job = start_job(slow, inputs, broadcaster, tmp_path)
    viewer.wait_for(lambda m: m["type"] == "status" and m["stage"] == "finished" and m["job"] == job.id, timeout=15)
    viewer.close()
    assert [f for f in viewer.frames() if f["job"] == job.id][0]["kind"] == "idle"
    assert job.wait(5)


def test_a_slow_renderer_plays_the_preview_once_then_renders_silently_then_plays_the_video(broadcaster, inputs,
                                                                                           tmp_path):
    viewer = Recorder(broadcaster.url)
    engine = ScriptedEngine(final_fps=12, motion_delay_s=0.2)  # 50 frames in ~4 s: slower than real time
    job = start_job(engine, inputs, broadcaster, tmp_path)
    viewer.wait_for(lambda m: m["type"] == "status" and m["stage"] == "finished", timeout=30)
    viewer.close()
    frames = viewer.frames()
    assert kinds_in_order(frames) == ["idle", "preview", "final"]
    preview = [f for f in frames if f["kind"] == "preview"]
    assert played_once_in_order(preview), [f["code"] for f in preview]  # once, at real time, never looped
    stages = [m["stage"] for m in viewer.messages if m["type"] == "status"]
    phases = [s for s in stages if s in ("playing", "rendering", "replay", "finished")]
    assert phases == ["playing", "rendering", "replay", "finished"], stages
    # speech twice: with the preview, then with the finished video; silence while it renders
    speech = playbacks(audio_of(viewer.messages))
    assert [run[2] for run in speech] == [32000, 32000]
    assert speech[0][0] == preview[0]["t"]
    replay_start = speech[1][0]
    assert replay_start > speech[0][1] + 0.5
    rendering = [f for f in frames if f["kind"] == "final" and speech[0][1] <= f["t"] < replay_start]
    replay = [f for f in frames if f["kind"] == "final" and f["t"] >= replay_start - 1e-3]
    assert rendering and len({f["code"] for f in rendering}) > 3  # the newest final frames as they come
    assert played_once_in_order(replay) and replay[0]["t"] == replay_start
    assert job.snapshot().state == "done"


def test_a_viewer_that_joins_mid_way_hears_from_the_current_position(broadcaster, tmp_path):
    image = tmp_path / "face.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (80, 64, 3), dtype=np.uint8)).save(image)
    audio = tmp_path / "speech.wav"
    write_wav(str(audio), (0.3 * np.sin(2 * np.pi * 220 * np.arange(16000 * 4) / 16000)).astype(np.float32))
    job = start_job(ScriptedEngine(final_fps=300, motion_delay_s=0.05), (str(image), str(audio)), broadcaster, tmp_path)
    early = Recorder(broadcaster.url)
    early.wait_for(lambda m: m["type"] == "audio")
    time.sleep(1.5)
    late = Recorder(broadcaster.url)
    joined = job.clock.now()
    late.wait_for(lambda m: m["type"] == "audio")
    assert job.wait(10)
    early.close(), late.close()
    clock = next(m for m in late.messages if m["type"] == "clock")
    assert abs(clock["now"] - joined) < 0.2
    heard = audio_of(late.messages)
    first = heard[0]
    assert first["t"] <= clock["now"] < first["t"] + samples_of(first) / 16000 + 0.05  # the piece playing now
    start, end, samples = playbacks(heard)[0]  # ... and everything after it, contiguous, to the end
    assert end == pytest.approx(playbacks(audio_of(early.messages))[0][1], abs=1e-3)
    assert samples < 4 * 16000 - 1.2 * 16000


def test_cancel_closes_the_engine_stops_ffmpeg_and_leaves_no_file(broadcaster, inputs, tmp_path):
    viewer = Recorder(broadcaster.url)
    engine = ScriptedEngine(num_frames=500, final_fps=40, motion_delay_s=0.05)
    job = start_job(engine, inputs, broadcaster, tmp_path)
    viewer.wait_for(lambda m: m["type"] == "frame" and m["kind"] == "final")
    assert any(p.name().startswith("ffmpeg") for p in psutil.Process().children(recursive=True))
    job.cancel()
    assert job.wait(5)
    assert engine.closed
    assert not os.path.exists(job.out_dir)
    assert not any(p.name().startswith("ffmpeg") for p in psutil.Process().children(recursive=True))
    status = viewer.wait_for(lambda m: m["type"] == "status" and m["stage"] == "cancelled")
    assert status["job"] == job.id
    assert job.snapshot().state == "cancelled"
    time.sleep(0.2)
    assert not any(m["type"] in ("done", "error") for m in viewer.messages)
    viewer.close()


def test_a_user_error_from_the_engine_is_reported_and_nothing_is_kept(broadcaster, inputs, tmp_path):
    viewer = Recorder(broadcaster.url)
    engine = ScriptedEngine(num_frames=50, fail_at=5, error=InputError("The audio is silent. Record some speech."))
    job = start_job(engine, inputs, broadcaster, tmp_path)
    error = viewer.wait_for(lambda m: m["type"] == "error")
    assert error == {**error, "job": job.id, "message": "The audio is silent. Record some speech."}
    assert job.wait(5)
    snap = job.snapshot()
    assert (snap.state, snap.user_error, snap.error) == ("error", True, "The audio is silent. Record some speech.")
    assert not os.path.exists(job.out_dir)
    assert engine.closed
    viewer.close()


def test_an_unexpected_engine_failure_is_logged_with_its_traceback(broadcaster, inputs, tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="live.job")
    engine = ScriptedEngine(num_frames=50, fail_at=3, error=ZeroDivisionError("division by zero"))
    job = start_job(engine, inputs, broadcaster, tmp_path)
    assert job.wait(10)
    snap = job.snapshot()
    assert snap.state == "error" and not snap.user_error
    assert "ZeroDivisionError" in snap.error and "server log" in snap.error
    assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records)


def test_not_an_image_fails_fast_with_a_clear_message(broadcaster, inputs, tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not a picture")
    engine = ScriptedEngine(num_frames=50)
    started = time.monotonic()
    job = start_job(engine, (str(not_image), inputs[1]), broadcaster, tmp_path)
    assert job.wait(5)
    assert time.monotonic() - started < 3
    snap = job.snapshot()
    assert snap.state == "error" and snap.user_error and "Could not read the image" in snap.error


def test_progress_counts_frames_and_the_eta_follows_the_measured_rate(broadcaster, inputs, tmp_path):
    viewer = Recorder(broadcaster.url)
    engine = ScriptedEngine(num_frames=75, final_fps=25, motion_delay_s=0.05)
    start_job(engine, inputs, broadcaster, tmp_path)
    viewer.wait_for(lambda m: m["type"] == "done")
    viewer.close()
    render = [m for m in viewer.messages if m["type"] == "progress" and m["stage"] == "render"]
    assert render[-1]["done"] == render[-1]["total"] == 75
    middle = [m for m in render if 30 <= m["done"] <= 45 and m["eta_s"] is not None]
    assert middle, render
    for m in middle:  # 25 frames per second: the remaining frames take (75 - done) / 25 s
        assert abs(m["eta_s"] - (75 - m["done"]) / 25) < 0.6, m
    assert len(render) < 40  # throttled to ~10 per second, not one per frame


def test_a_slow_engine_gets_an_eta_from_its_first_frame(broadcaster, inputs, tmp_path):
    viewer = Recorder(broadcaster.url)
    # 0.25 s a frame, like a slow renderer whose first frame comes well after the motion
    engine = ScriptedEngine(num_frames=6, final_fps=4, motion_delay_s=0.05, first_frame_delay_s=0.25)
    start_job(engine, inputs, broadcaster, tmp_path)
    viewer.wait_for(lambda m: m["type"] == "done")
    viewer.close()
    first = next(m for m in viewer.messages if m["type"] == "progress" and m["done"] == 1)
    assert first["eta_s"] is not None and 0.8 < first["eta_s"] < 2.5, first  # 5 frames left at ~4 per second


def test_two_jobs_at_once_each_viewer_sees_only_its_job(broadcaster, inputs, tmp_path):
    first = start_job(ScriptedEngine(num_frames=60, final_fps=30, tint=230), inputs, broadcaster, tmp_path)
    viewer1 = Recorder(broadcaster.url)
    viewer1._ws.send(json.dumps({"type": "follow", "job": first.id}))
    viewer1.wait_for(lambda m: m["type"] == "hello" and m["following"] == "job")
    viewer1.messages.clear()  # from here on it follows the first job only
    second = start_job(ScriptedEngine(num_frames=60, final_fps=30, tint=60), inputs, broadcaster, tmp_path)
    viewer2 = Recorder(broadcaster.url)  # follows the latest job: the second one
    assert first.wait(10) and second.wait(10)
    viewer1.wait_for(lambda m: m["type"] == "done")
    viewer2.wait_for(lambda m: m["type"] == "done")
    viewer1.close(), viewer2.close()
    messages1 = [m for m in viewer1.messages if m["type"] != "hello"]
    messages2 = [m for m in viewer2.messages if m["type"] != "hello"]
    assert {m["job"] for m in messages1} == {first.id}
    assert {m["job"] for m in messages2} == {second.id}
    assert all(m["blue"] > 200 for m in messages1 if m["type"] == "frame" and m["kind"] == "final")
    assert all(m["blue"] < 90 for m in messages2 if m["type"] == "frame" and m["kind"] == "final")


def test_job_updates_end_with_the_result_for_the_page(inputs, tmp_path):
    job = start_job(ScriptedEngine(num_frames=30, final_fps=60), inputs, None, tmp_path)
    snapshots = list(job.updates(max_fps=50))
    last = snapshots[-1]
    assert last.state == "done" and last.video_path.endswith("video.mp4") and os.path.isfile(last.video_path)
    assert last.video_url == f"/outputs/{job.id}/video.mp4"
    seqs = [s.frame.seq for s in snapshots if s.frame is not None]
    assert seqs == sorted(seqs) and len(set(seqs)) > 3
    assert {s.frame.quality for s in snapshots if s.frame is not None} >= {"preview", "final"}


def test_studio_checks_the_request_before_starting(inputs, tmp_path):
    studio = Studio(None, outputs_dir=str(tmp_path / "out"), checkpoint_dir=str(tmp_path / "checkpoints"))
    with pytest.raises(InputError, match="portrait"):
        studio.start(None, inputs[1])
    with pytest.raises(InputError, match="speech"):
        studio.start(inputs[0], "")
    with pytest.raises(InputError, match="pose style"):
        studio.start(*inputs, options=Options(pose_style=46))
    with pytest.raises(InputError, match="SadTalker engine cannot run.*no SadTalker weights"):
        studio.start(*inputs, engine="sadtalker")
    with pytest.raises(InputError, match="engine must be one of"):
        studio.start(*inputs, engine="fast")
    assert not os.path.exists(tmp_path / "out") or not os.listdir(tmp_path / "out")


def test_engine_choice_explains_itself(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    choice = choose_engine("auto", str(empty))
    assert choice.name == "lite" and "no SadTalker weights" in choice.reason and not choice.honours_sadtalker_options
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / FILES_256[0]).write_bytes(b"")
    choice = choose_engine("auto", str(partial))
    assert choice.name == "lite" and "incomplete" in choice.reason and FILES_256[1] in choice.reason
    assert choose_engine("lite", str(partial)).name == "lite"


@pytest.mark.parametrize("files, detail", [
    (("SadTalker_V0.0.2_512.safetensors", "mapping_00229-model.pth.tar", "mapping_00109-model.pth.tar"), "512 only"),
    (("facevid2vid_00189-model.pth.tar", "auido2pose_00140-model.pth", "auido2exp_00300-model.pth", "epoch_20.pth",
      "mapping_00229-model.pth.tar", "mapping_00109-model.pth.tar"), None),
])
def test_every_folder_the_pipeline_loads_counts_as_installed(tmp_path, files, detail):
    """One rule: a 512-only folder and a legacy folder run SadTalker, as the pipeline loads both."""
    for name in files:
        (tmp_path / name).write_bytes(b"")
    choice = choose_engine("auto", str(tmp_path))
    assert choice.name == "sadtalker" and choice.honours_sadtalker_options
    assert detail is None or detail in choice.reason


def test_run_headless_draws_progress_and_returns_the_result(inputs, tmp_path):
    output = tmp_path / "out.mp4"
    stream = io.StringIO()
    done = run_headless(ScriptedEngine(num_frames=40, final_fps=200), *inputs, Options(output=str(output)), stream)
    assert done.video_path == str(output) and output.is_file()
    text = stream.getvalue()
    assert "render" in text and "40/40" in text and "by the lite engine" in text
