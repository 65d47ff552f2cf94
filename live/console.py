"""The console renderer: one video without a UI, with a one-line progress bar (``app.py render``)."""
from __future__ import annotations

import sys
import time
from typing import TextIO

from core.engine import Done, Engine, Frame, MotionReady, Progress
from core.options import Options

from .progress import RenderRate

BAR_WIDTH = 30
LINE_WIDTH = 100
REDRAW_S = 0.1


def run_headless(engine: Engine, image: str, audio: str, options: Options, stream: TextIO = sys.stderr) -> Done:
    """Render without a UI, drawing a one-line progress bar on ``stream``; returns the Done event."""
    started = time.monotonic()
    rate = RenderRate()
    total, last_draw, result = 0, 0.0, None
    interactive = stream.isatty()
    for event in engine.generate(image, audio, options):
        now = time.monotonic()
        if isinstance(event, MotionReady):
            total = event.num_frames
            rate.started(now)
        elif isinstance(event, Progress) and event.stage != "render":
            _draw(stream, event.stage, event.done, event.total, None, event.message, interactive)
        elif isinstance(event, Frame):
            rate.frame(now)
            done = event.index + 1
            if now - last_draw >= REDRAW_S or done == total:
                last_draw = now
                _draw(stream, "render", done, max(total, done), rate.eta_s(done, total), "", interactive)
        elif isinstance(event, Done):
            result = event
    if result is None:
        raise RuntimeError("the engine stopped without producing a video")
    stream.write(f"\n{result.num_frames} frames, {result.duration_s:.2f} s video by the {result.engine} engine "
                 f"in {time.monotonic() - started:.1f} s")
    stream.write(f": {result.video_path}\n" if result.video_path else "\n")
    stream.flush()
    return result


def _draw(stream: TextIO, stage: str, done: int, total: int, eta: float | None, message: str,
          interactive: bool) -> None:
    filled = int(BAR_WIDTH * done / total) if total else 0
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    counts = f"{done}/{total}" if total else ""
    eta_text = f" ETA {eta:.1f}s" if eta is not None else ""
    line = f"[{bar}] {stage:<9} {counts:>11}{eta_text} {message}"[:LINE_WIDTH]
    stream.write(("\r" + line.ljust(LINE_WIDTH)) if interactive else line + "\n")
    stream.flush()


def render_file(image: str, audio: str, options: Options, engine: str, checkpoint_dir: str,
                device: str = "cpu") -> Done:
    """``app.py render``: choose and load the engine, say which one runs, render with the console progress bar."""
    from .engines import choose_engine, load_engine

    choice = choose_engine(engine, checkpoint_dir)
    print(f"Engine: {choice.reason}", file=sys.stderr)
    return run_headless(load_engine(choice.name, checkpoint_dir, device), image, audio, options)
