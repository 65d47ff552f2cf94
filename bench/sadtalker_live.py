"""SadTalker engine in the live studio (issue "SadTalker engine in the studio", points 3 and 5). Prints:

1. time from Generate to the motion being known (first preview frame) for 10 s of audio (target ~1 s);
2. the preview's own speed (KeypointPreview.render, frames per second; target >= 25 on this CPU);
3. frames actually shown per second while the full renderer runs on the same CPU (target >= 25): the preview, with
   the final frames made so far in place of theirs;
4. peak RSS for 60 s vs 10 s of audio (ratio target <= 1.2).

    python -m bench.sadtalker_live [--checkpoints DIR] [--watch 45] [--frames 3]

Without --checkpoints it writes synthetic weights in the official layout (once, into the temp dir): speed and memory
do not depend on the weight values. Point 4 runs each clip in a fresh process up to ``--frames`` final frames: every
array whose size grows with the clip (mel, coefficients, keypoints of all frames) is made before the first frame,
and the render loop holds one frame at a time (the figure also shows RSS after 1 frame vs after ``--frames``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

EXAMPLE_IMAGE = ROOT / "examples" / "portrait.png"
EXAMPLE_AUDIO = ROOT / "examples" / "speech.wav"


def make_clip(seconds: float, folder: str) -> str:
    """The example speech tiled to ``seconds``."""
    import numpy as np

    from core.audio import load_audio, write_wav

    wav = load_audio(str(EXAMPLE_AUDIO))
    reps = int(np.ceil(seconds * 16000 / wav.size))
    path = os.path.join(folder, f"speech_{seconds:g}s.wav")
    write_wav(path, np.tile(wav, reps)[: int(seconds * 16000)])
    return path


def checkpoint_dir(given: str | None) -> str:
    if given:
        return given
    from sadtalker.synthetic import cached_official_layout as synthetic_checkpoint_dir

    return synthetic_checkpoint_dir(legacy=False)


def live(checkpoints: str, watch_s: float, folder: str) -> None:
    from live.studio import Studio
    from core.options import Options

    studio = Studio(None, outputs_dir=os.path.join(folder, "outputs"), checkpoint_dir=checkpoints)
    audio = make_clip(10.0, folder)
    warm = studio.start(str(EXAMPLE_IMAGE), make_clip(0.2, folder), Options(seed=0), engine="sadtalker")
    warm.wait(600)  # loads the networks once, like the app does at start-up

    job = studio.start(str(EXAMPLE_IMAGE), audio, Options(seed=0), engine="sadtalker")
    start = job.started_at
    shown: list[tuple[float, str]] = []
    first_preview = None
    last_seq = 0
    deadline = time.monotonic() + watch_s + 30
    while time.monotonic() < deadline:
        snapshot = job.snapshot()
        frame = snapshot.frame
        if frame is not None and frame.seq != last_seq:
            last_seq = frame.seq
            now = time.monotonic()
            shown.append((now, frame.quality))
            if frame.quality == "preview" and first_preview is None:
                first_preview = now
        if first_preview is not None and time.monotonic() - first_preview > watch_s:
            break
        time.sleep(0.002)
    done_frames = job.snapshot().done
    studio.cancel(job.id)
    assert first_preview is not None, "no preview frame was shown"
    played = [(t, q) for t, q in shown if t >= first_preview]
    span = played[-1][0] - played[0][0]
    finals = sum(1 for _, q in played if q == "final")
    print(f"1. Generate -> first preview frame (10 s of audio):      {first_preview - start:.2f} s  (target ~1 s)")
    print(f"3. frames shown per second while rendering:             {(len(played) - 1) / span:.1f} fps over "
          f"{span:.0f} s ({finals} of them final frames in place of preview ones); {done_frames} final frames "
          f"rendered meanwhile  (target >= 25)")


def preview_speed(checkpoints: str, folder: str) -> None:
    from core.engine import MotionReady
    from core.options import Options
    from sadtalker.pipeline import SadTalkerPipeline

    pipeline = SadTalkerPipeline.from_checkpoints(checkpoints)
    ready = next(e for e in pipeline.generate(str(EXAMPLE_IMAGE), make_clip(10.0, folder), Options(seed=0))
                 if isinstance(e, MotionReady))
    preview = ready.preview
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(preview.num_frames):
            preview.render(i)
        runs.append(preview.num_frames / (time.perf_counter() - t0))
    print(f"2. KeypointPreview.render alone:                         {statistics.median(runs):.0f} fps "
          f"(median of 3 x {preview.num_frames} frames)  (target >= 25)")


def rss_child(checkpoints: str, audio: str, frames: int) -> None:
    """Run one clip up to ``frames`` final frames; print peak RSS (MiB) after motion, after 1 frame, at the end."""
    import torch

    from core.engine import Frame, MotionReady
    from core.options import Options
    from sadtalker.pipeline import SadTalkerPipeline

    torch.set_num_threads(2)
    pipeline = SadTalkerPipeline.from_checkpoints(checkpoints)
    marks = {}
    output = os.path.join(tempfile.mkdtemp(), "out.mp4")
    for event in pipeline.generate(str(EXAMPLE_IMAGE), audio, Options(seed=0, output=output)):
        if isinstance(event, MotionReady):
            marks["motion"] = peak_mib()
        if isinstance(event, Frame):
            if event.index == 0:
                marks["frame1"] = peak_mib()
            if event.index + 1 >= frames:
                break
    marks["end"] = peak_mib()
    print(json.dumps(marks))


def peak_mib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child
    started from a big parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss(checkpoints: str, frames: int, folder: str) -> None:
    results = {}
    for seconds in (10.0, 60.0):
        audio = make_clip(seconds, folder)
        out = subprocess.run([sys.executable, "-m", "bench.sadtalker_live", "--rss-child", audio, "--checkpoints",
                              checkpoints, "--frames", str(frames)],
                             capture_output=True, text=True, check=True, cwd=ROOT)
        results[seconds] = json.loads(out.stdout.strip().splitlines()[-1])
    a, b = results[10.0], results[60.0]
    print(f"4. peak RSS 10 s: {a['end']:.0f} MiB, 60 s: {b['end']:.0f} MiB -> ratio {b['end'] / a['end']:.3f}  "
          f"(target <= 1.2); after motion {a['motion']:.0f} / {b['motion']:.0f} MiB, "
          f"after 1 frame {a['frame1']:.0f} / {b['frame1']:.0f}, after {frames} frames {a['end']:.0f} / {b['end']:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", help="checkpoint folder (default: synthetic official-layout weights)")
    parser.add_argument("--watch", type=float, default=45.0, help="seconds of live preview to measure")
    parser.add_argument("--frames", type=int, default=3, help="final frames rendered per clip for the RSS figure")
    parser.add_argument("--rss-child", metavar="AUDIO", help=argparse.SUPPRESS)
    args = parser.parse_args()
    checkpoints = checkpoint_dir(args.checkpoints)
    if args.rss_child:
        rss_child(checkpoints, args.rss_child, args.frames)
        return
    with tempfile.TemporaryDirectory() as folder:
        live(checkpoints, args.watch, folder)
        preview_speed(checkpoints, folder)
        rss(checkpoints, args.frames, folder)


if __name__ == "__main__":
    main()
