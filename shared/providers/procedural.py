"""``procedural``: a deterministic picture computed from prompt, size and image index.

Not an AI model, and not pretending to be one: it makes the service work out of the
box with no keys and no network, and it is the test workhorse. Streamed requests get
its partial images as a progressive render (the final picture in coarse blocks).
Edits blend the input with the prompt's picture inside the mask; variations mirror
and tint the input: deterministic transforms, honestly not image models.
"""

from __future__ import annotations

import hashlib
import io
from functools import lru_cache

from PIL import Image, ImageDraw, ImageOps

from shared.core.errors import PermanentProviderError
from shared.jobs.schemas import GenerationParams
from shared.providers.base import (
    Call,
    GeneratedImage,
    Generation,
    Inputs,
)
from shared.registry import parse_size


def render(prompt: str, width: int, height: int, index: int) -> Image.Image:
    digest = hashlib.sha256(f"{prompt}\x00{index}".encode()).digest()
    c1, c2 = tuple(digest[0:3]), tuple(digest[3:6])
    # A horizontal gradient between two colours derived from the prompt...
    ramp = _ramp(width, height)
    img = Image.composite(
        Image.new("RGB", (width, height), c1), Image.new("RGB", (width, height), c2), ramp
    )
    # ...with a few shapes whose position and colour also come from the digest.
    draw = ImageDraw.Draw(img)
    for i in range(4):
        b = digest[6 + i * 6 : 12 + i * 6]
        x0, y0 = b[0] * width // 256, b[1] * height // 256
        r = max(2, b[2] * min(width, height) // 1024)
        draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=(b[3], b[4], b[5]))
    return img


@lru_cache(maxsize=32)
def _ramp(width: int, height: int) -> Image.Image:
    """The gradient mask for a size; made once (composite only reads it)."""
    return Image.linear_gradient("L").rotate(90).resize((width, height))


class ProceduralProvider:
    def generate(self, call: Call) -> Generation:
        params, inputs, partials = call.params, call.inputs, call.partials
        base = _base(inputs) if params.operation != "generate" else None
        fallback = base.size if base is not None else (1024, 1024)
        width, height = parse_size(params.size) or fallback
        images = []
        for index in range(call.first_index, call.first_index + call.count):
            image = render(params.prompt, width, height, index)
            if base is not None and inputs is not None:
                image = _transform(params, inputs, base.resize((width, height)), image, index)
            # A progressive render for streamed requests: the same picture, coarse
            # blocks first, each partial twice as fine as the one before.
            for k in range(params.partial_images):
                block = 2 ** (params.partial_images - k + 1)
                coarse = image.resize((max(1, width // block), max(1, height // block)))
                partials(index, k, _png(coarse.resize((width, height), Image.Resampling.NEAREST)))
            images.append(GeneratedImage(data=_png(image)))
        return Generation(images=images)


def _base(inputs: Inputs | None) -> Image.Image:
    """The picture an edit or variation starts from: its input images, averaged."""
    if inputs is None or not inputs.images:
        raise PermanentProviderError("an edit needs an input image", code="invalid_value")
    # Decoded one at a time, each let go once blended in: a request's inputs are
    # never all held decoded at once.
    base = Image.open(io.BytesIO(inputs.images[0])).convert("RGB")
    for i, data in enumerate(inputs.images[1:], start=2):
        with Image.open(io.BytesIO(data)) as other:
            # A running mean.
            base = Image.blend(base, other.convert("RGB").resize(base.size), 1 / i)
    return base


def _transform(
    params: GenerationParams, inputs: Inputs, base: Image.Image, picture: Image.Image, index: int
) -> Image.Image:
    """Edit: the input blended half and half with the prompt's picture, inside the
    mask's transparent pixels only (all of it without a mask). Variation: the input,
    mirrored on odd indexes, tinted a quarter towards the picture's colours."""
    if params.operation == "variation":
        varied = ImageOps.mirror(base) if index % 2 else base
        return Image.blend(varied, picture, 0.25)
    blended = Image.blend(base, picture, 0.5)
    if inputs.mask is None:
        return blended
    alpha = Image.open(io.BytesIO(inputs.mask)).convert("RGBA").getchannel("A")
    edit_here = ImageOps.invert(alpha.resize(base.size))  # transparent: 255 = edit
    return Image.composite(blended, base, edit_here)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
