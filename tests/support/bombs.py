"""Decompression bombs: valid PNGs of zero rows, a few hundred KB on disk whatever their size in pixels (written
without ever holding the picture: after a full flush every row compresses to the same bytes)."""
from __future__ import annotations

import struct
import zlib


def write_png_bomb(path, width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> None:
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
