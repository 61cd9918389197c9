"""The tiny random checkpoints of `scripts/make_tiny_models.py`, built once and cached on disk.

They live in `tiny-models/` at the repository root (git-ignored) or in `$EMBEDQ_TINY_MODELS_DIR`;
a checkpoint already there is reused, so only the first test run pays the few seconds of building.
After changing the builder, delete that folder.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


@lru_cache
def builder() -> ModuleType:
    """`scripts/make_tiny_models.py` as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_tiny_models", ROOT / "scripts" / "make_tiny_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@lru_cache
def tiny_models_dir() -> Path:
    out = Path(os.environ.get("EMBEDQ_TINY_MODELS_DIR", ROOT / "tiny-models"))
    builder().build_all(out)
    return out
