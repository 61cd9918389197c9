"""Input images: base64 decoding, cheap validation for the API, full decoding for the workers.

Every refusal is an `InvalidRequest` (400). The pixel size is checked from the image header, before
any pixel data is decoded, so a small file that declares a huge image (a decompression bomb) costs
nothing.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InvalidRequest

PARAM = "images"
# Pillow reports JPEGs carrying several pictures (common from phone cameras) as MPO.
ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF"})
_ALLOWED_NAMES = "PNG, JPEG, WEBP, GIF, BMP or TIFF"


def decode_image_input(value: str) -> bytes:
    """The bytes of an image sent as raw base64 or as a `data:image/...;base64,...` URL."""
    payload = value.strip()
    if payload[:5].lower() == "data:":
        header, comma, payload = payload.partition(",")
        media_type = header[5:].split(";", 1)[0].lower()
        if not comma or not header.lower().endswith(";base64"):
            raise InvalidRequest("an image data URL must be data:image/<format>;base64,<data>", PARAM)
        if media_type and not media_type.startswith("image/"):
            raise InvalidRequest(f"a data URL of type {media_type!r} is not an image", PARAM)
    elif payload[:8].lower() in ("http://", "https://"):
        raise InvalidRequest("image URLs are not fetched; send base64 or a data URL", PARAM)
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except ValueError as exc:  # binascii.Error, or characters outside ASCII
        raise InvalidRequest(f"image is not valid base64 ({exc})", PARAM) from None
    if not data:
        raise InvalidRequest("image is empty", PARAM)
    return data


def validate_image(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) as stored, from the header alone; refuses what `load_image` would refuse
    before decoding (not an image, a format we do not take, too many pixels)."""
    with _open(data, max_pixels) as image:
        return image.size


def load_image(data: bytes, max_pixels: int) -> Image.Image:
    """An upright RGB image (the first frame of an animation), transparency flattened on white."""
    image = _open(data, max_pixels)
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidRequest(f"image data is corrupt or truncated ({exc})", PARAM) from None
    return _to_rgb(image)


PNG_COLOR_TYPES = {"L": 0, "RGB": 2, "RGBA": 6}  # 8 bits per channel


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(image: Image.Image) -> bytes:
    """Lossless PNG bytes of an image, to pass a normalized image between processes.

    Written here, not by Pillow: rows unfiltered and zlib at level 1. For a page rendered at
    200 dpi (1653x2339) that took 17 ms to encode and 12 ms to decode, against 68 and 45 ms from
    Pillow's encoder at its fastest level (its per-row filter search, which also slows decoding);
    the bytes cross a local queue once, so speed matters more than size (148 KB against 126 KB).
    """
    if image.mode not in PNG_COLOR_TYPES:
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    pixels = np.asarray(image)
    height = pixels.shape[0]
    rows = np.zeros((height, 1 + pixels[0].size), np.uint8)  # each row: filter type 0, then its bytes
    rows[:, 1:] = pixels.reshape(height, -1)
    header = struct.pack(">IIBBBBB", image.width, height, 8, PNG_COLOR_TYPES[image.mode], 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows, 1))
        + _png_chunk(b"IEND", b"")
    )


PAGE_VIEWS = ("full", "thumb")


def page_views(image: Image.Image, quality: int, thumb_width: int) -> dict[str, bytes]:
    """The page as kept for people and VLMs to see: full size and `thumb_width` wide, in JPEG.

    JPEG, not WebP: a 200 dpi page (1653x2339) took 11 ms to encode at quality 80 (362 KB), against
    464 ms for WebP at its default effort (201 KB) and 83 ms at its lowest (242 KB); ingestion
    encodes every page.
    """
    image = _to_rgb(image)
    height = max(1, round(image.height * thumb_width / image.width))
    thumb = image.resize((thumb_width, height), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return {name: _jpeg(view, quality) for name, view in zip(PAGE_VIEWS, (image, thumb))}


def _jpeg(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """The image opened lazily (header read, pixels not decoded), format and size checked."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise InvalidRequest(f"image refused as a decompression bomb: {exc}", PARAM) from None
    except UnidentifiedImageError:
        raise InvalidRequest(f"data is not an image in a format we take ({_ALLOWED_NAMES})", PARAM) from None
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"image header is corrupt ({exc})", PARAM) from None
    if image.format not in ALLOWED_FORMATS:
        image.close()
        raise InvalidRequest(f"image format {image.format} is not supported; use {_ALLOWED_NAMES}", PARAM)
    # Between Pillow's own limit and twice it, Pillow only warns and would decode: refuse there too.
    limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
    width, height = image.size
    if width * height > limit:
        image.close()
        raise InvalidRequest(f"image is {width}x{height} = {width * height:,} pixels; the limit is {limit:,}", PARAM)
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I"):
        # 16-bit samples: a plain convert clips everything above 255 to white, so scale to 8 bits.
        image = image.point(lambda value: value / 256)
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", image.size, "white")
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image if image.mode == "RGB" else image.convert("RGB")
