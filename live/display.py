"""What a job's live stream shows at each tick, on the job's one clock: a pure function of what is known.

The stream is a timeline at real time (seconds since the job started). Phases:

* ``idle``      — until the clip's motion is known: the face nods and blinks (no sound).
* ``play``      — the clip plays once at real time with its speech, starting the moment the motion is known.
                  Frame i is shown at ``play_start + i / FPS``: a final frame when one is at hand for that index
                  and the renderer keeps up with real time (or the video is complete), else the preview.
                  Once final frames took over they stay (the preview never comes back).
* ``rendering`` — the clip played with preview frames and the renderer is still working: silent; the newest final
                  frame as it comes (the idle animation until the first one); viewers see "rendering n/N".
* ``replay``    — the finished video plays once more at real time with its speech (only when final frames never
                  took over in the first playback: the user has not yet seen and heard the final result).
* ``ended``     — nothing more to show: viewers keep the last frame.

``decide`` is called once per display tick; tests check the policy without threads or clocks.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Collection, Literal

from core.options import FPS

Phase = Literal["idle", "play", "rendering", "replay", "ended"]
Source = Literal["idle", "preview", "kept", "file", "latest"]
REAL_TIME_MARGIN = 1.05  # a renderer counts as keeping up when it makes frames this much faster than they play
REPLAY_LEAD_S = 0.3  # the finished video starts this long after it is ready (the reader gets a head start)


@dataclass(frozen=True)
class Known:
    """What the job knows at one tick."""

    now: float  # seconds on the job's timeline
    num_frames: int | None  # frames of the clip, once the motion is known
    rendered: int  # final frames made so far (they come in order: indices 0 .. rendered-1)
    render_fps: float | None  # the renderer's measured rate, None while unknown
    kept: Collection[int]  # indices of final frames at hand for the live stream (display-size JPEGs)
    video_ready: bool  # the finished video can be read back (the engine is done)
    engine_done: bool  # the engine finished (with or without a video file)


@dataclass(frozen=True)
class State:
    """The display's memory between ticks."""

    phase: Phase = "idle"
    play_start: float = 0.0  # timeline second of frame 0 in the current playback
    final_mode: bool = False  # final frames took over in this playback (the renderer keeps up: no replay needed)


@dataclass(frozen=True)
class Show:
    source: Source  # where the picture comes from
    index: int | None = None  # frame of the clip (play, replay, latest)
    t: float = 0.0  # where the frame sits on the timeline


def frame_time(state: State, index: int) -> float:
    return state.play_start + index / FPS


def playhead(state: State, now: float) -> int:
    return int(math.floor((now - state.play_start) * FPS + 1e-6))


def decide(known: Known, state: State) -> tuple[Show | None, State]:
    """The frame to show at this tick (None: nothing new) and the display's next state."""
    if state.phase == "idle":
        if known.num_frames is None:
            return Show("idle", t=known.now), state
        state = dataclasses.replace(state, phase="play", play_start=known.now)
    if state.phase in ("play", "replay"):
        index = playhead(state, known.now)
        if index < 0:
            return None, state  # the playback starts in a moment
        if index < known.num_frames:
            return _play_frame(known, state, index)
        state = _after_playback(known, state)
    if state.phase == "rendering":
        if known.engine_done:
            if known.video_ready and not state.final_mode:
                return None, dataclasses.replace(state, phase="replay", play_start=known.now + REPLAY_LEAD_S,
                                                 final_mode=True)
            return None, dataclasses.replace(state, phase="ended")
        if known.rendered:
            return Show("latest", known.rendered - 1, known.now), state
        return Show("idle", t=known.now), state
    return None, state


def _play_frame(known: Known, state: State, index: int) -> tuple[Show, State]:
    t = frame_time(state, index)
    if state.phase == "replay":
        return Show("kept" if index in known.kept else "file", index, t), state
    keeps_up = known.render_fps is not None and known.render_fps >= REAL_TIME_MARGIN * FPS
    final_mode = state.final_mode or known.video_ready or (index in known.kept and keeps_up)
    if final_mode:
        if index in known.kept:
            return Show("kept", index, t), dataclasses.replace(state, final_mode=True)
        if known.video_ready:
            return Show("file", index, t), dataclasses.replace(state, final_mode=True)
    # the renderer fell behind after taking over (it rarely does): the preview beats a frozen picture
    return Show("preview", index, t), dataclasses.replace(state, final_mode=final_mode)


def _after_playback(known: Known, state: State) -> State:
    if state.phase == "replay" or (state.final_mode and known.engine_done):
        return dataclasses.replace(state, phase="ended")
    return dataclasses.replace(state, phase="rendering")
