"""Image bombs: files whose header declares far more pixels than their bytes suggest."""

from __future__ import annotations

import struct
import zlib


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, *, complete: bool = False) -> bytes:
    """A PNG whose header says ``width`` x ``height`` RGBA, of all-zero pixels: only
    its first rows (a few kilobytes), or with ``complete`` all of them, a valid
    image about 0.1% of its decoded size (issue 24's 13000x13000 file was 657 KB)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    squeezer = zlib.compressobj(9)
    row = b"\0" * (width * 4 + 1)
    parts = [squeezer.compress(row * min(64, height))]
    if complete:
        rest = height - min(64, height)
        parts += [squeezer.compress(row * 64) for _ in range(rest // 64)]
        parts.append(squeezer.compress(row * (rest % 64)))
    parts.append(squeezer.flush(zlib.Z_FINISH if complete else zlib.Z_SYNC_FLUSH))
    png = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
    return png + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")
