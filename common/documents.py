"""Uploaded files into what the models take: PDF and office pages as images, text as chunks.

`detect_kind` sorts an upload (415 for what we do not take); PDFs render lazily, page by page, so
pages can flow to the GPU in batches while the rest still renders; office documents become PDFs
through LibreOffice; text is split into overlapping chunks; JSONL gives one record a line.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pypdfium2 as pdfium
from PIL import Image

from .errors import InvalidRequest, UnsupportedMediaType
from .settings import get_settings

PARAM = "file"
DocumentKind = Literal["pdf", "image", "text", "jsonl", "office"]

# Content signatures, trusted over the name and the content type the client sent.
_SIGNATURES: tuple[tuple[re.Pattern[bytes], DocumentKind], ...] = tuple(
    (re.compile(pattern, re.DOTALL), kind)
    for pattern, kind in (
        (rb"%PDF-", "pdf"),
        (rb"\x89PNG\r\n\x1a\n", "image"),
        (rb"\xff\xd8\xff", "image"),
        (rb"GIF8[79]a", "image"),
        (rb"RIFF.{4}WEBP", "image"),
        (rb"BM.{4}\x00\x00\x00\x00", "image"),
        (rb"II\*\x00|MM\x00\*", "image"),
        (rb"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "office"),  # OLE2: .doc, .ppt, .xls
        (rb"\{\\rtf", "office"),
    )
)
_ZIP = b"PK\x03\x04"  # DOCX, PPTX, XLSX and OpenDocument files are zip archives
_OFFICE_EXTENSIONS = frozenset(
    {".doc", ".docx", ".ppt", ".pptx", ".xls", ".xlsx", ".odt", ".odp", ".ods", ".rtf"}
)
_EXTENSIONS: dict[str, DocumentKind] = {
    ".pdf": "pdf",
    **dict.fromkeys((".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"), "image"),
    **dict.fromkeys((".txt", ".md", ".markdown"), "text"),
    **dict.fromkeys((".jsonl", ".ndjson"), "jsonl"),
    **dict.fromkeys(_OFFICE_EXTENSIONS, "office"),
}
_CONTENT_TYPES: dict[str, DocumentKind] = {
    "application/pdf": "pdf",
    **dict.fromkeys(
        ("image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "image/tiff"), "image"
    ),
    **dict.fromkeys(("text/plain", "text/markdown"), "text"),
    **dict.fromkeys(
        ("application/jsonl", "application/x-ndjson", "application/x-jsonlines"), "jsonl"
    ),
    **dict.fromkeys(
        (
            "application/msword",
            "application/vnd.ms-powerpoint",
            "application/vnd.ms-excel",
            "application/rtf",
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
            "application/vnd.openxmlformats-officedocument.presentationml.presentation",
            "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
            "application/vnd.oasis.opendocument.text",
            "application/vnd.oasis.opendocument.presentation",
            "application/vnd.oasis.opendocument.spreadsheet",
        ),
        "office",
    ),
}
_ACCEPTED = (
    "send a PDF, an image (PNG, JPEG, WEBP, GIF, BMP, TIFF), an office document "
    "(DOCX, PPTX, XLSX, ODT, ...), text (.txt, .md) or JSONL (.jsonl)"
)

# PDFium is not thread-safe, and the API may open PDFs from several threads at once.
_PDFIUM_LOCK = threading.Lock()


def detect_kind(filename: str | None, content_type: str | None, head: bytes) -> DocumentKind:
    """What an upload is, from its first bytes (a few KiB), else its name, else its content type."""
    extension = Path(filename or "").suffix.lower()
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    claimed = _EXTENSIONS.get(extension) or _CONTENT_TYPES.get(media_type)
    for signature, kind in _SIGNATURES:
        if signature.match(head):
            return kind
    # Otherwise trust the claim, except a zip archive's claim to be anything but office.
    if claimed == "office" or (claimed is not None and not head.startswith(_ZIP)):
        return claimed
    described = f"{filename!r}" + (f" ({media_type})" if media_type else "")
    raise UnsupportedMediaType(f"unsupported file type for {described}; {_ACCEPTED}", PARAM)


def pdf_dpi(page_count: int) -> int:
    """The rendering resolution for a document of `page_count` pages."""
    settings = get_settings()
    return (
        settings.pdf_dpi_large if page_count >= settings.pdf_large_pages else settings.pdf_dpi_small
    )


def count_pdf_pages(data: bytes) -> int:
    """The number of pages; InvalidRequest naming the problem when the PDF cannot be opened."""
    with _PDFIUM_LOCK:
        pdf = _open_pdf(data)
        try:
            return len(pdf)
        finally:
            pdf.close()


def render_pdf_pages(
    data: bytes, dpi: int | None = None, start: int = 0, stop: int | None = None
) -> Iterator[tuple[int, Image.Image]]:
    """(page index, RGB image) for pages `start` to `stop`, each rendered when asked for.

    The PDF is opened now, so a corrupt file fails here rather than at the first page. `dpi`
    defaults to the policy for the whole document's page count; a page too large to render at it
    within `max_image_pixels` renders at the resolution that fits.
    """
    with _PDFIUM_LOCK:
        pdf = _open_pdf(data)
        count = len(pdf)
    pages = range(start, count if stop is None else min(stop, count))
    return _render_pages(pdf, dpi or pdf_dpi(count), pages, get_settings().max_image_pixels)


def convert_office_to_pdf(data: bytes, filename: str) -> bytes:
    """The PDF of an office document, converted by LibreOffice (`soffice`) in a scratch folder."""
    extension = Path(filename).suffix.lower()
    soffice = shutil.which("soffice")
    if soffice is None:
        raise UnsupportedMediaType(
            f"converting {extension or 'office'} files to PDF needs LibreOffice (soffice) on the "
            "PATH, and this server has none; upload a PDF instead",
            PARAM,
        )
    timeout = get_settings().office_timeout_s
    with tempfile.TemporaryDirectory(prefix="embedq-office-") as scratch:
        source = Path(scratch, "document" + (extension if extension in _OFFICE_EXTENSIONS else ""))
        source.write_bytes(data)
        command = [
            soffice,
            "--headless",
            "--norestore",
            # A private profile: soffice does nothing when another instance holds the default one.
            f"-env:UserInstallation={Path(scratch, 'profile').as_uri()}",
            "--convert-to",
            "pdf",
            "--outdir",
            scratch,
            str(source),
        ]
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # soffice starts soffice.bin as a child: end the whole process group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise InvalidRequest(
                f"LibreOffice took longer than {timeout:g}s to convert {filename!r}", PARAM
            ) from None
        target = source.with_suffix(".pdf")
        if process.returncode != 0 or not target.is_file():
            detail = (
                output.decode(errors="replace").strip()[-500:]
                or f"exit status {process.returncode}"
            )
            raise InvalidRequest(
                f"LibreOffice could not convert {filename!r} to PDF: {detail}", PARAM
            )
        return target.read_bytes()


def decode_text(data: bytes) -> str:
    """UTF-8 text (a leading byte-order mark dropped); 400 naming where it is not UTF-8."""
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InvalidRequest(
            f"the text is not valid UTF-8 (first bad byte on line {line})", PARAM
        ) from None


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
            raise _bad_line(
                number, f"unknown field(s) {unknown}; a record has id, text and metadata"
            )
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
            raise _bad_line(
                number, f"duplicate id {record_id!r} (first on line {first_line[record_id]})"
            )
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
        raise InvalidRequest(
            f"page {index + 1} of the PDF could not be rendered: {exc}", PARAM
        ) from None


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
