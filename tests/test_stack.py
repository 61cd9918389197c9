"""`embedq up` (what `./scripts/run` starts) on a fresh directory: it brings its own Redis (with an
append-only file) and Milvus Lite, says when it is ready, serves, starts again a child that dies,
and a Ctrl-C stops every process it started, in order, within 20 s, with no traceback, while
clients are still sending. Stopped mid-job and started again, it finishes the job."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis

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


class Up:
    """`embedq up` in a session of its own, as a terminal gives it (a Ctrl-C goes to its group)."""

    def __init__(self, env: dict[str, str]):
        self.base = f"http://127.0.0.1:{env['EMBEDQ_PORT']}"
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "common.launch.cli", "up"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        assert self.ready.wait(240), self.output[-4000:]

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if "embedq: ready" in line:
                self.ready.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def ctrl_c(self) -> float:
        """Send Ctrl-C; returns how long the stack took to stop."""
        stopping = time.monotonic()
        os.killpg(self.proc.pid, signal.SIGINT)
        self.proc.wait(timeout=60)
        return time.monotonic() - stopping


def up_env(models_file: Path, var: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDQ_")}
    env.update(
        EMBEDQ_PORT=str(procs.free_port()),
        EMBEDQ_VAR_DIR=str(var),
        EMBEDQ_MODELS_FILE=str(models_file),
        EMBEDQ_CPU_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    return env


@pytest.mark.slow
def test_up_brings_its_own_parts_restarts_a_dead_child_and_stops_them(models_file, tmp_path):
    up = Up(up_env(models_file, tmp_path / "var"))
    sending = threading.Event()

    def send() -> None:  # a client that keeps sending while the stack stops
        while sending.is_set():
            try:
                httpx.post(f"{up.base}/v1/embeddings", json={"model": MINILM, "input": "still here"}, timeout=5)
            except httpx.HTTPError:
                time.sleep(0.05)

    try:
        assert "embedded Redis" in up.output and "embedded Milvus Lite" in up.output
        assert f"{up.base}/v1" in up.output
        response = httpx.post(f"{up.base}/v1/embeddings", json={"model": MINILM, "input": "hi"}, timeout=30)
        assert response.status_code == 200 and len(response.json()["data"][0]["embedding"]) == 384
        ready = httpx.get(f"{up.base}/health/ready", timeout=5).json()
        assert (ready["ingest_workers"], ready["search_workers"], ready["failing"]) == (1, 1, [])
        assert list((tmp_path / "var" / "redis").glob("appendonly*"))  # Redis keeps its append-only file
        # The embedding cache's own Redis, bounded and evicting, answers a repeated input.
        cache = redis.Redis.from_url(re.search(r"embedding cache Redis on (\S+)", up.output).group(1))
        bound = cache.config_get("maxmemory*")
        assert (bound["maxmemory"], bound["maxmemory-policy"]) == (str(1024 * 2**20), "allkeys-lru")
        httpx.post(f"{up.base}/v1/embeddings", json={"model": MINILM, "input": "hi"}, timeout=30).raise_for_status()
        hits = f'embedq_cache_hits_total{{modality="text",model="{MINILM}",path="online"}} 1.0'
        deadline = time.monotonic() + 10  # the API adds its counts to Redis every second
        while hits not in httpx.get(f"{up.base}/metrics", timeout=5).text:
            assert time.monotonic() < deadline, "no cache hit counted"
            time.sleep(0.2)

        worker = next(pid for pid in children_of(up.proc.pid) if f"--model\0{MINILM}" in _cmdline(pid))
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 90
        while f"worker:{MINILM} exited with -9; starting it again" not in up.output:
            assert time.monotonic() < deadline, up.output[-3000:]
            time.sleep(0.2)
        while (
            httpx.post(f"{up.base}/v1/embeddings", json={"model": MINILM, "input": "back"}, timeout=30).status_code
            != 200
        ):
            assert time.monotonic() < deadline, up.output[-3000:]
            time.sleep(0.5)

        started = children_of(up.proc.pid)
        assert len(started) >= 7  # redis, the cache's redis, milvus, api, worker, ingest worker, search worker
        sending.set()
        for _ in range(4):
            threading.Thread(target=send, daemon=True).start()
        time.sleep(1)
    finally:
        took = up.ctrl_c()
        sending.clear()
    assert took < 20, f"stopping took {took:.1f}s"
    assert "Traceback" not in up.output, up.output[-4000:]
    assert up.output.rstrip().endswith("embedq: stopped")
    # `up` waited for its children before exiting, so none of them is left, not even as a zombie.
    alive = [pid for pid in started if Path(f"/proc/{pid}").exists()]
    assert not alive, f"still running after Ctrl-C: {alive}"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


@pytest.mark.slow
def test_a_job_stopped_with_the_stack_finishes_when_it_starts_again(tmp_path):
    """The model is `tests.backends:timed` at 0.05 s a chunk (a stand-in for GPU time), so that the
    job outlasts the stop and the restart: about 650 chunks are 33 s of model work."""
    models_file = tmp_path / "models.yaml"
    models_file.write_text(
        "models:\n  - name: timed\n    backend: tests.backends:timed\n    path: none\n    device: cpu\n"
    )
    env = {
        **up_env(models_file, tmp_path / "var"),
        "TEST_ITEM_S": "0.05",
        "EMBEDQ_CHUNK_SIZE": "200",
        "EMBEDQ_CHUNK_OVERLAP": "40",
    }
    text = " ".join(f"Sentence {i} of the notes." for i in range(4_000))
    up = Up(env)
    try:
        httpx.post(f"{up.base}/v1/collections", json={"name": "notes", "model": "timed"}, timeout=30).raise_for_status()
        response = httpx.post(
            f"{up.base}/v1/collections/notes/documents", files=[("files", ("notes.txt", text.encode(), "text/plain"))]
        )
        job_id = response.json()["id"]
        deadline = time.monotonic() + 60
        while httpx.get(f"{up.base}/v1/jobs/{job_id}").json()["processed"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        took = up.ctrl_c()
    assert took < 20, f"stopping took {took:.1f}s"
    assert "Traceback" not in up.output, up.output[-4000:]
    up = Up(env)
    try:
        job = httpx.get(f"{up.base}/v1/jobs/{job_id}").json()
        assert job["finished_at"] is None and job["total"] >= 500, "the job is not mid-way; the test proves nothing"
        deadline = time.monotonic() + 120
        while (job := httpx.get(f"{up.base}/v1/jobs/{job_id}").json())["finished_at"] is None:
            assert time.monotonic() < deadline, json.dumps(job)
            time.sleep(0.5)
        stored = httpx.get(f"{up.base}/v1/collections/notes").json()["count"]
    finally:
        up.ctrl_c()
    assert job["status"] == "completed" and job["processed"] == job["total"] and job["failed"] == 0
    assert stored == job["total"]
