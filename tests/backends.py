"""Backends that stand in for what cannot run here, loaded by real worker processes through their
models.yaml (`backend: tests.backends:timed`, `backend: tests.backends:poison`).

- `timed` takes a fixed time per input (`TEST_ITEM_S` in the worker's environment, default 0.1 s).
  It stands in for GPU time: a real late-interaction model on a GPU takes 0.06 to 0.5 s a page,
  while the tiny checkpoints answer on these CPUs in milliseconds, so no job would outlast a
  visibility timeout or fill a batcher. Its vectors are real enough to store and search: 4 unit
  token vectors of dim 16 per input, a function of the input's bytes.
- `poison` is `timed`, except that an input marked as poison (the text "poison", or an image
  whose top-left pixel is pure red) kills its own process with SIGKILL when its batch runs, as an
  out-of-memory kill or a segfault in a model kernel would.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image

from common.registry import ModelSpec
from common.settings import Settings
from workers.backends.base import EmbedInput, Prepared

DIM = 16
TOKENS = 4


def _vectors(data: bytes) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(data).digest()[:8], "little")
    tokens = np.random.default_rng(seed).standard_normal((TOKENS, DIM)).astype(np.float32)
    return tokens / np.linalg.norm(tokens, axis=1, keepdims=True)


class TimedBackend:
    dim = DIM

    def __init__(self, spec: ModelSpec, device: str, settings: Settings):
        self.spec = spec
        self.device = "cpu"
        self.item_s = float(os.environ.get("TEST_ITEM_S", "0.1"))

    def load(self) -> None:
        pass

    def warmup(self) -> None:
        pass

    def prepare(self, item: EmbedInput) -> Prepared:
        data = item.image if item.modality == "image" else (item.text or str(item.token_ids)).encode()
        return Prepared(cost=TOKENS, n_tokens=TOKENS, payload=(data, self.is_poison(item)))

    def is_poison(self, item: EmbedInput) -> bool:
        return False

    def embed(self, batch: Sequence[Prepared]) -> list[np.ndarray]:
        time.sleep(self.item_s * len(batch))
        return [_vectors(p.payload[0]) for p in batch]


class PoisonBackend(TimedBackend):
    def is_poison(self, item: EmbedInput) -> bool:
        if item.modality == "text":
            return item.text == "poison"
        with Image.open(io.BytesIO(item.image)) as image:
            return image.convert("RGB").getpixel((0, 0)) == (255, 0, 0)

    def embed(self, batch: Sequence[Prepared]) -> list[np.ndarray]:
        if any(p.payload[1] for p in batch):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().embed(batch)


def timed(spec: ModelSpec, device: str, settings: Settings) -> TimedBackend:
    return TimedBackend(spec, device, settings)


def poison(spec: ModelSpec, device: str, settings: Settings) -> PoisonBackend:
    return PoisonBackend(spec, device, settings)
