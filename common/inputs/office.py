"""Office documents into PDFs through LibreOffice, which runs as untrusted code would.

Only bytes that are an office document (OLE2, RTF, an OOXML package or an OpenDocument one), not
only named like one, reach LibreOffice. It runs in a scratch folder with a private profile, in a
network namespace of its own (`unshare --net`, where the kernel allows it: without it, a warning
and no isolation), under a limit on its address space and its CPU time (`prlimit`), and within a
timeout that kills its whole process group. A worker killed mid-conversion leaves its scratch
folder and LibreOffice behind; the next ingestion worker to start on the machine removes both
(`clean_up_after_dead_workers`): the folder's name holds the pid of the process that made it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
import zipfile
from pathlib import Path

from ..errors import InvalidRequest, UnsupportedMediaType
from .kinds import OFFICE_EXTENSIONS, PARAM

log = logging.getLogger(__name__)

SCRATCH_PREFIX = "embedq-office-"
_SCRATCH = re.compile(rf"^{SCRATCH_PREFIX}(\d+)-")
_OLE2 = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_OOXML_PARTS = ("word/", "ppt/", "xl/")


def is_office_document(data: bytes) -> bool:
    """Whether `data` is an office document by its content: an OLE2 file (.doc, .ppt, .xls), RTF,
    or a zip package with an OOXML content-types part and a Word, PowerPoint or Excel part, or an
    OpenDocument mimetype."""
    if data.startswith(_OLE2) or data.startswith(b"{\\rtf"):
        return True
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as package:
            names = package.namelist()
            if "mimetype" in names:
                return package.read("mimetype").startswith(b"application/vnd.oasis.opendocument.")
            return "[Content_Types].xml" in names and any(n.startswith(_OOXML_PARTS) for n in names)
    except (zipfile.BadZipFile, KeyError, ValueError):
        return False


@functools.cache
def _network_isolation() -> tuple[str, ...]:
    """The command prefix that gives LibreOffice no network, or none where namespaces are denied."""
    for prefix in (("unshare", "--net"), ("unshare", "--net", "--map-root-user")):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
    log.warning("LibreOffice runs WITH network access: this kernel or container denies network namespaces")
    return ()


def conversion_command(soffice: str, source: Path, scratch: Path, timeout: float, memory_mb: int) -> list[str]:
    limits = ["prlimit", f"--as={memory_mb * 2**20}", f"--cpu={math.ceil(timeout)}", "--"]
    return [
        *_network_isolation(),
        *limits,
        soffice,
        "--headless",
        "--norestore",
        # A private profile: soffice does nothing when another instance holds the default one.
        f"-env:UserInstallation={(scratch / 'profile').as_uri()}",
        "--convert-to",
        "pdf",
        "--outdir",
        str(scratch),
        str(source),
    ]


def convert_office_to_pdf(data: bytes, filename: str, timeout: float, memory_mb: int) -> bytes:
    """The PDF of an office document, converted by LibreOffice (`soffice`) within `timeout`
    seconds and `memory_mb` MiB of address space."""
    extension = Path(filename).suffix.lower()
    if not is_office_document(data):
        raise InvalidRequest(
            f"{filename!r} is not an office document: its content is not OLE2, RTF, OOXML or OpenDocument", PARAM
        )
    soffice = shutil.which("soffice")
    if soffice is None:
        raise UnsupportedMediaType(
            f"converting {extension or 'office'} files to PDF needs LibreOffice (soffice) on the "
            "PATH, and this server has none; upload a PDF instead",
            PARAM,
        )
    scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
    try:
        source = scratch / ("document" + (extension if extension in OFFICE_EXTENSIONS else ""))
        source.write_bytes(data)
        command = conversion_command(soffice, source, scratch, timeout, memory_mb)
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process.pid)
            process.communicate()
            raise InvalidRequest(f"LibreOffice took longer than {timeout:g}s to convert {filename!r}", PARAM) from None
        target = source.with_suffix(".pdf")
        if process.returncode != 0 or not target.is_file():
            detail = output.decode(errors="replace").strip()[-500:] or f"exit status {process.returncode}"
            raise InvalidRequest(f"LibreOffice could not convert {filename!r} to PDF: {detail}", PARAM)
        return target.read_bytes()
    finally:
        _kill_group_of_folder(scratch)  # soffice.bin can outlive the soffice that started it
        shutil.rmtree(scratch, ignore_errors=True)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _processes_using(folder: Path) -> list[int]:
    """The pids whose command line names `folder` (LibreOffice's profile and files are in it)."""
    needle = str(folder).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


def _kill_group_of_folder(folder: Path) -> None:
    for pid in _processes_using(folder):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            group = os.getpgid(pid)
            if group != os.getpgrp():
                _kill_group(group)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def clean_up_after_dead_workers() -> int:
    """Kill the LibreOffice processes and remove the scratch folders that conversions of dead
    processes left behind; the number of folders removed."""
    removed = 0
    for folder in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):
        owner = _SCRATCH.match(folder.name)
        if owner is None or _alive(int(owner.group(1))):
            continue
        _kill_group_of_folder(folder)
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
    if removed:
        log.warning("removed %d LibreOffice conversions left behind by dead workers", removed)
    return removed
