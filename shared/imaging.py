"""Re-encode provider output into the requested format (png, jpeg, webp) with Pillow."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

from shared.core.errors import InvalidRequest, UnreadableImage

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


@dataclass
class EncodedImage:
    data: bytes
    width: int
    height: int
    fmt: str

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.fmt]


def encode(data: bytes, fmt: str, compression: int | None = None) -> EncodedImage:
    """The image in ``fmt``. Already in that format (the usual case): kept as it came,
    checked by its header and chunk checksums (``verify``), never decoded."""
    try:
        img: Image.Image = Image.open(io.BytesIO(data))
        if (img.format or "").upper() == _PIL_FORMATS[fmt] and compression is None:
            img.verify()
            return EncodedImage(data=data, width=img.width, height=img.height, fmt=fmt)
        img.load()
    except Exception as exc:  # Pillow raises several unrelated types here
        raise UnreadableImage(f"provider returned an unreadable image: {exc}") from exc
    if fmt == "jpeg" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    buf = io.BytesIO()
    options: dict[str, int] = {}
    if compression is not None and fmt in ("jpeg", "webp"):
        # OpenAI's output_compression is 0-100 "compression"; Pillow wants quality.
        options["quality"] = max(1, 100 - compression)
    img.save(buf, format=_PIL_FORMATS[fmt], **options)
    return EncodedImage(data=buf.getvalue(), width=img.width, height=img.height, fmt=fmt)


# --- input images of edits and variations ------------------------------------------

INPUT_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}


@dataclass(frozen=True)
class InputImage:
    """An uploaded image, checked: its format, size and whether it has transparency."""

    data: bytes
    fmt: str
    width: int
    height: int
    has_alpha: bool


def read_input(data: bytes, param: str, max_bytes: int, max_pixels: int) -> InputImage:
    """``data`` as an input image, or a 400 naming ``param``: png, jpeg or webp, at most
    ``max_bytes`` and ``max_pixels`` (read from its header, before anything is
    decoded: a 657 KB PNG may declare 169 Mpx, 676 MiB once decoded), fully
    decodable. The decoded pixels are let go before this returns."""
    if not data:
        raise InvalidRequest(f"'{param}' is empty.", param=param, code="invalid_value")
    if len(data) > max_bytes:
        raise too_many_bytes(param, len(data), max_bytes)
    not_an_image = InvalidRequest(
        f"'{param}' must be a png, jpeg or webp image.", param=param, code="invalid_value"
    )
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb warning: our limit below is lower and says more.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data))  # the header only
    except Image.DecompressionBombError:
        raise _too_many_pixels(param, None, max_pixels) from None
    except Exception:  # Pillow raises several unrelated types here
        raise not_an_image from None
    fmt = INPUT_FORMATS.get(img.format or "")
    if fmt is None:
        raise not_an_image
    if img.width * img.height > max_pixels:
        raise _too_many_pixels(param, img.size, max_pixels)
    try:
        img.load()
    except Exception:
        raise not_an_image from None
    alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    return InputImage(data, fmt, img.width, img.height, alpha)


def too_many_bytes(param: str, size: int, limit: int) -> InvalidRequest:
    return InvalidRequest(
        f"'{param}' is {size} bytes; the most an input image may have is {limit}.",
        param=param,
        code="file_too_large",
    )


def check_total_pixels(images: list[InputImage], max_total: int) -> None:
    """All of one request's input images together hold at most ``max_total`` pixels."""
    total = sum(i.width * i.height for i in images)
    if total > max_total:
        raise InvalidRequest(
            f"The input images have {total} pixels together; the most one request may have "
            f"is {max_total}.",
            param="image",
            code="image_too_large",
        )


def _too_many_pixels(param: str, size: tuple[int, int] | None, limit: int) -> InvalidRequest:
    what = f"{size[0]}x{size[1]} ({size[0] * size[1]} pixels)" if size else "too many pixels"
    return InvalidRequest(
        f"'{param}' is {what}; the most an input image may have is {limit} pixels.",
        param=param,
        code="image_too_large",
    )


def check_mask(mask: InputImage, image: InputImage) -> None:
    """A mask is a PNG of the image's size whose transparent pixels mark what to edit."""
    if mask.fmt != "png" or not mask.has_alpha:
        raise InvalidRequest(
            "'mask' must be a PNG with an alpha channel (its transparent pixels are edited).",
            param="mask",
            code="invalid_value",
        )
    if (mask.width, mask.height) != (image.width, image.height):
        raise InvalidRequest(
            f"'mask' is {mask.width}x{mask.height}; it must be the size of the image "
            f"({image.width}x{image.height}).",
            param="mask",
            code="invalid_value",
        )
