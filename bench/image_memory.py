"""Peak memory of reading a portrait: decompression bombs, wide pixel modes, a huge JPEG, a photo at the limit.

    python -m bench.image_memory [--keep DIR]

Each case is loaded by ``core.image.load_image`` in a fresh Python process, which reports its peak RSS
(``VmHWM``) after the imports and after loading, the time it took and what came of it (the decoded size, or
the refusal). The files are written once into a temporary folder (``--keep DIR`` keeps them there for reuse):

* a 20000x20000 RGB PNG and a 20000x20000 16-bit grey PNG (decompression bombs of ~0.5 MB: zero rows);
* a 16000x12000 baseline JPEG (192 MP: decoded reduced) and the same as a progressive JPEG (refused);
* a 40 MP RGB PNG, a 40 MP RGBA PNG and a 40 MP 16-bit grey PNG (at the limit: accepted).

Target: every accepted image peaks under 1.5 GB; every refusal answers within a second with next to no memory.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_IMAGE = os.path.join(ROOT, "examples", "portrait.png")
LIMIT_SIDES = (7740, 5160)  # 39.9 MP: just under the limit

PROBE = r"""
import json, re, sys, time
from core.errors import InputError
from core.image import load_image
def rss():  # this process's peak RSS in MB (VmHWM: unlike ru_maxrss, not inherited from the parent)
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024
before = rss()
start = time.perf_counter()
try:
    outcome = "read as %dx%d" % load_image(sys.argv[1]).shape[1::-1]
except InputError as exc:
    outcome = "refused: " + str(exc)
print(json.dumps({"before_mb": before, "peak_mb": rss(), "seconds": time.perf_counter() - start,
                  "outcome": outcome}))
"""


def write_png_bomb(path: str, width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> None:
    """A valid PNG of zero rows, a few hundred KB whatever its size: every row compresses to the same bytes after a
    full flush, so the file is written without ever holding the picture."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = bytes(1 + width * channels * bit_depth // 8)  # filter byte 0 + zero samples
    compressor = zlib.compressobj(9)
    first = compressor.compress(row) + compressor.flush(zlib.Z_FULL_FLUSH)  # with the 2-byte zlib header
    checksum = 1
    for _ in range(height):
        checksum = zlib.adler32(row, checksum)
    idat = first + first[2:] * (height - 1) + b"\x03\x00" + struct.pack(">I", checksum)  # \x03\x00: empty last block

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    with open(path, "wb") as file:
        file.write(b"\x89PNG\r\n\x1a\n")
        file.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)))
        file.write(chunk(b"IDAT", idat))
        file.write(chunk(b"IEND", b""))


def portrait_at(size: tuple[int, int], mode: str) -> Image.Image:
    image = Image.open(EXAMPLE_IMAGE).convert("RGB").resize(size, Image.Resampling.BILINEAR)
    if mode == "RGBA":
        image.putalpha(255)
    elif mode == "I;16":
        image = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
    return image


def make_cases(folder: str) -> list[tuple[str, str]]:
    cases = []

    def case(name: str, make) -> None:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            print(f"writing {name} ...", file=sys.stderr, flush=True)
            make(path)
        cases.append((name, path))

    case("bomb 20000x20000 RGB.png", lambda p: write_png_bomb(p, 20000, 20000))
    case("bomb 20000x20000 16-bit grey.png", lambda p: write_png_bomb(p, 20000, 20000, bit_depth=16, colour_type=0))
    big = (16000, 12000)
    case("photo 16000x12000 baseline.jpg", lambda p: portrait_at(big, "RGB").save(p, quality=85))
    case("photo 16000x12000 progressive.jpg", lambda p: portrait_at(big, "RGB").save(p, quality=85, progressive=True))
    case("limit 40 MP RGB.png", lambda p: portrait_at(LIMIT_SIDES, "RGB").save(p, compress_level=1))
    case("limit 40 MP RGBA.png", lambda p: portrait_at(LIMIT_SIDES, "RGBA").save(p, compress_level=1))
    case("limit 40 MP 16-bit grey.png", lambda p: portrait_at(LIMIT_SIDES, "I;16").save(p, compress_level=1))
    return cases


def measure(path: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, path], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", help="write the test images here (and reuse them next time)")
    args = parser.parse_args()
    folder = args.keep or tempfile.mkdtemp(prefix="image-memory-")
    os.makedirs(folder, exist_ok=True)
    try:
        cases = make_cases(folder)
        print(f"{'case':36} {'file':>9} {'peak RSS':>9} {'+ load':>8} {'time':>7}  outcome")
        for name, path in cases:
            result = measure(path)
            outcome = result["outcome"] if len(result["outcome"]) < 90 else result["outcome"][:87] + "..."
            print(f"{name:36} {os.path.getsize(path) / 1e6:7.1f}MB {result['peak_mb']:7.0f}MB "
                  f"{result['peak_mb'] - result['before_mb']:6.0f}MB {result['seconds']:6.2f}s  {outcome}", flush=True)
    finally:
        if not args.keep:
            for name in os.listdir(folder):
                os.remove(os.path.join(folder, name))
            os.rmdir(folder)


if __name__ == "__main__":
    main()
