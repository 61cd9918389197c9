"""Text encoders through transformers: mean / CLS / last-token pooling over the hidden states.

Covers sentence-transformers style models (MiniLM, BGE, PubMedBERT) and decoder embedders
(Qwen3-Embedding: last-token pooling, its instruction prompt for queries), loaded as the spec asks
(dtype, attention kernel, 8-bit or 4-bit quantization: workers.backends.device), or, with
`engine: onnx`, run by ONNX Runtime on the CPU (workers.backends.onnxrt); tokenizing and pooling are
the same for both engines. Pooled vectors leave unnormalized; normalization and Matryoshka truncation
happen in the shared post-processing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer

from common.registry import ModelSpec
from common.settings import Settings

from .base import EmbedInput, Prepared
from .device import load_options, oom_as_out_of_memory, resolve_device
from .tokens import Piece, Tokens, text_of


class TextBackend:
    def __init__(self, spec: ModelSpec, device: str, settings: Settings):
        self.spec, self.settings = spec, settings
        self.device = resolve_device("cpu" if spec.engine == "onnx" and device == "auto" else device)
        if spec.engine == "onnx" and self.device.type != "cpu":
            raise ValueError(f"model {spec.name}: engine onnx runs on the CPU; this worker is on {self.device}")
        self.options = load_options(spec, self.device)
        self.dim = 0

    def load(self) -> None:
        path = self.spec.resolved_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.spec.engine == "onnx":
            from .onnxrt import OnnxForward  # onnxruntime is an optional extra (embedq[onnx])

            self.onnx = OnnxForward(path, self.settings.var_dir, self.settings.cpu_threads)
            self.dim = AutoConfig.from_pretrained(path).hidden_size
        else:
            self.onnx = None
            self.model = AutoModel.from_pretrained(path, **self.options).eval()
            self.dim = self.model.config.hidden_size
        self.tokens = Tokens(self.tokenizer, min(self.spec.max_input_tokens, self.tokenizer.model_max_length))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def warmup(self) -> None:
        items = [self.prepare(EmbedInput("text", text="warm up " * n)) for n in (1, 8, 64)]
        self.embed(items)

    def prepare(self, item: EmbedInput) -> Prepared:
        ids = self.tokens.ids(item, text_of(self.spec, item))
        return Prepared(cost=len(ids), n_tokens=len(ids), payload=ids, token_vectors=item.token_vectors)

    def tokenize(self, text: str, add_special_tokens: bool) -> list[Piece]:
        return self.tokens.pieces(text, add_special_tokens)

    def embed(self, batch: Sequence[Prepared]) -> list[np.ndarray]:
        lengths = torch.tensor([len(p.payload) for p in batch])
        ids = torch.full((len(batch), int(lengths.max())), self.pad_id, dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, : len(p.payload)] = torch.tensor(p.payload)
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        with torch.inference_mode(), oom_as_out_of_memory():
            ids, mask, lengths = ids.to(self.device), mask.to(self.device), lengths.to(self.device)
            hidden = self._hidden(ids, mask)
            pooled = self._pool(hidden, mask, lengths).cpu().numpy()
            # An input that asks for its token vectors gets its rows of the last hidden state (right-padded).
            tokens = {
                row: hidden[row, : len(p.payload)].cpu().numpy() for row, p in enumerate(batch) if p.token_vectors
            }
        return [tokens.get(row, vector) for row, vector in enumerate(pooled)]

    def _hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.onnx is not None:
            return self.onnx(ids, mask)
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.spec.pooling == "cls":
            return hidden[:, 0]
        if self.spec.pooling == "last_token":  # rows are right-padded here
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def create(spec: ModelSpec, device: str, settings: Settings) -> TextBackend:
    return TextBackend(spec, device, settings)
