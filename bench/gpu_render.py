"""The face renderer on a GPU: throughput, latency to the first frames, peak memory, real time or not.

    python -m bench.gpu_render --size 256 --dtype float16 [--seconds 10] [--device cuda]
    python -m bench.gpu_render --device cpu --size 128 --seconds 0.2   # smoke test of this code path on a CPU

Synthetic weights (speed does not depend on the values). For one size and precision it prints one line:

* ``fps``: frames per second of the full renderer (``FaceRenderer.frames``: MappingNet + keypoints + generator), with
  the frames per generator call chosen for throughput by ``sadtalker.render_plan`` (calibration time printed);
* ``first_preview_s``: for ``--seconds`` of speech, from the start to the first preview frame (the motion-true
  keypoint preview: all keypoints of the clip by MappingNet, then one 128x128 preview frame);
* ``first_final_s``: from the start to the first full-quality frame (source preparation + the first call);
* ``peak_gpu_gb``: peak GPU memory allocated by torch during the clip;
* ``realtime``: whether the renderer keeps up with 25 fps (the live sessions use this to pick full frames).
"""
from __future__ import annotations

import argparse
import time

import torch

from bench.render_speed import build_renderer, synthetic_inputs
from sadtalker.keypoint_preview import KeypointPreview
from sadtalker.render_plan import choose_render_plan

FPS = 25


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--dtype", default="float16", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--seconds", type=float, default=10.0, help="speech length of the clip")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu for a smoke test of this code path")
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    renderer = build_renderer(args.device, getattr(torch, args.dtype))
    frames = max(2, int(round(args.seconds * FPS)))
    inputs = synthetic_inputs(args.size, frames)

    plan = choose_render_plan(renderer, args.size)  # also the warm-up (kernels, cuDNN algorithm choice)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    started = time.perf_counter()
    keypoints = renderer.keypoints(inputs)  # the preview's motion, as the pipeline's MotionReady
    preview_source = (inputs.source_image.transpose(1, 2, 0) * 255).astype("uint8")
    preview = KeypointPreview(preview_source, keypoints.source, keypoints.driving)
    preview.render(0)
    first_preview = time.perf_counter() - started
    first_final = None
    rendered = 0
    render_started = time.perf_counter()
    for _ in renderer.frames(inputs, batch_size=1, workers=plan.workers, frames_per_call=plan.frames_per_call):
        rendered += 1
        if first_final is None:
            sync()
            first_final = time.perf_counter() - started
    sync()
    render_s = time.perf_counter() - render_started
    fps = rendered / render_s
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else float("nan")
    print(f"size={args.size} dtype={args.dtype} device={args.device} frames={rendered} "
          f"frames_per_call={plan.frames_per_call} workers={plan.workers} calibration_s={plan.calibration_s:.1f} "
          f"fps={fps:.2f} first_preview_s={first_preview:.3f} first_final_s={first_final:.3f} "
          f"peak_gpu_gb={peak:.2f} realtime={'yes' if fps >= FPS else 'no'}", flush=True)


if __name__ == "__main__":
    main()
