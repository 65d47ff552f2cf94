"""Speed of our face renderer path on synthetic weights (CPU by default).

    python -m bench.render_speed --size 256 --frames 4 --threads 2 [--batch-size N] [--workers N] [--repeats 3]

Times what the official ``make_animation`` does for a clip (canonical keypoints once, then MappingNet + keypoint
transformation + generator per frame), as our ``FaceRenderer.frames`` does it (plus the source encoding, once per
clip), and prints ``per_frame_s=`` = median call time / frames after one warm-up call. Then a breakdown: each part
timed on its own (median of the repeats), per frame for the per-frame parts, per clip for the per-clip parts.
Speed does not depend on the weight values, so the synthetic recipe is loaded straight into the modules.
Reference on this kind of box (baseline_cpu.md): the official code takes 9.60 s per frame at 256, batch size 2.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


from sadtalker.facerender import FaceRenderer, prepare_render_inputs
from sadtalker.keypoints import transform_keypoints
from sadtalker.models.fast_conv import reference_computation
from sadtalker.models.generator import OcclusionAwareSPADEGenerator
from sadtalker.models.keypoint_detector import KeypointDetector
from sadtalker.models.mapping import MappingNet
from sadtalker.synthetic import file_spec, synthetic_state


def _load_synthetic(module: torch.nn.Module, file_name: str, prefix: str) -> torch.nn.Module:
    spec = [(key, shape) for key, shape, _ in file_spec(file_name) if key.startswith(prefix)]
    state = {key[len(prefix):]: torch.from_numpy(value) for key, value in synthetic_state(spec).items()}
    module.load_state_dict(state, strict=True)
    return module.eval()


def build_renderer(device: str, dtype: torch.dtype) -> FaceRenderer:
    weights = "SadTalker_V0.0.2_256.safetensors"  # the 512 file has the same tensors
    kp_extractor = _load_synthetic(KeypointDetector(), weights, "kp_extractor.")
    generator = _load_synthetic(OcclusionAwareSPADEGenerator(), weights, "generator.")
    mapping = _load_synthetic(MappingNet(70), "mapping_00229-model.pth.tar", "")
    for net in (kp_extractor, generator, mapping):
        net.to(device=device, dtype=dtype)
    return FaceRenderer(kp_extractor, generator, mapping)


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="renderer resolution (256 or 512)")
    parser.add_argument("--frames", type=int, default=4, help="frames per timed call")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=1, help="frames per network call")
    parser.add_argument("--workers", type=int, default=None,
                        help="frames rendered side by side (default: the app's choice, one per thread on a CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-part timings")
    parser.add_argument("--compare", action="store_true",
                        help="also time the reference computation (the official per-frame work: the whole generator "
                             "incl. source encoding every frame, plain convolutions), alternating with ours")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    workers = args.workers or (torch.get_num_threads() if args.device == "cpu" else 1)
    renderer = build_renderer(args.device, dtype)
    inputs = synthetic_inputs(args.size, args.frames)
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} size={args.size} "
          f"frames={args.frames} batch_size={args.batch_size} workers={workers} torch={torch.__version__}", flush=True)

    def clip():
        for _ in renderer.frames(inputs, batch_size=args.batch_size, workers=workers):
            pass

    clip()  # warm-up
    if args.compare:
        reference = lambda: reference_clip(renderer, inputs, args.batch_size)  # noqa: E731
        reference()  # warm-up
        ours_times, reference_times = [], []
        for _ in range(args.repeats):  # alternate, so both see the same load on a shared machine
            ours_times.append(_median_time(clip, 1, sync))
            reference_times.append(_median_time(reference, 1, sync))
        call_s, reference_s = statistics.median(ours_times), statistics.median(reference_times)
        print(f"reference_per_frame_s={reference_s / args.frames:.3f}  (official computation, same process, "
              f"alternating; runs: {', '.join(f'{t / args.frames:.2f}' for t in reference_times)})", flush=True)
        print(f"speedup={reference_s / call_s:.2f}x  (median reference / median ours; ours per run: "
              f"{', '.join(f'{t / args.frames:.2f}' for t in ours_times)})", flush=True)
    else:
        call_s = _median_time(clip, args.repeats, sync)
    print(f"per_frame_s={call_s / args.frames:.3f}  (clip of {args.frames} frames: {call_s:.2f} s, "
          f"median of {args.repeats} after 1 warm-up)", flush=True)
    if args.no_breakdown:
        return

    gen, kp_net = renderer.generator, renderer.kp_extractor
    mapping = renderer.mappings[inputs.channels]
    b = args.batch_size
    with torch.inference_mode():
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
