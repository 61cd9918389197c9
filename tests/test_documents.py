"""Uploads into pages and chunks: kind detection, PDF rendering and its DPI policy, text
chunking and JSONL records (office conversion: tests/test_office.py)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from common.errors import EmbedqError, InvalidRequest, UnsupportedMediaType
from common.inputs.documents import (
    chunk_text,
    count_pdf_pages,
    decode_text,
    parse_jsonl,
    render_pdf_pages,
)
from common.inputs.kinds import detect_kind
from common.settings import Settings

DEFAULTS = Settings()

COLORS = [(255, 0, 0), (0, 128, 0), (0, 0, 255)]
PAGE_POINTS = (144, 72)  # a 2 x 1 inch page: Pillow writes one pixel a point at its default 72 dpi


def make_pdf(pages: int) -> bytes:
    images = [Image.new("RGB", PAGE_POINTS, COLORS[i % len(COLORS)]) for i in range(pages)]
    buffer = io.BytesIO()
    images[0].save(buffer, "PDF", save_all=True, append_images=images[1:])
    return buffer.getvalue()


def refusal(kind: type[EmbedqError], call, *args) -> str:
    with pytest.raises(kind) as caught:
        call(*args)
    assert caught.value.param == "file"
    return caught.value.message


# Kinds

ZIP = b"PK\x03\x04\x14\x00\x06\x00"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"


@pytest.mark.parametrize(
    ("filename", "content_type", "head", "kind"),
    [
        ("paper.pdf", "application/pdf", b"%PDF-1.7\n", "pdf"),
        (None, None, b"%PDF-1.4\n", "pdf"),
        ("scan.bin", "application/octet-stream", PNG, "image"),  # the bytes beat the name
        ("photo.jpg", None, b"\xff\xd8\xff\xe0\x00\x10JFIF", "image"),
        ("notes.txt", "text/plain", b"hello", "text"),
        ("README.md", "application/octet-stream", b"# Title", "text"),
        ("upload", "text/markdown; charset=utf-8", b"# Title", "text"),
        ("BMW notes.txt", None, b"BMW cars and more", "text"),  # not a BMP header
        ("corpus.jsonl", None, b'{"text": "a"}\n', "jsonl"),
        ("report.docx", None, ZIP, "office"),
        (
            "deck",
            "application/vnd.openxmlformats-officedocument.presentationml.presentation",
            ZIP,
            "office",
        ),
        ("old.doc", None, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "office"),
    ],
)
def test_detect_kind(filename, content_type, head, kind):
    assert detect_kind(filename, content_type, head) == kind


@pytest.mark.parametrize(
    ("filename", "content_type", "head"),
    [
        ("archive.zip", "application/zip", ZIP),
        ("notes.txt", "text/plain", ZIP),  # a zip is office or nothing
        ("report.docx", None, b"just some text"),  # named office, but neither a zip nor a signature
        ("icon.ico", "image/x-icon", b"\x00\x00\x01\x00\x01\x00\x10\x10"),
        ("program.exe", "application/octet-stream", b"MZ\x90\x00"),
        (None, None, b"no idea what this is"),
    ],
)
def test_unsupported_kinds_are_415(filename, content_type, head):
    message = refusal(UnsupportedMediaType, detect_kind, filename, content_type, head)
    assert message.startswith("unsupported file type") and "send a PDF" in message


# PDF


@pytest.mark.parametrize(("pages", "dpi"), [(3, 200), (50, 150)])
def test_pdf_pages_are_counted_and_rendered_at_the_policy_dpi(pages, dpi):
    data = make_pdf(pages)
    assert count_pdf_pages(data) == pages
    rendered = list(render_pdf_pages(data, DEFAULTS.pdf_dpi(pages), DEFAULTS.max_image_pixels))
    assert [index for index, _ in rendered] == list(range(pages))
    expected_size = (PAGE_POINTS[0] * dpi // 72, PAGE_POINTS[1] * dpi // 72)
    for index, image in rendered[:3]:
        assert image.mode == "RGB" and image.size == expected_size
        pixel = image.getpixel((image.width // 2, image.height // 2))
        assert all(abs(a - b) <= 2 for a, b in zip(pixel, COLORS[index], strict=True))


def test_pdf_pages_render_one_at_a_time_and_slice():
    pages = render_pdf_pages(make_pdf(4), 72, DEFAULTS.max_image_pixels, start=1, stop=10)
    index, image = next(pages)  # a generator: nothing past page 2 is rendered yet
    assert (index, image.size) == (1, PAGE_POINTS)
    assert [index for index, _ in pages] == [2, 3]


def test_a_page_too_large_for_the_pixel_limit_renders_smaller():
    [(_, image)] = render_pdf_pages(make_pdf(1), 200, 10_000)  # the page at 200 dpi would be 400 x 200
    assert image.width * image.height <= 10_000 * 1.02
    assert abs(image.width / image.height - 2) < 0.05


@pytest.mark.parametrize(
    "data",
    [b"%PDF-1.7\nthis is not a PDF body", make_pdf(2)[:300], b""],
    ids=["garbage", "cut", "empty"],
)
def test_corrupt_pdf_is_a_400_when_opened(data):
    message = refusal(InvalidRequest, count_pdf_pages, data)
    assert message == "the PDF could not be opened: Failed to load document (PDFium: Data format error)."
    # refused at the call, before any page is asked for
    assert refusal(InvalidRequest, render_pdf_pages, data, 200, DEFAULTS.max_image_pixels) == message


# Text


def test_decode_text_drops_a_bom_and_names_the_bad_line():
    assert decode_text("\ufeffhé".encode()) == "hé"
    message = refusal(InvalidRequest, decode_text, b"\xef\xbb\xbfok\nstill ok\nbad \xff here")
    assert message == "the text is not valid UTF-8 (first bad byte on line 3)"


PROSE = " ".join(f"Sentence {i} says a thing or two about topic {i % 7}." for i in range(80))


@pytest.mark.parametrize(("size", "overlap"), [(200, 40), (500, 100), (120, 0)])
def test_chunks_keep_size_and_overlap_and_end_at_sentences(size, overlap):
    chunks = chunk_text(PROSE, size, overlap)
    assert len(chunks) > 3
    previous_start = previous_end = 0
    for number, chunk in enumerate(chunks):
        assert len(chunk) <= size and chunk.endswith(".")
        start = PROSE.index(chunk, previous_start + 1 if number else 0)
        assert start == 0 if number == 0 else start < previous_end + 2  # no gap but the space
        if number and overlap:
            assert 0 < previous_end - start <= overlap
            assert PROSE[start - 1] == " "  # the overlap starts on a word
        previous_start, previous_end = start, start + len(chunk)
    assert previous_end == len(PROSE)


def test_a_paragraph_break_beats_a_later_sentence_break():
    first = "Alpha beta gamma delta. Alpha beta gamma delta. Alpha beta gamma delta."
    text = f"{first}\n\nShort one. Another short one. And a third one to finish."
    assert chunk_text(text, 120, 0)[0] == first


def test_chunks_break_between_words_when_there_is_no_sentence():
    words = [f"word{i}" for i in range(200)]
    for chunk in chunk_text(" ".join(words), 50, 12):
        assert len(chunk) <= 50 and set(chunk.split()) <= set(words)


def test_one_long_word_is_cut_hard():
    text = "x" * 250
    chunks = chunk_text(text, 100, 20)
    assert [len(chunk) for chunk in chunks] == [100, 100, 90]
    assert chunks[0] + chunks[1][20:] + chunks[2][20:] == text


def test_short_blank_and_invalid_chunking():
    assert chunk_text("  hello  ", 100, 10) == ["hello"]
    assert chunk_text(" \n\n ", 100, 10) == []
    for size, overlap in [(0, 0), (100, 100), (100, -1)]:
        with pytest.raises(ValueError):
            chunk_text("text", size, overlap)


# JSONL


def test_jsonl_records():
    data = (
        '{"id": "a", "text": "first", "metadata": {"page": 1}}\r\n'
        "\n"
        '{"text": "no id: the line number"}\n'
        '{"id": 7, "text": "one\u2028line"}\n'
    ).encode()
    assert parse_jsonl(data) == [
        {"id": "a", "text": "first", "metadata": {"page": 1}},
        {"id": "3", "text": "no id: the line number", "metadata": {}},
        {"id": "7", "text": "one\u2028line", "metadata": {}},
    ]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"text": "x"', "not valid JSON (Expecting ',' delimiter at column 13)"),
        ('["x"]', "expected a JSON object"),
        ('{"id": "b"}', '"text" must be a non-empty string'),
        ('{"text": "   "}', '"text" must be a non-empty string'),
        ('{"id": true, "text": "x"}', '"id" must be a string or an integer'),
        ('{"text": "x", "metadata": [1]}', '"metadata" must be a JSON object'),
        (
            '{"text": "x", "title": "t"}',
            "unknown field(s) ['title']; a record has id, text and metadata",
        ),
        ('{"id": "a", "text": "again"}', "duplicate id 'a' (first on line 1)"),
    ],
)
def test_a_bad_jsonl_line_is_named(line, problem):
    data = f'{{"id": "a", "text": "fine"}}\n{line}\n'.encode()
    assert refusal(InvalidRequest, parse_jsonl, data) == f"JSONL line 2: {problem}"


def test_jsonl_without_records_or_not_utf8():
    assert refusal(InvalidRequest, parse_jsonl, b"\n \n") == "the JSONL file has no records"
    assert "line 2" in refusal(InvalidRequest, parse_jsonl, b'{"text": "ok"}\n{"text": "\xff"}\n')
