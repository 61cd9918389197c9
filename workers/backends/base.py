"""The backend contract, the narrow seam between the batcher and a model: inputs in, numpy arrays
out.

No torch type crosses it. A backend knows nothing of queues; the batcher knows nothing of models.
The three phases follow Infinity's contract: `prepare` runs on the CPU for one input (tokenize,
decode an image) and says what it costs; `embed` runs one forward pass over a batch of prepared
inputs and returns one float32 array per input: shape `(dim,)` for a pooled vector or
`(n_tokens, dim)` for late-interaction token vectors (valid rows only), or, for an input that
failed on its own (an upstream refused it), the exception its request gets; `finalize`, shared by
all backends, post-processes one input's output as its request asks.

A backend may also have, and the worker uses when it does (none of them is needed):
- `passes_in_flight: int`: how many batches it takes at once (an upstream: its replicas' total
  concurrency), each from its own thread; 1 otherwise;
- `available() -> bool`: whether it can compute now (an upstream with no healthy replica cannot);
  while it cannot, the worker is out of the live sets and the API answers 503 at once;
- `stats() -> dict[str, str]`: more fields for the worker's stats hash (keys.worker_stats);
- `tokenize(text, add_special_tokens) -> list[Piece]`: the tokens of `text` (workers.backends.tokens),
  for `/v1/tokenize`;
- `close()`: release what it started (a server it supervises), when the worker stops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

Modality = Literal["text", "image"]


class OutOfMemory(Exception):
    """A batch did not fit on the device; the batcher splits it and retries the halves."""


@dataclass
class EmbedInput:
    """One input of a request, as a worker receives it."""

    modality: Modality
    text: str | None = None
    token_ids: list[int] | None = None
    image: bytes | None = None  # encoded image file bytes (PNG, JPEG, ...)
    input_type: Literal["query", "document"] = "document"
    truncate: bool = True
    dimensions: int | None = None  # the Matryoshka size asked for, for a backend that computes it itself
    token_vectors: bool = False  # every token's vector, from a backend that otherwise pools (text)


@dataclass
class Prepared:
    """An input after the CPU phase. `cost` is what the token budget counts (tokens incl. padding
    share, or visual tokens); `n_tokens` is what `usage` reports; `payload` is the backend's own."""

    cost: int
    n_tokens: int  # a backend that learns it only from the forward pass (an upstream's usage) sets it in `embed`
    payload: Any = field(repr=False)
    token_vectors: bool = False  # EmbedInput.token_vectors: `embed` gives this input's (n_tokens, dim) rows


class Backend(Protocol):
    dim: int

    def load(self) -> None: ...

    def warmup(self) -> None: ...

    def prepare(self, item: EmbedInput) -> Prepared:
        """Raise `common.errors.InputTooLong` / `InvalidRequest` for an input that cannot run."""
        ...

    def embed(self, batch: Sequence[Prepared]) -> list[np.ndarray | Exception]: ...


def finalize(array: np.ndarray, *, pooled: bool, normalize: bool, dimensions: int | None) -> np.ndarray:
    """Post-process one input's output: pool token rows (mean), Matryoshka-truncate, normalize."""
    out = np.asarray(array, dtype=np.float32)
    if pooled and out.ndim == 2:
        out = out.mean(axis=0)
    if dimensions:
        out = out[..., :dimensions]
    if normalize:
        norms = np.linalg.norm(out, axis=-1, keepdims=True)
        out = out / np.maximum(norms, 1e-12)
    return np.ascontiguousarray(out)
