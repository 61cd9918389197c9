"""Model backends: one module per model family, each implementing `base.Backend`."""

from __future__ import annotations

import importlib

from common.registry import ModelSpec
from common.settings import Settings

from .base import Backend
from .torch_compat import ensure_torchvision

ensure_torchvision()  # transformers and colpali-engine import torchvision

_MODULES = {
    "text": "workers.backends.text",
    "colpali": "workers.backends.colpali",
    "openai": "workers.backends.upstream",
    "vllm": "workers.backends.vllm",
}


def create_backend(spec: ModelSpec, device: str, settings: Settings) -> Backend:
    """The backend named by `spec.backend` (a family here, or `module:function`), not yet loaded."""
    if spec.backend in _MODULES:
        return importlib.import_module(_MODULES[spec.backend]).create(spec, device, settings)
    module, _, function = spec.backend.partition(":")
    return getattr(importlib.import_module(module), function)(spec, device, settings)
