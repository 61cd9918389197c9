"""Uploaded files into what the models take: PDF and office pages as images, text as chunks.

PDFs render lazily, page by page, so pages can flow to the GPU in batches while the rest still
renders (office documents become PDFs first: common.inputs.office); text is split into
overlapping chunks; JSONL gives one record a line. Only the ingestion worker loads this module (and PDFium with it).
"""

from __future__ import annotations

import codecs
import json
import math
import re
import threading
from collections.abc import Iterator

import pypdfium2 as pdfium
from PIL import Image

from ..errors import InvalidRequest
from .kinds import PARAM

# PDFium is not thread-safe: one document at a time in a process.
_PDFIUM_LOCK = threading.Lock()


def count_pdf_pages(data: bytes) -> int:
    """The number of pages; InvalidRequest naming the problem when the PDF cannot be opened."""
    with _PDFIUM_LOCK:
        pdf = _open_pdf(data)
        try:
            return len(pdf)
        finally:
            pdf.close()


def render_pdf_pages(
    data: bytes, dpi: int, max_pixels: int, start: int = 0, stop: int | None = None
) -> Iterator[tuple[int, Image.Image]]:
    """(page index, RGB image) for pages `start` to `stop`, each rendered when asked for.

    The PDF is opened now, so a corrupt file fails here rather than at the first page. A page too
    large to render at `dpi` within `max_pixels` renders at the resolution that fits.
    """
    with _PDFIUM_LOCK:
        pdf = _open_pdf(data)
        count = len(pdf)
    pages = range(start, count if stop is None else min(stop, count))
    return _render_pages(pdf, dpi, pages, max_pixels)


def decode_text(data: bytes) -> str:
    """UTF-8 text (a leading byte-order mark dropped); 400 naming where it is not UTF-8."""
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InvalidRequest(f"the text is not valid UTF-8 (first bad byte on line {line})", PARAM) from None


_SPACE = re.compile(r"\s+")
_BREAKS = (  # best first
    re.compile(r"\n[^\S\n]*\n\s*"),  # paragraph
    re.compile(r"[.!?…。！？][\"'”’)\]]*\s+"),  # sentence
    _SPACE,  # word
)


def chunk_text(text: str, size: int, overlap: int) -> list[str]:
    """Chunks of at most `size` characters, each starting about `overlap` characters before the
    previous one ended; a chunk ends at the last paragraph, else sentence, else word break in its
    second half, and is cut mid-word only when there is none."""
    if size <= 0 or not 0 <= overlap < size:
        raise ValueError(f"need 0 <= overlap < size, got size={size}, overlap={overlap}")
    chunks: list[str] = []
    start = 0
    while start < len(text):
        end = start + size
        if end >= len(text):
            cut = len(text)
        else:
            # Look in the second half, and past the overlap so that the next chunk starts later.
            cut = _last_break(text, start + max(size // 2, overlap + 1), end)
        chunk = text[start:cut].strip()
        if chunk:
            chunks.append(chunk)
        if cut == len(text):
            break
        start = _word_start(text, cut - overlap, cut)
    return chunks


def parse_jsonl(data: bytes) -> list[dict]:
    """`{id, text, metadata}` records, one a line; `id` defaults to the line number."""
    records: list[dict] = []
    first_line: dict[str, int] = {}
    # Split on "\n" only: str.splitlines would also split inside strings holding U+2028.
    for number, line in enumerate(decode_text(data).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _bad_line(number, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise _bad_line(number, "expected a JSON object")
        unknown = sorted(record.keys() - {"id", "text", "metadata"})
        if unknown:
            raise _bad_line(number, f"unknown field(s) {unknown}; a record has id, text and metadata")
        text, metadata = record.get("text"), record.get("metadata", {})
        record_id = record.get("id", number)
        if not isinstance(text, str) or not text.strip():
            raise _bad_line(number, '"text" must be a non-empty string')
        if isinstance(record_id, bool) or not isinstance(record_id, (str, int)):
            raise _bad_line(number, '"id" must be a string or an integer')
        if not isinstance(metadata, dict):
            raise _bad_line(number, '"metadata" must be a JSON object')
        record_id = str(record_id)
        if record_id in first_line:
            raise _bad_line(number, f"duplicate id {record_id!r} (first on line {first_line[record_id]})")
        first_line[record_id] = number
        records.append({"id": record_id, "text": text, "metadata": metadata})
    if not records:
        raise InvalidRequest("the JSONL file has no records", PARAM)
    return records


def _open_pdf(data: bytes) -> pdfium.PdfDocument:
    try:
        pdf = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        raise InvalidRequest(f"the PDF could not be opened: {exc}", PARAM) from None
    if len(pdf) == 0:
        pdf.close()
        raise InvalidRequest("the PDF has no pages", PARAM)
    return pdf


def _render_pages(
    pdf: pdfium.PdfDocument, dpi: int, pages: range, max_pixels: int
) -> Iterator[tuple[int, Image.Image]]:
    try:
        for index in pages:
            with _PDFIUM_LOCK:
                image = _render_page(pdf, index, dpi, max_pixels)
            yield index, image
    finally:
        with _PDFIUM_LOCK:
            pdf.close()


def _render_page(pdf: pdfium.PdfDocument, index: int, dpi: int, max_pixels: int) -> Image.Image:
    try:
        page = pdf[index]
        try:
            width, height = page.get_size()  # points, 1/72 inch
            # A poster or a plan at document resolution would be gigapixels: fit it to the limit.
            scale = min(dpi / 72, math.sqrt(max_pixels / max(width * height, 1.0)))
            return page.render(scale=scale).to_pil()
        finally:
            page.close()
    except pdfium.PdfiumError as exc:
        raise InvalidRequest(f"page {index + 1} of the PDF could not be rendered: {exc}", PARAM) from None


def _last_break(text: str, low: int, high: int) -> int:
    """The end of the last paragraph, else sentence, else word break in text[low:high], or high."""
    for pattern in _BREAKS:
        matches = list(pattern.finditer(text, low, high))
        if matches:
            return matches[-1].end()
    return high


def _word_start(text: str, low: int, high: int) -> int:
    """The first word start in text[low:high] (0 < low), or `low` when that span is in one word."""
    if text[low - 1].isspace():
        return low
    space = _SPACE.search(text, low, high)
    return space.end() if space else low


def _bad_line(number: int, problem: str) -> InvalidRequest:
    return InvalidRequest(f"JSONL line {number}: {problem}", PARAM)
