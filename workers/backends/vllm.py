"""`backend: vllm`: a vLLM server that the worker starts on its own GPU, supervises and stops
(common.launch.served), and serves through the upstream backend (workers.backends.upstream).

vLLM pins a torch of its own, so it runs from its own environment (EMBEDQ_VLLM_COMMAND, default
`vllm`). It listens on a free loopback port with a key generated for this worker, on the GPUs
that CUDA_VISIBLE_DEVICES names: the worker's `--device cuda:N`, or the entry's `vllm.gpus`
(tensor parallel when there are several). Its inputs are cut to max_model_len - 1 tokens by the
model's own tokenizer (its `path`, unless the entry names another): an input of exactly
max_model_len tokens hangs vLLM (vllm#29496).
"""

from __future__ import annotations

import os
import secrets
import shlex

from common.launch import procs
from common.launch.served import ServedCommand
from common.registry import ModelSpec, Upstream
from common.settings import Settings

from .upstream import UpstreamBackend

_DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def gpus(spec: ModelSpec, device: str) -> list[int]:
    """The GPUs vLLM runs on: the entry's `vllm.gpus`, else the worker's device."""
    if spec.vllm.gpus:
        return spec.vllm.gpus
    if device == "auto":
        return [0]
    if not device.startswith("cuda"):
        raise ValueError(f"model {spec.name}: vLLM runs on CUDA GPUs; start the worker with --device cuda:N")
    return [int(device.partition(":")[2] or 0)]


def argv(spec: ModelSpec, settings: Settings, port: int, api_key: str, gpu_count: int) -> list[str]:
    options = spec.vllm
    args = [
        *shlex.split(settings.vllm_command),
        "serve",
        spec.resolved_path(),
        "--runner",
        "pooling",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        str(options.max_model_len),
        "--dtype",
        _DTYPES[spec.dtype],
        "--gpu-memory-utilization",
        str(options.gpu_memory_utilization),
        "--api-key",
        api_key,
    ]
    if gpu_count > 1:
        args += ["--tensor-parallel-size", str(gpu_count)]
    return args + options.args


def create(spec: ModelSpec, device: str, settings: Settings) -> UpstreamBackend:
    port, key, devices = procs.free_port(), secrets.token_urlsafe(24), gpus(spec, device)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, devices))}
    server = ServedCommand(
        f"vllm:{spec.name}",
        argv(spec, settings, port, key, len(devices)),
        f"http://127.0.0.1:{port}/health",
        settings,
        env=env,
    )
    upstream = Upstream(
        url=f"http://127.0.0.1:{port}/v1", model=spec.resolved_path(), concurrency=spec.vllm.concurrency
    )
    return UpstreamBackend(spec, settings, [(upstream, key)], server, settings.vllm_start_timeout_s)
