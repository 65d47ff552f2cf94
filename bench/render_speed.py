"""Speed of our face renderer on synthetic weights, side by side with the official code (CPU by default).

    python -m bench.render_speed --size 256 --frames 8 --threads 2 --compare --official-dir /tmp/official-sadtalker \
        --dtype float32 bfloat16

Times what the official ``make_animation`` does for a clip (canonical keypoints once, then MappingNet + keypoint
transformation + generator per frame), as our ``FaceRenderer.frames`` does it (plus the source encoding, once per
clip), and prints ``per_frame_s=`` = median call time / frames. Every contender is warmed up on a 2-frame clip first.
``--dtype`` takes several values: float32 is the faithful path; bfloat16 / float16 run the generator's convolutions
in that type (``FaceRenderer(precision=...)``), the networks stay float32.

``--compare`` also times the official renderer: with ``--official-dir`` (an export of OpenTalker/SadTalker; never
part of this repository) the official ``src/facerender/modules`` networks built from ``facerender.yaml`` with the
same synthetic weights and called through the official ``make_animation`` with its default batch size 2
(``--official-batch-size``); without it, our networks under ``reference_computation()`` (plain convolutions, the
whole generator per frame). The contenders run alternately, repeat after repeat, so they see the same machine load;
the figures say ``speedup=`` = median official / median ours. A repeat that does not fit in ``--budget-s`` is not
started (the 64-frame official clip takes minutes).

Then a breakdown of ours (first dtype): each part timed on its own (median of the repeats), per frame for the
per-frame parts, per clip for the per-clip parts. Speed does not depend on the weight values, so the synthetic
recipe is loaded straight into the modules. Load: /proc/loadavg is printed before and after (a shared machine).
"""
from __future__ import annotations

import argparse
import os
import site
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sadtalker.facerender import FaceRenderer, RenderInputs, prepare_render_inputs
from sadtalker.keypoints import transform_keypoints
from sadtalker.models.fast_conv import conv_precision, reference_computation
from sadtalker.models.generator import OcclusionAwareSPADEGenerator
from sadtalker.models.keypoint_detector import KeypointDetector
from sadtalker.models.mapping import MappingNet
from sadtalker.synthetic import file_spec, synthetic_state

RENDERER_WEIGHTS = "SadTalker_V0.0.2_256.safetensors"  # the 512 file has the same tensors
MAPPING_WEIGHTS = "mapping_00229-model.pth.tar"


def _load_synthetic(module: torch.nn.Module, file_name: str, prefix: str) -> torch.nn.Module:
    spec = [(key, shape) for key, shape, _ in file_spec(file_name) if key.startswith(prefix)]
    state = {key[len(prefix):]: torch.from_numpy(value) for key, value in synthetic_state(spec).items()}
    module.load_state_dict(state, strict=True)
    return module.eval()


def build_renderer(device: str, dtype: torch.dtype) -> FaceRenderer:
    """Our renderer with synthetic weights: float32 networks; a reduced ``dtype`` is the renderer's precision."""
    kp_extractor = _load_synthetic(KeypointDetector(), RENDERER_WEIGHTS, "kp_extractor.")
    generator = _load_synthetic(OcclusionAwareSPADEGenerator(), RENDERER_WEIGHTS, "generator.")
    mapping = _load_synthetic(MappingNet(70), MAPPING_WEIGHTS, "")
    for net in (kp_extractor, generator, mapping):
        net.to(device=device)
    return FaceRenderer(kp_extractor, generator, mapping, precision=None if dtype == torch.float32 else dtype)


def _official_modules(official_dir: str):
    """The official face-renderer modules, imported from an export of the official repository.

    Import shims for current libraries are applied here, at run time (the export is never edited): ``tqdm`` is
    optional (the per-frame progress bar is switched off anyway)."""
    root = str(Path(official_dir).resolve())
    if not os.path.isdir(os.path.join(root, "src", "facerender", "modules")):
        raise SystemExit(f"--official-dir {official_dir!r} has no src/facerender/modules (an export of "
                         "OpenTalker/SadTalker is expected)")
    site.addsitedir(root)  # the official code imports itself as the top-level package ``src``
    try:
        import tqdm  # noqa: F401
    except ImportError:
        import types
        sys.modules["tqdm"] = types.SimpleNamespace(tqdm=lambda iterable, *a, **k: iterable)
    import importlib
    animation = importlib.import_module("src.facerender.modules.make_animation")
    animation.tqdm = lambda iterable, *a, **k: iterable  # no progress bar in the timings
    generator = importlib.import_module("src.facerender.modules.generator")
    keypoints = importlib.import_module("src.facerender.modules.keypoint_detector")
    mapping = importlib.import_module("src.facerender.modules.mapping")
    return animation, generator, keypoints, mapping


