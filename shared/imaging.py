"""Re-encode provider output into the requested format (png, jpeg, webp) with Pillow."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from shared.core.errors import UnreadableImage

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
