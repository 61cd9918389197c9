"""What an upload is (PDF, image, office document, text, JSONL), from its first bytes, else its
name, else its content type. The API sorts uploads with it before any work is queued; it loads no
document library."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from ..errors import UnsupportedMediaType

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
OFFICE_EXTENSIONS = frozenset({".doc", ".docx", ".ppt", ".pptx", ".xls", ".xlsx", ".odt", ".odp", ".ods", ".rtf"})
_EXTENSIONS: dict[str, DocumentKind] = {
    ".pdf": "pdf",
    **dict.fromkeys((".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"), "image"),
    **dict.fromkeys((".txt", ".md", ".markdown"), "text"),
    **dict.fromkeys((".jsonl", ".ndjson"), "jsonl"),
    **dict.fromkeys(OFFICE_EXTENSIONS, "office"),
}
_CONTENT_TYPES: dict[str, DocumentKind] = {
    "application/pdf": "pdf",
    **dict.fromkeys(("image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "image/tiff"), "image"),
    **dict.fromkeys(("text/plain", "text/markdown"), "text"),
    **dict.fromkeys(("application/jsonl", "application/x-ndjson", "application/x-jsonlines"), "jsonl"),
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


def detect_kind(filename: str | None, content_type: str | None, head: bytes) -> DocumentKind:
    """What an upload is, from its first bytes (a few KiB), else its name, else its content type."""
    extension = Path(filename or "").suffix.lower()
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    claimed = _EXTENSIONS.get(extension) or _CONTENT_TYPES.get(media_type)
    for signature, kind in _SIGNATURES:
        if signature.match(head):
            return kind
    # Otherwise trust the claim where the content agrees: a zip archive can only be an office
    # document (the worker checks its parts before LibreOffice sees it), and an office document
    # that is no zip has a signature above.
    if claimed is not None and (claimed == "office") == head.startswith(_ZIP):
        return claimed
    described = f"{filename!r}" + (f" ({media_type})" if media_type else "")
    raise UnsupportedMediaType(f"unsupported file type for {described}; {_ACCEPTED}", PARAM)
