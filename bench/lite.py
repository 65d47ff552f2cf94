"""Benchmark of the lite engine: render speed and lip sync, on examples/ and on a ~30 s espeak-ng clip.

    python -m bench.lite [--repeats 3] [--long-text "..."]

Prints, per clip:
* render fps of the full-frame renderer on the 512x512 example portrait and of the 128x128 preview renderer
  (median over repeats of rendering every frame of the clip; motion is computed once, outside the timing);
* lip-sync r: Pearson correlation, over all frames, between the inner-lip opening that the 68-point landmark
  detector measures on the *output* frames (normalised by the eye distance) and the audio's RMS in each frame's
  40 ms (samples [640 i, 640 (i + 1)) at 16 kHz), and the lag of best correlation (bench/lipsync.py).

The streaming motion of live sessions is compared with this file mode in bench/streaming_motion.py.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time

import numpy as np

from bench.lipsync import lip_opening, lip_sync
from preview.lite import LiteEngine, LitePreview
from preview.motion import audio_features, motion_from_audio
from preview.warp import FaceWarper
from core.audio import load_audio, num_video_frames
from core.engine import Frame
from core.image import load_image
from core.landmarks import LandmarkDetector
from core.options import Options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG_TEXT = ("Good evening, and welcome to the program. Tonight we talk about the first steps of people in space, "
             "and about the long years of work that made them possible. Engineers, pilots and scientists from many "
             "countries built the rockets, tested the suits and trained for every possible failure. "
             "Some of them waited more than ten years for a single flight. Their story is one of patience, "
             "courage and a great deal of arithmetic. Let us begin at the very beginning.")


def make_speech(text: str, path: str) -> None:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise SystemExit("espeak-ng is not installed (apt-get install espeak-ng)")
    subprocess.run([espeak, "-v", "en-us", "-s", "155", "-w", path, text], check=True)


def render_fps(render, num_frames: int, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for index in range(num_frames):
            render(index)
        rates.append(num_frames / (time.perf_counter() - start))
    return statistics.median(rates)


def bench_clip(label: str, image: str, audio: str, repeats: int, detector: LandmarkDetector) -> None:
    rgb = load_image(image)
    face = detector.detect(rgb)
    samples = load_audio(audio)
    num_frames = num_video_frames(samples.size)
    motion = motion_from_audio(samples, num_frames, seed=0)
    warper = FaceWarper(rgb, face.points)
    preview = LitePreview(rgb, face.points, motion)
    full = render_fps(lambda i: warper.render(motion.pose(i)), num_frames, repeats)
    small = render_fps(preview.render, num_frames, repeats)

    # Lip sync on the engine's actual output frames.
    rms = audio_features(samples, num_frames).rms
    openings, levels, missed = [], [], 0
    engine = LiteEngine(detector=detector)
    start = time.perf_counter()
    for event in engine.generate(image, audio, Options(seed=0)):
        if isinstance(event, Frame):
            value = lip_opening(detector, event.rgb)
            if value is None:
                missed += 1
                continue
            openings.append(value)
            levels.append(rms[event.index])
    elapsed = time.perf_counter() - start
    r, lag = lip_sync(np.array(openings), np.array(levels))

    h, w = rgb.shape[:2]
    print(f"{label}: {num_frames} frames ({num_frames / 25:.1f} s), image {w}x{h}")
    print(f"  render fps {w}x{h} (full frame): {full:7.1f}  (median of {repeats})")
    print(f"  render fps 128x128 (preview):  {small:7.1f}  (median of {repeats})")
    print(f"  lip-sync r (detector on output frames vs frame RMS): {r:.3f}, best lag {lag:+d} frames  "
          f"(frames measured {len(openings)}, face not found {missed}; generate+detect {elapsed:.1f} s)")


def bench_idle(image: str, detector: LandmarkDetector, repeats: int) -> None:
    """IdleAnimator construction + first frame, as the studio does on Generate (detector already loaded)."""
    import cv2

    from preview.idle import IdleAnimator

    base = load_image(image)
    IdleAnimator(base, detector=detector).render(0.0)  # warm code paths
    for side in (512, 768, 1024):
        fresh, cached, frames = [], [], []
        for k in range(max(5, repeats)):
            rgb = cv2.resize(base, (side, side), interpolation=cv2.INTER_CUBIC)
            rgb[0, 0, 0] = k  # new content each time: the detector's cache cannot answer
            start = time.perf_counter()
            idle = IdleAnimator(rgb, detector=detector)
            idle.render(0.0)
            fresh.append(time.perf_counter() - start)
            start = time.perf_counter()
            IdleAnimator(rgb, detector=detector).render(0.0)
            cached.append(time.perf_counter() - start)
            start = time.perf_counter()
            for i in range(1, 26):
                idle.render(i / 25)
            frames.append((time.perf_counter() - start) / 25)
        print(f"idle {side}x{side}: construct + first frame {statistics.median(fresh) * 1000:5.1f} ms "
              f"(max {max(fresh) * 1000:.1f}); with the face already detected {statistics.median(cached) * 1000:5.1f} ms; "
              f"next frames {statistics.median(frames) * 1000:.2f} ms each")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image", default=os.path.join(ROOT, "examples", "portrait.png"))
    parser.add_argument("--audio", default=os.path.join(ROOT, "examples", "speech.wav"))
    parser.add_argument("--long-text", default=LONG_TEXT)
    args = parser.parse_args()
    detector = LandmarkDetector(backend="dlib")
    bench_idle(args.image, detector, args.repeats)
    bench_clip("examples/speech.wav", args.image, args.audio, args.repeats, detector)
    with tempfile.TemporaryDirectory() as tmp:
        long_wav = os.path.join(tmp, "long.wav")
        make_speech(args.long_text, long_wav)
        bench_clip("espeak-ng long clip", args.image, long_wav, args.repeats, detector)


if __name__ == "__main__":
    main()
