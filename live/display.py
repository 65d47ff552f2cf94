"""What the live stream shows at each display tick: the idle -> preview -> final decision, as a pure function.

The job's display thread asks ``decide`` once per tick (25 per second) with what it knows at that moment and
shows what it returns; tests check the policy here without threads or clocks.

* Until the clip's motion is known: the idle animation.
* Then the audio-driven preview plays in real time from the moment the motion is known (it loops until the first
  final frame exists).
* Final frames take over once rendering has caught up with the preview's playhead, or once the preview has played
  through; the switch happens once and never back, so viewers never see the two alternate.
* A renderer slower than ``SLIDESHOW_BELOW_FPS`` (SadTalker on a CPU: seconds per frame) would turn that into a
  still picture for minutes, so then the preview keeps looping in real time and the final frames made so far take
  the place of their preview frames (progressive quality).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Collection, Literal

SLIDESHOW_BELOW_FPS = 1.0  # final frames slower than this (on average, from 2 frames on) replace preview frames


@dataclass(frozen=True)
class Tick:
    """What the display knows at one tick once the motion is known."""

    playhead: int  # display frames since the preview started (real time at 25 fps)
    num_frames: int  # frames of the clip
    latest_final: int | None  # index of the newest final frame, None before the first
    slow: bool  # the renderer is slower than SLIDESHOW_BELOW_FPS
    kept: Collection[int]  # indices of the final frames kept for the progressive preview (slow renderers)


@dataclass(frozen=True)
class Memory:
    """What earlier ticks decided (the display's only state)."""

    final_mode: bool = False  # switched to final frames for good
    played_through: bool = False  # the preview has played to its end at least once
    shown_preview: bool = False  # at least one preview frame was shown
    shown_final: int = -1  # index of the final frame shown last in final mode


@dataclass(frozen=True)
class Show:
    quality: Literal["preview", "final"]
    index: int  # frame of the clip
    kept: bool = False  # a kept final frame (progressive preview) rather than the newest one


def decide(tick: Tick, memory: Memory) -> tuple[Show | None, Memory]:
    """The frame to show at this tick (None: keep showing the current one) and the updated memory."""
    played_through = memory.played_through or tick.playhead >= tick.num_frames
    final_mode = memory.final_mode
    latest = tick.latest_final
    # The first preview frame is always shown: it is the moment the audio-driven motion appears. Whether the
    # renderer is slow is known from its second frame on.
    if (not final_mode and latest is not None and memory.shown_preview and not tick.slow
            and (latest >= 1 or latest + 1 >= tick.num_frames)
            and (latest >= tick.playhead or played_through)):
        final_mode = True
    memory = dataclasses.replace(memory, final_mode=final_mode, played_through=played_through)
    if final_mode:
        if latest == memory.shown_final:
            return None, memory
        return Show("final", latest), dataclasses.replace(memory, shown_final=latest)
    index = tick.playhead % tick.num_frames
    show = Show("final", index, kept=True) if tick.slow and index in tick.kept else Show("preview", index)
    return show, dataclasses.replace(memory, shown_preview=True)
