"""Model backends: one module per model family, each implementing `base.Backend`."""

from __future__ import annotations

import importlib

from common.registry import ModelSpec
from common.settings import Settings

from .base import Backend
from .torch_compat import ensure_torchvision

ensure_torchvision()  # transformers and colpali-engine import torchvision

_MODULES = {"text": "workers.backends.text", "colpali": "workers.backends.colpali"}


def create_backend(spec: ModelSpec, device: str, settings: Settings) -> Backend:
    """The backend named by `spec.backend`, not yet loaded."""
    module = importlib.import_module(_MODULES[spec.backend])
    return module.create(spec, device, settings)
