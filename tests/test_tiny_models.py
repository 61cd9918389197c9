"""The tiny checkpoint builder: the Qwen3 text embedder loads as transformers and as
sentence-transformers, builds are deterministic and skipped once done, and the set stays small."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.numpy import load_file
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer

from tests.tiny_models import builder, tiny_models_dir

TEXTS = ["hello", "a somewhat longer sentence to embed"]


def test_qwen3_embed_loads_with_transformers_and_sentence_transformers():
    path = tiny_models_dir() / "qwen3_embed"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    assert tokenizer.padding_side == "left"
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert (batch["input_ids"][:, -1] == tokenizer.eos_token_id).all()  # EOS appended, padding on the left
    assert not batch["attention_mask"].bool().all()
    with torch.inference_mode():
        last = model(**batch).last_hidden_state[:, -1]
    expected = torch.nn.functional.normalize(last, dim=-1).numpy()
    reference = SentenceTransformer(str(path), device="cpu")
    ours = reference.encode(TEXTS, convert_to_numpy=True)
    assert ours.shape == (2, model.config.hidden_size)
    np.testing.assert_allclose((ours * expected).sum(-1), 1.0, atol=1e-4)


def test_builds_are_deterministic_and_skipped_once_done(tmp_path):
    [(name, path)] = builder().build_all(tmp_path, only=["qwen3_embed"]).items()
    cached = tiny_models_dir() / name
    ours, theirs = load_file(path / "model.safetensors"), load_file(cached / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[key], theirs[key]) for key in ours)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    builder().build_all(tmp_path, only=["qwen3_embed"])
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp


def test_the_set_is_complete_and_small():
    root = tiny_models_dir()
    visual = ["qwen2", "qwen2_5", "qwen3", "qwen3_5", "modernvbert", "pali", "idefics3", "gemma3"]
    names = {f"{kind}{family}" for kind in ("col", "bi") for family in visual} | {"qwen3_embed", "bert_cls"}
    assert all((root / name / "config.json").is_file() for name in names)
    size = sum(f.stat().st_size for name in names for f in (root / name).rglob("*") if f.is_file())
    assert size < 20e6
