"""A Milvus Lite server as a child process: the local stack's default vector store, and the tests'.

milvus-lite opens a data directory from one process only, so the API and the workers share it
through `milvus-lite server` (gRPC, the Milvus protocol) rather than each opening the directory.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from . import procs


class MilvusLiteServer:
    """`milvus-lite server --data-dir DIR --port PORT`, logging to `DIR.log` next to the data."""

    def __init__(self, data_dir: str | os.PathLike, port: int, host: str = "127.0.0.1"):
        self.data_dir = Path(data_dir)
        self.port = port
        self.host = host
        self.log_path = self.data_dir.with_name(self.data_dir.name + ".log")
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> MilvusLiteServer:
        """Start the server and return once it accepts connections (it binds after opening the data)."""
        # Else the wait below could take another listener (an old server, say) for ours.
        with socket.socket() as probe:
            if probe.connect_ex((self.host, self.port)) == 0:
                raise RuntimeError(f"{self.host}:{self.port} is already in use")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = procs.spawn(
                [
                    sys.executable,
                    "-m",
                    "milvus_lite",
                    "server",
                    "--data-dir",
                    str(self.data_dir),
                    "--host",
                    self.host,
                    "--port",
                    str(self.port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                # Arrow's default pool (mimalloc) keeps freed memory: 6.8 GB instead of 4.1 GB
                # resident after opening 10k pages.
                env={**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "system"},
            )
        try:
            procs.wait_for_port(self.port, timeout, self.proc, host=self.host)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"Milvus Lite server did not start: {exc}; {self.log_path}:\n{tail}") from exc
        return self

    def stop(self, grace: float = 20.0) -> None:
        """SIGINT first: the server then closes its collections and releases the data lock."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                procs.stop([self.proc], grace=5)
        self.proc = None

    def __enter__(self) -> MilvusLiteServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
