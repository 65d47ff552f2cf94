"""The display decision on the job's clock as a pure function: no threads, no clocks."""
from __future__ import annotations

from live.display import REPLAY_LEAD_S, Known, State, decide, frame_time

N = 10  # frames of the clip: 0.4 s


def known(now, num_frames=N, rendered=0, render_fps=None, kept=(), video_ready=False, engine_done=False):
    return Known(now=now, num_frames=num_frames, rendered=rendered, render_fps=render_fps, kept=set(kept),
                 video_ready=video_ready, engine_done=engine_done)


def run(ticks):
    """Feed (now, Known-args) ticks; return [(phase, source, index)] and the last state."""
    state, shown = State(), []
    for now, kwargs in ticks:
        show, state = decide(known(now, **kwargs), state)
        shown.append((state.phase, show.source if show else None, show.index if show else None))
    return shown, state


def test_idle_until_the_motion_is_known_then_the_clip_plays_from_that_moment():
    shown, state = run([(0.0, {"num_frames": None}), (0.04, {"num_frames": None}), (0.5, {})])
    assert shown[:2] == [("idle", "idle", None)] * 2
    assert shown[2] == ("play", "preview", 0) and state.play_start == 0.5
    assert frame_time(state, 3) == 0.5 + 3 / 25


def test_a_renderer_that_keeps_up_shows_final_frames_and_the_clip_ends_there():
    ticks = [(i / 25, {"rendered": N, "render_fps": 200.0, "kept": range(N)}) for i in range(N)]
    ticks.append((N / 25, {"rendered": N, "render_fps": 200.0, "video_ready": True, "engine_done": True}))
    shown, state = run(ticks)
    assert [s[1:] for s in shown[:N]] == [("kept", i) for i in range(N)]
    assert state.phase == "ended" and state.final_mode


def test_final_frames_take_over_when_the_renderer_catches_up_and_the_preview_never_comes_back():
    ticks = [(0.0, {}), (0.04, {"rendered": 1, "kept": {0}}),  # one frame: its speed is not known yet
             (0.08, {"rendered": 5, "render_fps": 30.0, "kept": range(2, 5)}),
             (0.12, {"rendered": 5, "render_fps": 30.0, "kept": range(3, 5)})]
    shown, state = run(ticks)
    assert [s[1] for s in shown] == ["preview", "preview", "kept", "kept"]
    assert state.final_mode


def test_a_slow_renderer_plays_the_preview_once_then_renders_then_replays_the_video():
    ticks = [(i / 25, {"rendered": 1, "render_fps": 0.5}) for i in range(N)]
    ticks += [(0.5, {"rendered": 2, "render_fps": 0.5}), (0.54, {"rendered": 3, "render_fps": 0.5})]
    ticks += [(3.0, {"rendered": N, "video_ready": True, "engine_done": True})]
    start = 3.0 + REPLAY_LEAD_S
    ticks += [(3.1, {"rendered": N, "video_ready": True, "engine_done": True})]
    ticks += [(start + i / 25, {"rendered": N, "video_ready": True, "engine_done": True}) for i in range(N + 1)]
    shown, state = run(ticks)
    assert [s[1:] for s in shown[:N]] == [("preview", i) for i in range(N)]  # once: no loop
    assert shown[N:N + 2] == [("rendering", "latest", 1), ("rendering", "latest", 2)]
    assert shown[N + 2][0] == "replay" and shown[N + 3] == ("replay", None, None)  # a moment for the reader
    assert [s[1:] for s in shown[N + 4:N + 4 + N]] == [("file", i) for i in range(N)]
    assert state.phase == "ended"


def test_rendering_shows_the_idle_animation_until_a_final_frame_exists():
    ticks = [(i / 25, {}) for i in range(N)] + [(0.5, {})]
    shown, _ = run(ticks)
    assert shown[-1] == ("rendering", "idle", None)


def test_a_job_without_a_video_file_ends_after_its_playback():
    ticks = [(i / 25, {}) for i in range(N)] + [(0.5, {"rendered": N, "engine_done": True})]
    shown, state = run(ticks)
    assert state.phase == "ended" and shown[-1] == ("ended", None, None)
