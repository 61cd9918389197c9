"""Device and dtype choices shared by every torch backend."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .base import OutOfMemory

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA cards that support it, fp16 on older CUDA cards, fp32 on the CPU."""
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@contextlib.contextmanager
def oom_as_out_of_memory() -> Iterator[None]:
    """Turn a CUDA out-of-memory error into the batcher's `OutOfMemory`, freeing the cache."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        raise OutOfMemory(str(exc)) from exc
