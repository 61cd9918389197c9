"""Office documents through the real LibreOffice (Debian's, which .ci/run installs): DOCX and PPTX
files made here become PDFs with their pages and text; bytes only named like an office document
never reach it; it runs without a network, under memory and time limits, and neither a timeout
nor a killed worker leaves a LibreOffice process or a scratch folder behind."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pypdfium2 as pdfium
import pytest

from common.errors import InvalidRequest
from common.inputs.documents import count_pdf_pages
from common.inputs.office import (
    SCRATCH_PREFIX,
    _network_isolation,
    _processes_using,
    clean_up_after_dead_workers,
    conversion_command,
    convert_office_to_pdf,
)

from .office_files import make_docx, make_pptx

pytestmark = pytest.mark.skipif(shutil.which("soffice") is None, reason="LibreOffice is installed by .ci/run")

TIMEOUT = 120
MEMORY_MB = 2048


def page_texts(pdf_bytes: bytes) -> list[str]:
    pdf = pdfium.PdfDocument(pdf_bytes)
    return [pdf[i].get_textpage().get_text_range() for i in range(len(pdf))]


def scratch_folders(pid: int) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}{pid}-*"))


def test_docx_and_pptx_become_pdfs_with_their_pages_and_text():
    converted = convert_office_to_pdf(make_docx(2), "report.docx", TIMEOUT, MEMORY_MB)
    assert count_pdf_pages(converted) == 2
    assert [t.strip() for t in page_texts(converted)] == ["embedq docx page 1", "embedq docx page 2"]
    converted = convert_office_to_pdf(make_pptx(3), "deck.pptx", TIMEOUT, MEMORY_MB)
    assert count_pdf_pages(converted) == 3
    assert all(f"embedq slide {i + 1}" in text for i, text in enumerate(page_texts(converted)))
    assert not scratch_folders(os.getpid())


def plain_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", "not an office document")
    return buffer.getvalue()


@pytest.mark.parametrize("data", [b"plain text named like a document", plain_zip()])
def test_only_office_content_reaches_libreoffice(monkeypatch, tmp_path, data):
    monkeypatch.setenv("PATH", str(tmp_path))  # had LibreOffice been asked for, this would be a 415
    with pytest.raises(InvalidRequest) as caught:
        convert_office_to_pdf(data, "report.docx", TIMEOUT, MEMORY_MB)
    assert caught.value.message == (
        "'report.docx' is not an office document: its content is not OLE2, RTF, OOXML or OpenDocument"
    )


def test_libreoffice_runs_without_network_under_limits(tmp_path):
    command = conversion_command("soffice", tmp_path / "document.docx", tmp_path, 7.5, 512)
    assert command[:2] == ["unshare", "--net"], "network namespaces are allowed on these machines"
    limits = command[command.index("prlimit") : command.index("soffice")]
    assert limits == ["prlimit", f"--as={512 * 2**20}", "--cpu=8", "--"]
    # The limit holds: in 64 MiB LibreOffice cannot even load, and the upload says why.
    with pytest.raises(InvalidRequest) as caught:
        convert_office_to_pdf(make_docx(1), "report.docx", TIMEOUT, 64)
    assert caught.value.message.startswith("LibreOffice could not convert 'report.docx' to PDF: ")
    # No network inside: the namespace has only a loopback device, and it is down.
    inside = subprocess.run([*_network_isolation(), "cat", "/proc/net/dev"], capture_output=True, text=True)
    devices = [line.split(":")[0].strip() for line in inside.stdout.splitlines()[2:]]
    assert devices == ["lo"]


def test_a_timeout_kills_libreoffice_and_removes_its_folder():
    started = time.monotonic()
    with pytest.raises(InvalidRequest) as caught:
        convert_office_to_pdf(make_docx(3), "slow.docx", 0.3, MEMORY_MB)
    assert caught.value.message == "LibreOffice took longer than 0.3s to convert 'slow.docx'"
    assert time.monotonic() - started < 10
    assert not scratch_folders(os.getpid())
    assert not _processes_using(Path(tempfile.gettempdir()) / f"{SCRATCH_PREFIX}{os.getpid()}-")


CONVERT = """
import sys
from common.inputs.office import convert_office_to_pdf
convert_office_to_pdf(sys.stdin.buffer.read(), "big.docx", 120, 2048)
"""


def test_a_killed_worker_leaves_nothing_once_the_next_one_starts():
    """A process converting is SIGKILLed while LibreOffice runs; the clean-up an ingestion worker
    runs at its start removes its LibreOffice and its scratch folder, and nothing of a live one."""
    worker = subprocess.Popen(
        [sys.executable, "-c", CONVERT], stdin=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent
    )
    worker.stdin.write(make_docx(40))
    worker.stdin.close()
    deadline = time.monotonic() + 60
    while not (folders := scratch_folders(worker.pid)) or not _processes_using(folders[0]):
        assert time.monotonic() < deadline, "LibreOffice never started"
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=10)
    assert scratch_folders(worker.pid), "the killed worker left its folder"
    live = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))  # a live process's conversion
    try:
        assert clean_up_after_dead_workers() >= 1
        assert not scratch_folders(worker.pid)
        assert not _processes_using(folders[0])
        assert live.is_dir()
    finally:
        live.rmdir()
