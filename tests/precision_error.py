"""Error of the reduced-precision renderer against float32, on the golden whole-render cases.

    .venv/bin/python tests/precision_error.py [--dtype bfloat16] [--threads 2]

(A measurement, not a test: it lives beside the golden helpers it uses, which benches may not import.)

For every ``render_*`` golden case in ``$SADTALKER_GOLDEN_DIR`` (default ``tests/golden``) the clip is rendered by
our renderer in float32 and with ``--dtype`` convolutions (``FaceRenderer(precision=...)``), from the synthetic
official-layout checkpoints the golden test loads. Printed per case, as statistics of |a - b| / max|b| over all
values (frames x pixels x channels; the golden criterion's measure): the reduced precision against our float32,
the reduced precision against the official golden frames, and our float32 against them; the golden bounds
(mean 1e-3, p99.9 1e-2, max 2e-2) for scale. Also the same in 8-bit grey levels (x 255).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the project (this file's folder is tests/)

import numpy as np
import torch

from sadtalker.checkpoints import load_networks
from sadtalker.facerender import FaceRenderer
from sadtalker.synthetic import cached_official_layout
from support.golden import GOLDEN_DIR, RENDER_BOUNDS, load_case, render_errors
from support.golden_renderer import (RENDER_KINDS, reference_frames, render_batch_size, render_frames,
                                     render_inputs_from_case)


def _line(label: str, errors: dict[str, float]) -> str:
    return f"    {label:28s} " + "  ".join(f"{k}={v:.2e} ({v * 255:.2f}/255)" for k, v in errors.items())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    precision = getattr(torch, args.dtype)

    nets = load_networks(cached_official_layout(legacy=True), size=256,
                         parts=["kp_extractor", "generator", "mapping_crop", "mapping_still"])
    renderers = {
        "float32": FaceRenderer(nets.kp_extractor, nets.generator, nets.mapping_crop, nets.mapping_still),
        args.dtype: FaceRenderer(nets.kp_extractor, nets.generator, nets.mapping_crop, nets.mapping_still,
                                 precision=precision),
    }
    print(f"golden dir {GOLDEN_DIR}; bounds of the golden criterion: "
          + ", ".join(f"{k} {v:g}" for k, v in RENDER_BOUNDS.items()), flush=True)
    totals: list[dict[str, float]] = []
    for path in sorted(glob.glob(os.path.join(GOLDEN_DIR, "*.npz"))):
        case = load_case(path)
        if case.kind not in RENDER_KINDS:
            continue
        inputs = render_inputs_from_case(case)
        batch_size = render_batch_size(case)
        with torch.inference_mode():
            frames = {name: render_frames(r, inputs, batch_size) for name, r in renderers.items()}
        official = reference_frames(case, inputs.num_frames)
        reduced_vs_float = render_errors(frames[args.dtype], frames["float32"])
        totals.append(reduced_vs_float)
        print(f"{case.name} ({inputs.num_frames} frames, batch size {batch_size}):", flush=True)
        print(_line(f"{args.dtype} vs our float32", reduced_vs_float))
        print(_line(f"{args.dtype} vs official", render_errors(frames[args.dtype], official)))
        print(_line("float32 vs official", render_errors(frames["float32"], official)), flush=True)
    if not totals:
        raise SystemExit(f"no render cases in {GOLDEN_DIR}")
    print(f"over {len(totals)} cases, {args.dtype} vs float32: "
          f"mean of means {np.mean([t['mean'] for t in totals]):.2e}, "
          f"worst max {max(t['max'] for t in totals):.2e}")


if __name__ == "__main__":
    main()