def build_official(official_dir: str, device: str):
    """The official networks (facerender.yaml parameters) with the same synthetic weights, and make_animation."""
    import yaml

    animation, generator_module, keypoint_module, mapping_module = _official_modules(official_dir)
    with open(os.path.join(official_dir, "src", "config", "facerender.yaml")) as f:
        params = yaml.safe_load(f)["model_params"]
    generator = generator_module.OcclusionAwareSPADEGenerator(**params["generator_params"], **params["common_params"])
    kp_detector = keypoint_module.KPDetector(**params["kp_detector_params"], **params["common_params"])
    mapping = mapping_module.MappingNet(**params["mapping_params"])
    _load_synthetic(generator, RENDERER_WEIGHTS, "generator.")
    _load_synthetic(kp_detector, RENDERER_WEIGHTS, "kp_extractor.")
    _load_synthetic(mapping, MAPPING_WEIGHTS, "")
    for net in (generator, kp_detector, mapping):
        net.to(device)
    return animation.make_animation, generator, kp_detector, mapping


def official_clip(official, inputs: RenderInputs, batch_size: int, device: str) -> None:
    """The official renderer step for a clip: get_facerender_data's tensors, then make_animation."""
    make_animation, generator, kp_detector, mapping = official
    source = torch.from_numpy(inputs.source_image)[None].repeat(batch_size, 1, 1, 1).to(device)
    semantics = torch.from_numpy(inputs.source_semantics())[None].repeat(batch_size, 1, 1).to(device)
    target = torch.from_numpy(inputs.target_semantics(batch_size)).to(device)  # (bs, N/bs, C, 27)
    make_animation(source, semantics, target, generator, kp_detector, None, mapping)


