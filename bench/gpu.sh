#!/usr/bin/env bash
# The face renderer on a CUDA GPU: for 256 and 512, float32 and float16, frames per second (frames per generator
# call chosen for throughput), time to the first preview and the first final frame for 10 s of speech, peak GPU
# memory, and whether it keeps up with 25 fps. One line per case (bench/gpu_render.py says what each figure means).
#
#   bash bench/gpu.sh                 # on a machine with a CUDA device
#   bash bench/gpu.sh --device cpu    # smoke test of the same code path on a CPU (tiny case, figures meaningless)
#
# Installs nothing beyond the README's requirements: uses .venv if there is one, else creates it from
# requirements.txt (the pinned torch wheel from PyPI carries CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -r requirements.txt -e .
fi
PY=.venv/bin/python
if [ "${1:-}" = "--device" ] && [ "${2:-}" = "cpu" ]; then
  for dtype in float32 bfloat16; do
    "$PY" -m bench.gpu_render --device cpu --size 128 --seconds 0.12 --dtype "$dtype"
  done
  exit 0
fi
"$PY" - <<'PY'
import torch
if not torch.cuda.is_available():
    raise SystemExit("no CUDA device visible to torch (torch %s, built for CUDA %s)" % (torch.__version__, torch.version.cuda))
p = torch.cuda.get_device_properties(0)
print(f"gpu={p.name} memory_gb={p.total_memory / 2**30:.0f} torch={torch.__version__} cuda={torch.version.cuda}")
PY
for size in 256 512; do
  for dtype in float32 float16; do
    "$PY" -m bench.gpu_render --device cuda --size "$size" --dtype "$dtype" --seconds 10
  done
done
