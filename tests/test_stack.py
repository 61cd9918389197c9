"""`embedq up` (what `./scripts/run` starts) on a fresh directory: it brings its own Redis and Milvus
Lite, says when it is ready, serves, and a Ctrl-C stops every process it started, in order, within
20 s, with no traceback, while clients are still sending."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from common.launch import procs

from .conftest import MINILM
from .stack import ROOT


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


@pytest.mark.slow
def test_up_brings_its_own_parts_and_stops_them(models_file, tmp_path):
    port = procs.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDQ_")}
    env.update(
        EMBEDQ_PORT=str(port),
        EMBEDQ_VAR_DIR=str(tmp_path / "var"),
        EMBEDQ_MODELS_FILE=str(models_file),
        EMBEDQ_CPU_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    # A session of its own, as a terminal gives: a Ctrl-C goes to the whole foreground process group.
    stack = subprocess.Popen(
        [sys.executable, "-m", "common.launch.cli", "up"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in stack.stdout:
            lines.append(line)
            if "embedq: ready" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    sending = threading.Event()
    base = f"http://127.0.0.1:{port}"

    def send() -> None:  # a client that keeps sending while the stack stops
        while sending.is_set():
            try:
                httpx.post(f"{base}/v1/embeddings", json={"model": MINILM, "input": "still here"}, timeout=5)
            except httpx.HTTPError:
                time.sleep(0.05)

    try:
        assert ready.wait(240), "".join(lines[-40:])
        output = "".join(lines)
        assert "embedded Redis" in output and "embedded Milvus Lite" in output
        assert f"http://127.0.0.1:{port}/v1" in output
        response = httpx.post(f"{base}/v1/embeddings", json={"model": MINILM, "input": "hi"}, timeout=30)
        assert response.status_code == 200 and len(response.json()["data"][0]["embedding"]) == 384
        ready = httpx.get(f"{base}/health/ready", timeout=5).json()
        assert (ready["ingest_workers"], ready["search_workers"]) == (1, 1)
        started = children_of(stack.pid)
        assert len(started) >= 6  # redis, milvus, api, worker, ingest worker, search worker
        assert (tmp_path / "var" / "redis").is_dir() and (tmp_path / "var" / "milvus").is_dir()
        sending.set()
        clients = [threading.Thread(target=send, daemon=True) for _ in range(4)]
        for client in clients:
            client.start()
        time.sleep(1)
    finally:
        stopping = time.monotonic()
        os.killpg(stack.pid, signal.SIGINT)  # Ctrl-C
        stack.wait(timeout=60)
        took = time.monotonic() - stopping
        sending.clear()
    output = "".join(lines)
    assert took < 20, f"stopping took {took:.1f}s"
    assert "Traceback" not in output, output[-4000:]
    assert output.rstrip().endswith("embedq: stopped")
    # `up` waited for its children before exiting, so none of them is left, not even as a zombie.
    alive = [pid for pid in started if Path(f"/proc/{pid}").exists()]
    assert not alive, f"still running after Ctrl-C: {alive}"
