"""How close `engine: onnx` comes to sentence-transformers' torch fp32 on MiniLM: the lowest cosine
and the largest elementwise difference over 1,000 standard-library docstring sentences and 24
inputs over the model's 256-token limit (truncated), each engine loaded as `scripts/bench text`
loads it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.registry import load_registry  # noqa: E402
from scripts.bench_text import load_reference, stdlib_sentences  # noqa: E402

spec = load_registry(ROOT / "models.yaml").get("all-MiniLM-L6-v2")
texts = stdlib_sentences(1000) + [" ".join(stdlib_sentences(40, seed=i)) for i in range(24)]
ours = np.stack(load_reference(spec, "onnx", 2).encode(texts, batch_size=32))
reference = load_reference(spec, "torch", 2).encode(texts, batch_size=32, normalize_embeddings=True)
print(
    f"{len(texts)} texts: lowest cosine {(ours * reference).sum(1).min():.7f}, "
    f"largest difference {np.abs(ours - reference).max():.1e}"
)
