"""Provider output kept as it came when already in the asked format, and checked."""

from __future__ import annotations

import io
import tracemalloc

import pytest
from PIL import Image

from shared.core.errors import InvalidRequest, UnreadableImage
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


def test_an_image_bomb_is_refused_from_its_header_before_decoding() -> None:
    from shared.imaging import read_input
    from tests.support.bombs import png_declaring

    bomb = png_declaring(13000, 13000)  # 169 Mpx, 676 MiB decoded
    assert len(bomb) < 64 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(InvalidRequest) as caught:
            read_input(bomb, "image", 50 * 2**20, 4096 * 4096)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert caught.value.code == "image_too_large"
    assert caught.value.param == "image"
    assert "13000x13000" in str(caught.value)
    assert peak < 8 * 2**20  # the header was read, nothing decoded


def test_inputs_over_the_pixel_limits_are_refused() -> None:
    from shared.imaging import check_total_pixels, read_input

    buf = io.BytesIO()
    Image.new("RGB", (300, 200)).save(buf, format="PNG")
    image = read_input(buf.getvalue(), "image", 2**20, 300 * 200)
    with pytest.raises(InvalidRequest, match="300x200"):
        read_input(buf.getvalue(), "mask", 2**20, 300 * 200 - 1)
    check_total_pixels([image, image], 2 * 300 * 200)
    with pytest.raises(InvalidRequest) as caught:
        check_total_pixels([image, image, image], 2 * 300 * 200)
    assert caught.value.code == "image_too_large"
