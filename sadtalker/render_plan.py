"""How to run the face renderer on this machine: render workers and frames per generator call, from measurement.

A short calibration per process, renderer size, precision and device (cached): a timed tiny render of each
candidate, within what free memory allows, and the fastest one is kept.

* CPU: frames side by side in worker threads (one torch thread each) against one frame on all threads; candidates
  1 .. min(torch threads, MAX_WORKERS), each bounded by half the free memory (``frame_bytes`` per frame in flight).
  Timed at CPU_CALIBRATION_SIZE (the layers' relative costs are the same at 256; a 128 frame costs a quarter).
* GPU: one worker; frames per generator call 1, 2, 4, ... while the measured memory of a call fits half the free
  device memory and the throughput still grows by >= 5 %.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from .facerender import FaceRenderer, RenderInputs

MAX_WORKERS = 4
# Bytes one 256x256 frame in flight holds on a CPU, the freed memory the renderer keeps included (cpu_memory): the
# peak resident size grew by ~1.8 GB per render worker without it, ~2.25 GB with it (2 workers vs 1, 20 frames).
FRAME_MEMORY_256 = 2.3 * 2 ** 30
CPU_CALIBRATION_SIZE = 128
MAX_FRAMES_PER_CALL = 32
MIN_GAIN = 1.05  # a larger candidate must be this much faster to be chosen


@dataclass(frozen=True)
class RenderPlan:
    workers: int  # frames rendered side by side (CPU threads); 1 on a GPU
    frames_per_call: int  # frames per generator call
    frames_per_second: float  # measured throughput of the chosen plan (at the calibration size on a CPU)
    calibration_s: float  # seconds the calibration took (0 when cached)


_plans: dict[tuple, RenderPlan] = {}
_lock = threading.Lock()


def free_memory(device: torch.device | str = "cpu") -> float:
    """Bytes of memory available now: on a GPU its free device memory; on a CPU physical free + reclaimable."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return float("inf")


def frame_bytes(size: int) -> float:
    """Memory one frame in flight holds on a CPU (float32 activations; scales with the pixel count)."""
    return FRAME_MEMORY_256 * (size / 256) ** 2


def calibration_inputs(size: int, frames: int, channels: int = 70) -> RenderInputs:
    """A tiny clip of smooth synthetic content (speed does not depend on the values)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = np.stack([0.5 + 0.25 * np.cos(2 * np.pi * (xx + c * yy)) for c in (0.5, 1.0, 1.5)])  # (3, S, S)
    rng = np.random.default_rng(0)
    coeffs = (0.1 * rng.standard_normal((frames, channels))).astype(np.float32)
    return RenderInputs(source_image=image.astype(np.float32), source_coeffs=coeffs[0].copy(), driving_coeffs=coeffs)


def _throughput(renderer: FaceRenderer, inputs: RenderInputs, workers: int, per_call: int) -> float:
    """Frames per second of rendering ``inputs`` (after the source preparation, which a clip pays once)."""
    sync = torch.cuda.synchronize if renderer.device.type == "cuda" else (lambda: None)
    frames = renderer.frames(inputs, batch_size=1, workers=workers, frames_per_call=per_call)
    next(frames)  # source preparation + first frame(s): warm-up
    sync()
    started, count = time.perf_counter(), 0
    for _ in frames:
        count += 1
    sync()
    return count / max(time.perf_counter() - started, 1e-9)


def choose_render_plan(renderer: FaceRenderer, size: int, memory: float | None = None) -> RenderPlan:
    """The render plan for ``renderer`` at ``size``, measured once per process (see the module docstring).

    ``memory``: bytes free for the renderer (default: ``free_memory`` of its device)."""
    key = (id(renderer.generator), renderer.device.type, renderer.device.index, size, renderer.precision,
           torch.get_num_threads())
    with _lock:
        if key in _plans:
            return _plans[key]
        started = time.perf_counter()
        memory = free_memory(renderer.device) if memory is None else memory
        if renderer.device.type == "cuda":
            plan = _gpu_plan(renderer, size, memory)
        else:
            plan = _cpu_plan(renderer, size, memory)
        plan = RenderPlan(plan.workers, plan.frames_per_call, plan.frames_per_second,
                          time.perf_counter() - started)
        _plans[key] = plan
        return plan


def _cpu_plan(renderer: FaceRenderer, size: int, memory: float) -> RenderPlan:
    memory_cap = max(1, int(0.5 * memory / frame_bytes(size)))
    most = max(1, min(torch.get_num_threads(), MAX_WORKERS, memory_cap))
    best = RenderPlan(1, 1, 0.0, 0.0)
    for workers in sorted({1, most}):
        inputs = calibration_inputs(min(size, CPU_CALIBRATION_SIZE), 1 + workers)  # warm-up + one round
        fps = _throughput(renderer, inputs, workers, 1)
        if fps > best.frames_per_second * (MIN_GAIN if best.frames_per_second else 1):
            best = RenderPlan(workers, 1, fps, 0.0)
    return best


def _gpu_plan(renderer: FaceRenderer, size: int, memory: float) -> RenderPlan:
    best = RenderPlan(1, 1, 0.0, 0.0)
    per_call = 1
    while per_call <= MAX_FRAMES_PER_CALL:
        torch.cuda.reset_peak_memory_stats(renderer.device)
        base = torch.cuda.memory_allocated(renderer.device)
        fps = _throughput(renderer, calibration_inputs(size, 3 * per_call), 1, per_call)  # warm-up + 2 calls
        call_bytes = torch.cuda.max_memory_allocated(renderer.device) - base
        if fps < best.frames_per_second * MIN_GAIN:
            break
        best = RenderPlan(1, per_call, fps, 0.0)
        if 2 * call_bytes * 2 > 0.5 * memory:  # the next candidate (about twice the memory) would not fit
            break
        per_call *= 2
    return best
