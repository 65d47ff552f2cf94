"""The Lite engine's motion, file mode vs streaming: lip sync on rendered frames, head motion, cost per tick.

    python -m bench.streaming_motion [--seeds 8] [--long-text "..."]

Clips: examples/speech.wav and a ~30 s espeak-ng clip (bench/lite.py's text; the example tiled 5x when espeak-ng is
not installed). Per clip, two motions of the same speech:

* file: ``motion_from_audio`` (sees the whole clip);
* streaming: ``StreamingMotion`` fed as a live session feeds it — 1 s idle, then the speech in 40 ms frames, each
  tick given ``cue_of`` of its frame's window and of up to 3 frames of look-ahead, then 1 s idle. It starts cold:
  the speech is the first it ever hears.

Printed side by side:

* lip-sync r: Pearson r between the inner-lip opening the 68-point detector finds on full-frame renders
  (FaceWarper on the 512 px example portrait, as the engine outputs them) and each frame's RMS
  (bench/lipsync.py, the measure of bench/lite.py), over the speech frames; also over its first 2 s only; and the
  lag of best correlation (frames, + = the mouth is late);
* head motion: std of pitch and of yaw (degrees) over the speech frames, mean over ``--seeds`` seeds;
* cost: StreamingMotion.step() while speaking and while idle, and cue_of(), in µs per call (median of 5 runs).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

from bench.lipsync import lip_opening, lip_sync
from core.audio import load_audio, num_video_frames
from core.image import load_image
from core.landmarks import LandmarkDetector
from preview.motion import audio_features, motion_from_audio
from preview.streaming import LOOKAHEAD_FRAMES, StreamingMotion, cue_of, frame_window
from preview.warp import FaceWarper, Pose

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_AUDIO = os.path.join(ROOT, "examples", "speech.wav")
IDLE_TICKS = 25  # idle before and after the speech
FIRST_FRAMES = 50  # "the first 2 s" of the speech


def streaming_poses(samples: np.ndarray, seed: int) -> list[Pose]:
    """The poses of the speech's frames, from a fresh StreamingMotion fed like a session (idle around it)."""
    cues = [cue_of(frame_window(samples, i)) for i in range(num_video_frames(samples.size))]
    motion = StreamingMotion(seed=seed)
    tick = 0
    for _ in range(IDLE_TICKS):
        motion.step(tick / 25, [])
        tick += 1
    poses = []
    for i in range(len(cues)):
        poses.append(motion.step(tick / 25, cues[i:i + 1 + LOOKAHEAD_FRAMES]))
        tick += 1
    for _ in range(IDLE_TICKS):
        motion.step(tick / 25, [])
        tick += 1
    return poses


def sync(detector: LandmarkDetector, warper: FaceWarper, poses: list[Pose], rms: np.ndarray) -> tuple:
    openings = np.array([lip_opening(detector, warper.render(pose)) for pose in poses], dtype=float)
    found = np.isfinite(openings)  # (None -> nan: no face found on that frame)
    r, lag = lip_sync(openings[found], rms[found])
    r_first, _ = lip_sync(openings[:FIRST_FRAMES][found[:FIRST_FRAMES]], rms[:FIRST_FRAMES][found[:FIRST_FRAMES]])
    return r, lag, r_first, int((~found).sum())


def head_std(poses: list[Pose]) -> tuple[float, float]:
    return float(np.std([p.pitch for p in poses])), float(np.std([p.yaw for p in poses]))


def bench_clip(label: str, samples: np.ndarray, detector: LandmarkDetector, warper: FaceWarper, seeds: int) -> None:
    num_frames = num_video_frames(samples.size)
    rms = audio_features(samples, num_frames).rms
    file_motion = motion_from_audio(samples, num_frames, seed=0)
    file_poses = [file_motion.pose(i) for i in range(num_frames)]
    stream_poses = streaming_poses(samples, seed=0)
    rows = {"file": sync(detector, warper, file_poses, rms), "streaming": sync(detector, warper, stream_poses, rms)}
    heads = {"file": np.mean([head_std([m.pose(i) for i in range(num_frames)])
                              for m in (motion_from_audio(samples, num_frames, seed=s) for s in range(seeds))], 0),
             "streaming": np.mean([head_std(streaming_poses(samples, seed=s)) for s in range(seeds)], 0)}
    print(f"{label}: {num_frames} frames ({num_frames / 25:.1f} s)")
    print(f"  {'':10s} {'lip-sync r':>10s} {'first 2 s':>10s} {'best lag':>9s} {'std pitch':>10s} {'std yaw':>8s}")
    for mode, (r, lag, r_first, missed) in rows.items():
        pitch, yaw = heads[mode]
        note = f"  (face not found on {missed} frames)" if missed else ""
        print(f"  {mode:10s} {r:10.3f} {r_first:10.3f} {lag:+9d} {pitch:10.2f} {yaw:8.2f}{note}")


def bench_cost(samples: np.ndarray) -> None:
    windows = [frame_window(samples, i) for i in range(num_video_frames(samples.size))]
    cues = [cue_of(w) for w in windows]

    def per_call(run) -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            calls = run()
            times.append((time.perf_counter() - start) / calls * 1e6)
        return statistics.median(times)

    motion = StreamingMotion(seed=0)
    clock = iter(range(10 ** 9))

    def speaking() -> int:
        for i in range(len(cues)):
            motion.step(next(clock) / 25, cues[i:i + 1 + LOOKAHEAD_FRAMES])
        return len(cues)

    def idle() -> int:
        for _ in range(500):
            motion.step(next(clock) / 25, [])
        return 500

    def cueing() -> int:
        for window in windows:
            cue_of(window)
        return len(windows)

    print(f"cost per call: step() speaking {per_call(speaking):.0f} µs, idle {per_call(idle):.0f} µs; "
          f"cue_of() {per_call(cueing):.0f} µs")


def long_speech(text: str, folder: str) -> tuple[str, np.ndarray]:
    from lite import LONG_TEXT, make_speech

    if shutil.which("espeak-ng") is None:
        return "examples/speech.wav tiled 5x (no espeak-ng)", np.tile(load_audio(EXAMPLE_AUDIO), 5)
    path = os.path.join(folder, "long.wav")
    make_speech(text or LONG_TEXT, path)
    return "espeak-ng long clip", load_audio(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8, help="seeds the head motion's std is averaged over")
    parser.add_argument("--image", default=os.path.join(ROOT, "examples", "portrait.png"))
    parser.add_argument("--audio", default=EXAMPLE_AUDIO)
    parser.add_argument("--long-text", default="", help="text of the long clip (default: bench/lite.py's)")
    args = parser.parse_args()
    detector = LandmarkDetector(backend="dlib")
    rgb = load_image(args.image)
    warper = FaceWarper(rgb, detector.detect(rgb).points)
    example = load_audio(args.audio)
    bench_clip(os.path.relpath(args.audio, ROOT), example, detector, warper, args.seeds)
    with tempfile.TemporaryDirectory() as tmp:
        label, samples = long_speech(args.long_text, tmp)
        bench_clip(label, samples, detector, warper, args.seeds)
    bench_cost(example)


if __name__ == "__main__":
    main()
