"""How every torch backend loads a checkpoint and guards a forward pass: device, dtype, attention
kernel and bitsandbytes quantization resolved from a model's spec (what cannot run on the device is
refused with a message, at start-up), and out-of-memory errors turned into the batcher's signal to
split a batch."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from typing import Any

import torch

from common.registry import ModelSpec

from .base import OutOfMemory

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA cards that support it, fp16 on older CUDA cards, fp32 on the CPU."""
    if dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"dtype bf16 is not supported by {torch.cuda.get_device_name(device)}; use fp16 or auto")
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_attention(attention: str, device: torch.device) -> str:
    """`auto`: FlashAttention 2 on CUDA when `flash_attn` is installed, else SDPA."""
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if attention == "auto":
        return "flash_attention_2" if device.type == "cuda" and has_flash else "sdpa"
    if attention == "flash_attention_2" and device.type != "cuda":
        raise ValueError(f"attention flash_attention_2 runs on CUDA only; this worker is on {device}")
    if attention == "flash_attention_2" and not has_flash:
        raise ValueError("attention flash_attention_2 needs the flash-attn package: pip install flash-attn")
    return attention


def quantization_config(quantization: str, device: torch.device):
    """transformers' BitsAndBytesConfig for `8bit` / `4bit` (NF4, double quant, bf16 compute)."""
    if quantization == "none":
        return None
    if device.type != "cuda":
        raise ValueError(f"quantization {quantization} runs on CUDA only (bitsandbytes); this worker is on {device}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"quantization {quantization} needs bitsandbytes: pip install 'embedq[gpu]'")
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def load_options(spec: ModelSpec, device: torch.device) -> dict[str, Any]:
    """`from_pretrained` keyword arguments that load `spec` onto `device` as it asks. Placed by
    `device_map` rather than moved afterwards: bitsandbytes models cannot be moved once loaded."""
    return {
        "dtype": resolve_dtype(spec.dtype, device),
        "attn_implementation": resolve_attention(spec.attention, device),
        "quantization_config": quantization_config(spec.quantization, device),
        "device_map": {"": str(device)},
    }


@contextlib.contextmanager
def oom_as_out_of_memory() -> Iterator[None]:
    """Turn a CUDA out-of-memory error into the batcher's `OutOfMemory`, freeing the cache. Wrap
    the whole forward path in it: the copies to the device, the pass, and the copy back."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        raise OutOfMemory(str(exc)) from exc
