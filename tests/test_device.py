"""What every torch backend shares (workers.backends.device), through both backends: the load
options a spec asks for reach the model, what cannot run on the device is refused at start-up with
a message, and an out-of-memory error anywhere on the forward path (the copies in, the pass, the
copy back) reaches the batcher as `OutOfMemory`, which splits the batch instead of failing it."""

from __future__ import annotations

import pytest
import torch

from common.registry import ModelSpec
from common.settings import Settings
from tests.tiny_models import tiny_models_dir
from workers.backends import colpali, text
from workers.backends.base import EmbedInput, OutOfMemory
from workers.backends.device import load_options, resolve_attention, resolve_dtype

BACKENDS = {  # tiny checkpoint -> (backend module, spec fields)
    "qwen3_embed": (text, dict(backend="text", pooling="last_token")),
    "colqwen2": (colpali, dict(backend="colpali", model_class="ColQwen2")),
}
INPUTS = [EmbedInput("text", text=t) for t in ("a", "a longer text to embed", "a third one")]


def spec(name: str, **overrides) -> ModelSpec:
    fields = dict(name=name, path=str(tiny_models_dir() / name), device="cpu", **BACKENDS[name][1])
    return ModelSpec(**{**fields, **overrides})


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def backend(request):
    loaded = BACKENDS[request.param][0].create(spec(request.param), "cpu", Settings())
    loaded.load()
    return loaded


@pytest.mark.parametrize("name", sorted(BACKENDS))
@pytest.mark.parametrize(
    ("overrides", "refusal"),
    [
        (dict(quantization="4bit"), "quantization 4bit runs on CUDA only"),
        (dict(quantization="8bit"), "quantization 8bit runs on CUDA only"),
        (dict(attention="flash_attention_2"), "flash_attention_2 runs on CUDA only"),
    ],
)
def test_what_cannot_run_on_the_device_is_refused_at_start_up(name, overrides, refusal):
    with pytest.raises(ValueError, match=refusal):
        BACKENDS[name][0].create(spec(name, **overrides), "cpu", Settings())


def test_load_options_on_cpu():
    cpu = torch.device("cpu")
    assert load_options(spec("qwen3_embed", attention="eager", dtype="bf16"), cpu) == {
        "dtype": torch.bfloat16,
        "attn_implementation": "eager",
        "quantization_config": None,
        "device_map": {"": "cpu"},
    }
    assert resolve_attention("auto", cpu) == "sdpa"
    assert resolve_dtype("auto", cpu) == torch.float32


def test_the_load_options_reach_the_model(backend):
    assert backend.model.config._attn_implementation == "sdpa"
    assert backend.model.dtype == torch.float32
    assert backend.model.device == torch.device("cpu")


def out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory (simulated)")


@pytest.mark.parametrize("step", ["to", "cpu", "forward"])
def test_out_of_memory_anywhere_on_the_forward_path_is_the_batchers_out_of_memory(backend, monkeypatch, step):
    """CUDA cannot run here, so running out of device memory is simulated: `Tensor.to` (the copies
    in), `Tensor.cpu` (the copy back) or the model's forward raises torch.OutOfMemoryError, as each
    does on a full GPU."""
    prepared = [backend.prepare(item) for item in INPUTS]
    with monkeypatch.context() as patch:
        if step == "forward":
            patch.setattr(backend.model, "forward", out_of_memory)
        else:
            patch.setattr(torch.Tensor, step, out_of_memory)
        with pytest.raises(OutOfMemory):
            backend.embed(prepared)
    assert len(backend.embed(prepared)) == len(INPUTS)
