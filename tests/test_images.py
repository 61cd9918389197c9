"""Input images: base64 and data URLs, formats, pixel limits before decoding, orientation, RGB."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from common.errors import InvalidRequest
from common.inputs.images import decode_image_input, encode_png, load_image, validate_image

LIMIT = 1_000_000


def encoded(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels; its pixel data is garbage, so
    decoding it would fail with a different error than the size check."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def refusal(call, *args) -> str:
    with pytest.raises(InvalidRequest) as caught:
        call(*args)
    assert caught.value.status == 400 and caught.value.param == "images"
    return caught.value.message


def test_raw_base64_and_data_urls_decode_to_the_same_bytes():
    data = encoded(Image.new("RGB", (3, 2), "red"))
    text = base64.b64encode(data).decode()
    wrapped = "\n".join(text[i : i + 16] for i in range(0, len(text), 16))  # MIME-style lines
    for value in (text, wrapped, f"data:image/png;base64,{text}", f"DATA:image/png;BASE64,{text}"):
        assert decode_image_input(value) == data


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("not base64 at all!", "not valid base64"),
        ("aGVsbG8", "not valid base64"),  # padding missing
        ("data:image/png;base64,%%%", "not valid base64"),
        ("data:image/png,rawbytes", "data:image/<format>;base64,<data>"),
        ("data:text/plain;base64,aGk=", "not an image"),
        ("https://example.com/cat.png", "not fetched"),
        ("", "empty"),
    ],
)
def test_bad_image_input_is_a_400(value, expected):
    assert expected in refusal(decode_image_input, value)


def test_not_an_image_is_refused():
    for check in (load_image, validate_image):
        assert "not an image" in refusal(check, b"just some text, renamed cat.png", LIMIT)


def test_unsupported_format_is_named():
    icon = encoded(Image.new("RGB", (16, 16)), "ICO")
    assert "format ICO is not supported" in refusal(load_image, icon, LIMIT)
    assert "format ICO is not supported" in refusal(validate_image, icon, LIMIT)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_allowed_formats_load_as_rgb(fmt):
    data = encoded(Image.new("RGB", (30, 20), (0, 0, 255)), fmt)
    assert validate_image(data, LIMIT) == (30, 20)
    image = load_image(data, LIMIT)
    assert image.mode == "RGB" and image.size == (30, 20)


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    data = png_declaring(10_000, 6_000)  # 60 MP declared, 100 bytes on disk
    for check in (load_image, validate_image):
        message = refusal(check, data, 50_000_000)
        assert "10000x6000 = 60,000,000 pixels; the limit is 50,000,000" in message


def test_decompression_bomb_is_a_400():
    data = png_declaring(100_000, 100_000)  # far over Pillow's own limit: it raises at open
    assert "decompression bomb" in refusal(load_image, data, 10**12)


def test_pillow_bomb_warning_range_is_refused_too(monkeypatch):
    # Between Pillow's limit and twice it Pillow only warns; ours refuses it even under max_pixels.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    data = encoded(Image.new("RGB", (12, 12)))
    with pytest.warns(Image.DecompressionBombWarning):
        assert "the limit is 100" in refusal(load_image, data, 10_000)


def test_truncated_image_is_a_400():
    data = encoded(Image.effect_noise((64, 64), 50).convert("RGB"))
    assert validate_image(data[: len(data) // 2], LIMIT) == (64, 64)  # the header is intact
    assert "corrupt or truncated" in refusal(load_image, data[: len(data) // 2], LIMIT)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90° clockwise to display
    data = encoded(Image.new("RGB", (40, 20), "green"), "JPEG", exif=exif)
    assert validate_image(data, LIMIT) == (40, 20)
    assert load_image(data, LIMIT).size == (20, 40)


def palette_with_transparent_index() -> Image.Image:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([255, 0, 0, 0, 0, 255])  # 0 red, 1 blue
    image.info["transparency"] = 1
    return image


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("RGBA", (4, 4), (255, 0, 0, 0)), (255, 255, 255)),  # transparent: white
        (Image.new("RGBA", (4, 4), (255, 0, 0, 255)), (255, 0, 0)),
        (Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),
        (Image.new("LA", (4, 4), (0, 255)), (0, 0, 0)),
        (palette_with_transparent_index(), (255, 255, 255)),
        (Image.new("P", (4, 4), 0), (0, 0, 0)),  # default palette, opaque
        (Image.new("L", (4, 4), 128), (128, 128, 128)),
        (Image.new("CMYK", (4, 4), (0, 0, 0, 0)), (255, 255, 255)),
    ],
    ids=["rgba-clear", "rgba-opaque", "la-clear", "la-opaque", "p-clear", "p", "l", "cmyk"],
)
def test_modes_become_rgb_with_transparency_on_white(image, expected):
    fmt = "TIFF" if image.mode == "CMYK" else "PNG"
    loaded = load_image(encoded(image, fmt), LIMIT)
    assert loaded.mode == "RGB" and loaded.getpixel((1, 1)) == expected


def test_16_bit_grayscale_is_scaled_not_clipped():
    image = Image.new("I;16", (2, 1))
    image.putpixel((0, 0), 32768)
    image.putpixel((1, 0), 65535)
    loaded = load_image(encoded(image), LIMIT)
    assert [loaded.getpixel((x, 0)) for x in (0, 1)] == [(128, 128, 128), (255, 255, 255)]


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), color) for color in ("red", "blue")]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert load_image(data, LIMIT).getpixel((4, 4)) == (255, 0, 0)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "LA", "1"])
def test_encode_png_round_trips(mode):
    image = Image.effect_noise((17, 9), 40).convert(mode)
    data = encode_png(image)
    decoded = Image.open(io.BytesIO(data))
    decoded.load()  # Pillow checks every chunk's CRC and the zlib stream while reading them
    assert decoded.format == "PNG" and decoded.size == image.size
    expected = image if mode in ("RGB", "L", "RGBA") else image.convert("RGBA" if "A" in mode else "RGB")
    assert decoded.mode == expected.mode and decoded.tobytes() == expected.tobytes()
    assert load_image(data, LIMIT).tobytes() == expected.convert("RGB").tobytes()
