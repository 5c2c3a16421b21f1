"""Image bombs: files whose header declares far more pixels than their bytes suggest."""

from __future__ import annotations

import struct
import zlib


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header says ``width`` x ``height`` RGBA, with the start of an
    all-zero image (a few kilobytes; the whole of it would compress to about 0.1%
    of its decoded size, as the 657 KB, 13000x13000 file of issue 24 did)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    squeezer = zlib.compressobj(9)
    start = squeezer.compress(b"\0" * (width * 4 + 1) * 64) + squeezer.flush(zlib.Z_SYNC_FLUSH)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", start) + _chunk(b"IEND", b"")
    )
