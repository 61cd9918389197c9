"""Merge a PEFT LoRA adapter into its colpali-engine base model and save a plain checkpoint.

Late-interaction checkpoints are often published as LoRA adapters over a base model (ColQwen2 over
colqwen2-base, say). A merged checkpoint loads without peft, faster, and can be quantized; the
colpali backend serves it like any other (`embedq merge-adapters BASE ADAPTER OUT`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .backends.colpali import FAMILIES, colpali_classes
from .backends.device import resolve_dtype

# Everything else in a checkpoint folder belongs to the processor (tokenizer, image processor, ...).
_MODEL_FILES = {"config.json", "adapter_config.json", "generation_config.json", "README.md"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def model_class_for(checkpoint: Path) -> str:
    """The colpali-engine late-interaction (Col*) class for a checkpoint, from the `model_type` of its
    config. A Bi* model shares its Col* twin's `model_type`, so it is never chosen here."""
    model_type = json.loads((Path(checkpoint) / "config.json").read_text())["model_type"]
    for model_class, family in FAMILIES.items():
        if family.model_type == model_type and not family.single_vector:
            return model_class
    raise ValueError(f"{checkpoint}: no late-interaction family for model_type {model_type!r}")


def merge_adapters(base: Path, adapter: Path, out: Path, dtype: str = "auto") -> Path:
    """Load `base` in `dtype` (`auto`: the checkpoint's own), merge the LoRA `adapter` into it and
    save the result with the processor files to `out`; the adapter's processor files win."""
    from peft import PeftModel  # after workers.backends has made torchvision importable

    base, adapter, out = Path(base), Path(adapter), Path(out)
    model_cls, _ = colpali_classes(model_class_for(base))
    torch_dtype = "auto" if dtype == "auto" else resolve_dtype(dtype, torch.device("cpu"))
    model = model_cls.from_pretrained(base, dtype=torch_dtype)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    for source in (base, adapter):
        for path in source.iterdir():
            if path.is_file() and path.name not in _MODEL_FILES and not path.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(path, out / path.name)
    return out
