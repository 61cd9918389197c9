"""Serving a command: start a server process, wait for its health route, keep it running, stop it.

A worker that fronts a server of its own (a vLLM: workers.backends.vllm) holds one, and so do the
tests for the Infinity servers they run. The process is kept running by the local stack's
supervisor (common.launch.stack): when it exits it is started again, on the same port, after a
backoff that doubles and starts over once it has stayed up a while. Every launch runs on one
supervising thread that lives as long as this process, so the server gets SIGTERM should this
process die, whatever thread started it.
"""

from __future__ import annotations

import subprocess
import threading
import time

import httpx

from ..settings import Settings
from . import procs
from .stack import Supervisor

TEND_S = 0.5  # how often the supervising thread looks at the process
STOP_S = 15.0  # SIGTERM, then SIGKILL after this


class ServedCommand:
    def __init__(self, name: str, argv: list[str], health_url: str, settings: Settings, **popen: object):
        """`popen`: more arguments for subprocess.Popen (env, stdout, ...)."""
        self.name, self.argv, self.health_url = name, argv, health_url
        self._popen = popen
        self._supervisor = Supervisor(settings)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name=f"embedq-serve-{name}", daemon=True)

    def start(self) -> ServedCommand:
        self._thread.start()
        return self

    def _spawn(self) -> subprocess.Popen:
        return procs.spawn(self.argv, tied=True, **self._popen)

    def _supervise(self) -> None:
        self._supervisor.add(self.name, self._spawn)
        while not self._stopping.wait(TEND_S):
            self._supervisor.tend()

    @property
    def proc(self) -> subprocess.Popen | None:
        children = self._supervisor.children
        return children[0].proc if children else None

    def status(self) -> dict:
        """`{state, restarts, last_exit, failing}` as the stack reports its children."""
        children = self._supervisor.children
        return children[0].status() if children else {"state": "starting", "restarts": 0}

    def healthy(self, timeout_s: float = 2.0) -> bool:
        try:
            return httpx.get(self.health_url, timeout=timeout_s).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_healthy(self, timeout_s: float) -> None:
        """Return once the health route answers 200; raise TimeoutError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.healthy():
                return
            time.sleep(TEND_S)
        raise TimeoutError(f"{self.name} did not answer {self.health_url} within {timeout_s:g}s: {self.status()}")

    def stop(self) -> None:
        """Stop supervising, then stop the process (SIGTERM, SIGKILL after STOP_S)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=TEND_S + 5)
        if self.proc is not None:
            procs.stop([self.proc], grace=STOP_S)
