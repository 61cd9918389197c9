"""Merging a LoRA adapter into a tiny ColQwen2: the merged checkpoint, served by the colpali
backend, gives the outputs of base + adapter, and not those of the base alone."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from colpali_engine.models import ColQwen2, ColQwen2Processor
from peft import LoraConfig, get_peft_model
from PIL import Image

from common.registry import ModelSpec
from common.settings import Settings
from tests.tiny_models import tiny_models_dir
from workers.backends.base import EmbedInput
from workers.backends.colpali import create
from workers.merge_adapters import model_class_for

# The target modules of vidore's ColQwen2 adapters: the language model's projections and the head.
VIDORE_TARGETS = r"(.*(model).*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$|.*(custom_text_proj).*$)"


def page(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.RandomState(width).randint(0, 256, (height, width, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_merged_model_equals_base_plus_adapter(tmp_path):
    base = tiny_models_dir() / "colqwen2"
    torch.manual_seed(1)
    # init_lora_weights=False: random A and B, so the adapter changes the outputs
    config = LoraConfig(r=4, lora_alpha=8, target_modules=VIDORE_TARGETS, init_lora_weights=False)
    with_adapter = get_peft_model(ColQwen2.from_pretrained(base).eval(), config)
    with_adapter.save_pretrained(tmp_path / "adapter")

    merged = tmp_path / "merged"
    subprocess.run(  # as a user runs it
        [
            sys.executable,
            "-m",
            "common.launch.cli",
            "merge-adapters",
            "--base",
            str(base),
            "--adapter",
            str(tmp_path / "adapter"),
            "--out",
            str(merged),
            "--dtype",
            "fp32",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert not list(merged.glob("adapter_*"))
    spec = ModelSpec(name="merged", backend="colpali", model_class="ColQwen2", path=str(merged))
    backend = create(spec, "cpu", Settings())
    backend.load()

    processor = ColQwen2Processor.from_pretrained(base)
    pages = [page(64, 64), page(96, 128)]
    queries = ["what is shown?", "revenue"]
    images = [Image.open(io.BytesIO(p)) for p in pages]
    cases = [
        ([EmbedInput("image", image=p) for p in pages], processor.process_images(images)),
        ([EmbedInput("text", text=q, input_type="query") for q in queries], processor.process_queries(queries)),
    ]
    for items, batch in cases:
        ours = backend.embed([backend.prepare(item) for item in items])
        with torch.inference_mode():
            expected = with_adapter(**batch)
            with with_adapter.disable_adapter():
                base_only = with_adapter(**batch)
        for i, vectors in enumerate(ours):
            mask = batch["attention_mask"][i].bool()
            assert cosines(vectors, expected[i][mask].numpy()).min() >= 0.9999
            assert cosines(vectors, base_only[i][mask].numpy()).mean() < 0.99


def test_unknown_base_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="bert"):
        model_class_for(tmp_path)
