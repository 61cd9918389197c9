"""The served models: `models.yaml` parsed into typed `ModelSpec`s, one place for what is served."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from .errors import ModelNotFound

Modality = Literal["text", "image"]
BACKENDS = ("text", "colpali", "openai", "vllm")  # the families of workers.backends
UPSTREAM_BACKENDS = ("openai", "vllm")  # served by OpenAI-compatible servers (workers.backends.upstream)
# The colpali backend's model classes named Bi* (BiQwen2_5, BiPali, ...) give one pooled vector per
# input, its Col* ones token vectors: colpali-engine names them so, and the backend's family table
# (workers.backends.colpali.FAMILIES) says the same (a test checks). Known here without torch.
SINGLE_VECTOR_PREFIX = "Bi"


def single_vector_class(model_class: str | None) -> bool:
    """Whether the colpali-engine class `model_class` gives one vector per input (a Bi* model)."""
    return bool(model_class) and model_class.startswith(SINGLE_VECTOR_PREFIX)


def resolve_location(value: str, base: Path) -> str:
    """A local directory (relative to `base`, the models file's folder, when it exists there), a hub
    id, or `python:module:ATTR` for a path a Python package provides."""
    if value.startswith("python:"):
        module, attr = value.removeprefix("python:").split(":")
        return str(getattr(importlib.import_module(module), attr))
    local = Path(value).expanduser()
    if not local.is_absolute() and (base / local).exists():
        return str(base / local)
    return str(local) if local.exists() else value


class Upstream(BaseModel):
    """One OpenAI-compatible embeddings server behind a `backend: openai` model."""

    model_config = ConfigDict(extra="forbid")

    url: str  # its API base, as the openai client takes it (`http://host:8000/v1`): requests go to {url}/embeddings
    model: str  # the model name it serves
    api_key_env: str | None = None  # the environment variable that holds its API key
    concurrency: int = Field(default=4, gt=0)  # requests this worker keeps in flight to it at most


class VllmOptions(BaseModel):
    """A vLLM server: the one a `backend: vllm` worker starts, or what a `backend: openai` model's
    upstreams are (then only `max_model_len` matters: inputs are cut to max_model_len - 1 tokens)."""

    model_config = ConfigDict(extra="forbid")

    max_model_len: int = Field(default=8192, gt=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    gpus: list[int] = Field(default_factory=list)  # several: tensor parallel over them; none: the worker's device
    concurrency: int = Field(default=16, gt=0)  # requests in flight to it at most
    args: list[str] = Field(default_factory=list)  # more `vllm serve` arguments, as given


class ModelSpec(BaseModel):
    name: str
    # A family of workers.backends (`text`, `colpali`, `openai`, `vllm`), or `module:function` for a backend
    # of your own (the function takes the spec, the device and the settings, and returns a
    # workers.backends.base.Backend).
    backend: str
    # A local directory, a hub id, or `python:module:ATTR` for a path a Python package provides (for
    # `vllm`, the model it serves; `openai` has none).
    path: str = ""
    device: str = "auto"
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    max_input_tokens: int = 512
    batch_token_budget: int = 16384
    max_batch_size: int = 64
    pooling: Literal["mean", "cls", "last_token"] = "mean"
    normalize: bool = True
    # What runs the forward pass of a `text` model: `torch`, or `onnx` (ONNX Runtime on the CPU, fp32, from an
    # export made at the first load and cached: workers.backends.onnxrt).
    engine: Literal["torch", "onnx"] = "torch"
    # What queries (`input_type: query`) are prefixed with: `query_instruction` is a task in
    # Qwen3-Embedding's form (`Instruct: {task}\nQuery:{text}`, as its sentence-transformers config
    # prompts), `query_prompt` any literal prefix (BGE's "Represent this sentence ...: ", E5's "query: ").
    query_instruction: str | None = None
    query_prompt: str | None = None
    dimensions: list[int] = Field(default_factory=list)
    modalities: list[Modality] = Field(default_factory=lambda: ["text"])
    # late-interaction (colpali backend) only
    model_class: str | None = None
    # token vectors per input; default: true for the colpali backend's Col* classes, false for its Bi* ones
    late_interaction: bool | None = None
    quantization: Literal["none", "8bit", "4bit"] = "none"
    attention: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    max_num_visual_tokens: int = 768
    # upstream backends (`openai`, `vllm`) only
    upstreams: list[Upstream] = Field(default_factory=list)
    # Where the worker tokenizes (resolved like `path`; `vllm` defaults to its path): it then cuts inputs
    # to the token limit and sends token ids, so `usage` is exact. Without one it sends text.
    tokenizer: str | None = None
    dim: int | None = None  # the vectors' size; default: the length of the first health check's vector
    upstream_dimensions: bool = False  # the upstreams take `dimensions` (Matryoshka) themselves
    # With a tokenizer: the upstreams take token ids (vLLM, TEI); false for one that takes only text
    # (Infinity), which then gets an over-long input's kept tokens decoded back to text.
    upstream_token_ids: bool = True
    vllm: VllmOptions | None = None
    _base: Path = PrivateAttr(default=Path("."))  # the models file's folder: relative paths start there

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.backend not in BACKENDS and ":" not in self.backend:
            raise ValueError(f"model {self.name}: backend must be one of {sorted(BACKENDS)} or module:function")
        if self.backend == "colpali" and not self.model_class:
            raise ValueError(f"model {self.name}: the colpali backend needs model_class")
        if self.backend == "colpali" and self.late_interaction and single_vector_class(self.model_class):
            raise ValueError(f"model {self.name}: {self.model_class} gives one vector per input, not token vectors")
        if self.backend == "openai" and not self.upstreams:
            raise ValueError(f"model {self.name}: the openai backend needs upstreams")
        if self.upstreams and self.backend != "openai":
            raise ValueError(f"model {self.name}: upstreams belong to the openai backend")
        if not self.path and self.backend != "openai":
            raise ValueError(f"model {self.name}: the {self.backend} backend needs a path")
        if self.backend == "vllm" and self.vllm is None:
            self.vllm = VllmOptions()
        if self.engine == "onnx" and (
            self.backend != "text" or self.quantization != "none" or self.dtype not in ("auto", "fp32")
        ):
            raise ValueError(f"model {self.name}: engine onnx runs the text backend in fp32, unquantized")
        if self.query_instruction and self.query_prompt:
            raise ValueError(f"model {self.name}: set query_instruction or query_prompt, not both")
        return self

    @property
    def query_prefix(self) -> str:
        if self.query_instruction:
            return f"Instruct: {self.query_instruction}\nQuery:"
        return self.query_prompt or ""

    @property
    def multivector(self) -> bool:
        if self.late_interaction is not None:
            return self.late_interaction
        return self.backend == "colpali" and not single_vector_class(self.model_class)

    def resolved_path(self) -> str:
        return resolve_location(self.path, self._base)

    def resolved_tokenizer(self) -> str | None:
        tokenizer = self.tokenizer or (self.path if self.backend == "vllm" else None)
        return resolve_location(tokenizer, self._base) if tokenizer else None

    @property
    def token_limit(self) -> int:
        """The most tokens an input keeps: max_input_tokens, and under a vLLM one less than its
        max_model_len (an input of exactly max_model_len tokens hangs vLLM: vllm#29496)."""
        if self.vllm is None:
            return self.max_input_tokens
        return min(self.max_input_tokens, self.vllm.max_model_len - 1)


class Registry:
    def __init__(self, specs: list[ModelSpec]):
        self.specs = {spec.name: spec for spec in specs}

    def get(self, name: str) -> ModelSpec:
        try:
            return self.specs[name]
        except KeyError:
            raise ModelNotFound(f"The model '{name}' does not exist or is not served here.", "model") from None

    def __iter__(self):
        return iter(self.specs.values())


def load_registry(path: Path) -> Registry:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    specs = [ModelSpec(**entry) for entry in raw.get("models", [])]
    for spec in specs:
        spec._base = Path(path).parent
    return Registry(specs)