def synthetic_inputs(size: int, frames: int, seed: int = 0):
    """A smooth random 'photo' and random coefficients of the usual magnitudes (as the golden inputs)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    waves = [rng.uniform(0.5, 2) * xx + rng.uniform(0.5, 2) * yy + rng.uniform() for _ in range(3)]
    image = np.stack([0.5 + 0.25 * np.cos(2 * np.pi * wave) for wave in waves], axis=-1)
    photo = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    source = np.concatenate([rng.normal(0, 0.6, 64), rng.normal(0, 0.15, 3), rng.normal(0, 0.1, 3),
                             [1.2, 128.0, 128.0]])[None].astype(np.float32)
    generated = np.concatenate([rng.normal(0, 0.6, (frames, 64)), rng.normal(0, 0.15, (frames, 3)),
                                rng.normal(0, 0.1, (frames, 3))], axis=1).astype(np.float32)
    return prepare_render_inputs(photo, source, generated, preprocess="crop", size=size)


def reference_clip(renderer: FaceRenderer, inputs, batch_size: int) -> None:
    """The official make_animation's work for a clip: keypoints once, then per step of batch_size frames
    MappingNet + keypoint transformation + the whole generator (source encoding included), plain convolutions."""
    mapping = renderer.mappings[inputs.channels]
    device, dtype = renderer.device, renderer.dtype
    with reference_computation(), torch.inference_mode():
        image = torch.from_numpy(inputs.source_image)[None].to(device, dtype).repeat(batch_size, 1, 1, 1)
        kp_canonical = renderer.kp_extractor(image)
        semantics = torch.from_numpy(inputs.source_semantics())[None].to(device, dtype).repeat(batch_size, 1, 1)
        kp_source = transform_keypoints(kp_canonical, mapping(semantics))
        for first in range(0, inputs.num_frames, batch_size):
            rows = [min(i, inputs.num_frames - 1) for i in range(first, first + batch_size)]
            windows = torch.from_numpy(np.stack([inputs.driving_window(i) for i in rows])).to(device, dtype)
            kp_driving = transform_keypoints(kp_canonical, mapping(windows))
            renderer.generator(image, kp_driving, kp_source)


def _median_time(fn, repeats: int, sync) -> float:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _load() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="renderer resolution (256 or 512)")
    parser.add_argument("--frames", type=int, default=4, help="frames per timed call")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=1, help="frames per network call (ours)")
    parser.add_argument("--workers", type=int, default=None,
                        help="frames rendered side by side (default: the app's choice, one per thread on a CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=("float32", "float16", "bfloat16"),
                        help="our renderer's precision(s), timed side by side")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-part timings")
    parser.add_argument("--compare", action="store_true",
                        help="also time the official renderer (see --official-dir), alternating with ours")
    parser.add_argument("--official-dir", default=None,
                        help="an export of OpenTalker/SadTalker: --compare times its own code")
    parser.add_argument("--official-batch-size", type=int, default=2, help="the official batch size (its default 2)")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="start no further repeat once this many seconds have passed")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    workers = args.workers or (torch.get_num_threads() if args.device == "cpu" else 1)
    started = time.perf_counter()
    renderers = {name: build_renderer(args.device, getattr(torch, name)) for name in args.dtype}
    inputs = synthetic_inputs(args.size, args.frames)
    warm_inputs = synthetic_inputs(args.size, min(2, args.frames))
    print(f"device={args.device} dtype={','.join(args.dtype)} threads={torch.get_num_threads()} size={args.size} "
          f"frames={args.frames} batch_size={args.batch_size} workers={workers} torch={torch.__version__} "
          f"load_before={_load()}", flush=True)

    def ours(renderer: FaceRenderer, clip_inputs):
        def clip():
            for _ in renderer.frames(clip_inputs, batch_size=args.batch_size, workers=workers):
                pass
        return clip

    contenders = {f"ours_{name}": (ours(r, inputs), ours(r, warm_inputs)) for name, r in renderers.items()}
    if args.compare:
        if args.official_dir:
            official = build_official(args.official_dir, args.device)
            bs = args.official_batch_size
            contenders["official"] = (lambda: official_clip(official, inputs, bs, args.device),
                                      lambda: official_clip(official, warm_inputs, bs, args.device))
        else:
            first = next(iter(renderers.values()))
            contenders["reference"] = (lambda: reference_clip(first, inputs, args.batch_size),
                                       lambda: reference_clip(first, warm_inputs, args.batch_size))
    for _, warm in contenders.values():
        warm()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for repeat in range(args.repeats):  # alternate, so all see the same load on a shared machine
        if repeat and time.perf_counter() - started > args.budget_s:
            print(f"(budget of {args.budget_s:.0f} s spent: {repeat} repeats)", flush=True)
            break
        for name, (clip, _) in contenders.items():
            times[name].append(_median_time(clip, 1, sync))
            print(f"  repeat {repeat + 1} {name}: {times[name][-1] / args.frames:.3f} s/frame", flush=True)
    baseline = "official" if "official" in times else "reference" if "reference" in times else None
    for name, runs in times.items():
        if not runs:
            continue
        per_frame = statistics.median(runs) / args.frames
        line = (f"{name}: per_frame_s={per_frame:.3f} (median of {len(runs)}; runs "
                f"{', '.join(f'{t / args.frames:.2f}' for t in runs)})")
        if baseline and name != baseline and times[baseline]:
            line += f" speedup={statistics.median(times[baseline]) / statistics.median(runs):.2f}x vs {baseline}"
        print(line, flush=True)
    print(f"load_after={_load()}", flush=True)
    renderer = next(iter(renderers.values()))
    dtype = torch.float32
    if args.no_breakdown:
        return

    gen, kp_net = renderer.generator, renderer.kp_extractor
    mapping = renderer.mappings[inputs.channels]
    b = args.batch_size
    print(f"breakdown of ours_{args.dtype[0]}:")
    with torch.inference_mode(), conv_precision(renderer.precision):
        image = torch.from_numpy(inputs.source_image)[None].to(args.device, dtype)
        windows = torch.from_numpy(np.stack([inputs.driving_window(i % inputs.num_frames) for i in range(b)]))
        windows = windows.to(args.device, dtype)
        kp_canonical = kp_net(image)
        features = gen.encode_source(image)
        motion = mapping(windows)
        kp_driving = transform_keypoints(kp_canonical.expand(b, -1, -1), motion)
        kp_source = kp_driving[:1].expand(b, -1, -1) * 0.98
        dense = gen.dense_motion_network.motion(features.compressed, kp_driving, kp_source)
        volume = features.volume.expand(b, -1, -1, -1, -1)
        warped = torch.nn.functional.grid_sample(volume, dense.deformation, align_corners=False)
        bb, c, d, h, w = warped.shape
        decoder_in = gen.fourth(gen.third(warped.reshape(bb, c * d, h, w))) * dense.occlusion_map

        def warp_and_project():
            out = torch.nn.functional.grid_sample(volume, dense.deformation, align_corners=False)
            return gen.fourth(gen.third(out.reshape(bb, c * d, h, w))) * dense.occlusion_map

        parts = [
            ("per clip: canonical keypoints (KeypointDetector)", 1, lambda: kp_net(image)),
            ("per clip: source encoding (2-D encoder + 3-D res-blocks + compress)", 1,
             lambda: gen.encode_source(image)),
            ("per frame: MappingNet + keypoint transformation", b,
             lambda: transform_keypoints(kp_canonical.expand(b, -1, -1), mapping(windows))),
            ("per frame: dense motion (sparse warps + hourglass + mask + occlusion)", b,
             lambda: gen.dense_motion_network.motion(features.compressed, kp_driving, kp_source)),
            ("per frame: warp of the source volume + third/fourth + occlusion", b, warp_and_project),
            ("per frame: SPADE decoder", b, lambda: gen.decoder(decoder_in)),
        ]
        print("breakdown (median seconds):")
        total_per_frame = 0.0
        for name, per, fn in parts:
            fn()
            seconds = _median_time(fn, args.repeats, sync) / per
            if name.startswith("per frame"):
                total_per_frame += seconds
            print(f"  {seconds:8.3f}  {name}", flush=True)
        clip_part = sum(_median_time(fn, 1, sync) for name, _, fn in parts[:2]) / args.frames
        print(f"  sum of per-frame parts {total_per_frame:.3f} s + per-clip parts / frames {clip_part:.3f} s")


if __name__ == "__main__":
    main()
