"""Provider output kept as it came when already in the asked format, and checked."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from shared.core.errors import UnreadableImage
from shared.imaging import encode


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((width, height), 40).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def test_same_format_is_kept_byte_for_byte_with_its_size() -> None:
    data = _png(48, 32)
    out = encode(data, "png")
    assert out.data == data
    assert (out.width, out.height, out.content_type) == (48, 32, "image/png")


def test_other_format_is_converted() -> None:
    out = encode(_png(20, 10), "jpeg")
    assert out.data[:3] == b"\xff\xd8\xff"
    assert (out.width, out.height) == (20, 10)


@pytest.mark.parametrize("cut", ["truncated", "corrupted"])
def test_a_damaged_image_in_the_asked_format_is_refused(cut: str) -> None:
    data = _png(64, 64)
    bad = data[: len(data) // 2] if cut == "truncated" else data[:120] + b"\0" * 40 + data[160:]
    with pytest.raises(UnreadableImage):
        encode(bad, "png")
