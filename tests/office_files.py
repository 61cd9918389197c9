"""Office files made here, for the LibreOffice tests: a DOCX of pages and a PPTX of slides."""

from __future__ import annotations

import io

import docx
import pptx


def make_docx(pages: int) -> bytes:
    document = docx.Document()
    for page in range(pages):
        document.add_paragraph(f"embedq docx page {page + 1}")
        if page < pages - 1:
            document.add_page_break()
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def make_pptx(slides: int) -> bytes:
    deck = pptx.Presentation()
    for slide in range(slides):
        layout = deck.slides.add_slide(deck.slide_layouts[1])
        layout.shapes.title.text = f"embedq slide {slide + 1}"
    buffer = io.BytesIO()
    deck.save(buffer)
    return buffer.getvalue()
