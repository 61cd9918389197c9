"""Text encoders through transformers: mean / CLS / last-token pooling over the hidden states.

Covers sentence-transformers style models (MiniLM, BGE, PubMedBERT) and decoder embedders
(Qwen3-Embedding: last-token pooling, its instruction prompt for queries), loaded as the spec asks
(dtype, attention kernel, 8-bit or 4-bit quantization: workers.backends.device). Pooled vectors
leave unnormalized; normalization and Matryoshka truncation happen in the shared post-processing.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from common.inputs.text import check_token_ids, too_long
from common.registry import ModelSpec
from common.settings import Settings

from .base import EmbedInput, Prepared
from .device import load_options, oom_as_out_of_memory, resolve_device


class TextBackend:
    def __init__(self, spec: ModelSpec, device: str, settings: Settings):
        self.spec = spec
        self.device = resolve_device(device)
        self.options = load_options(spec, self.device)
        # HF fast tokenizers are not safe to call from several threads at once.
        self._tokenizer_lock = threading.Lock()
        self.dim = 0

    def load(self) -> None:
        path = self.spec.resolved_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, **self.options).eval()
        self.dim = self.model.config.hidden_size
        self.max_tokens = min(self.spec.max_input_tokens, self.tokenizer.model_max_length)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def warmup(self) -> None:
        items = [self.prepare(EmbedInput("text", text="warm up " * n)) for n in (1, 8, 64)]
        self.embed(items)

    def _text(self, item: EmbedInput) -> str:
        if item.input_type == "query":
            return f"{self.spec.query_prefix}{item.text}"
        return item.text or ""

    def prepare(self, item: EmbedInput) -> Prepared:
        if item.token_ids is not None:
            ids = list(item.token_ids)
            check_token_ids(ids, self.tokenizer)
            if len(ids) > self.max_tokens:
                self._refuse_if_strict(item, len(ids))
                ids = ids[: self.max_tokens]
        else:
            text = self._text(item)
            with self._tokenizer_lock:
                ids = self.tokenizer(text)["input_ids"]
                if len(ids) > self.max_tokens:
                    self._refuse_if_strict(item, len(ids))
                    ids = self.tokenizer(text, truncation=True, max_length=self.max_tokens)["input_ids"]
        return Prepared(cost=len(ids), n_tokens=len(ids), payload=ids)

    def _refuse_if_strict(self, item: EmbedInput, n_tokens: int) -> None:
        if not item.truncate:
            raise too_long(n_tokens, self.max_tokens)

    def embed(self, batch: Sequence[Prepared]) -> list[np.ndarray]:
        lengths = torch.tensor([len(p.payload) for p in batch])
        ids = torch.full((len(batch), int(lengths.max())), self.pad_id, dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, : len(p.payload)] = torch.tensor(p.payload)
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        with torch.inference_mode(), oom_as_out_of_memory():
            ids, mask, lengths = ids.to(self.device), mask.to(self.device), lengths.to(self.device)
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            pooled = self._pool(hidden.float(), mask, lengths).cpu().numpy()
        return list(pooled)

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.spec.pooling == "cls":
            return hidden[:, 0]
        if self.spec.pooling == "last_token":  # rows are right-padded here
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def create(spec: ModelSpec, device: str, settings: Settings) -> TextBackend:
    return TextBackend(spec, device, settings)
