"""`backend: openai`: a model that OpenAI-compatible `/v1/embeddings` servers compute (vLLM, TEI,
Infinity, another embedq), behind the same queues and batcher as a local model.

- Inputs: with a tokenizer (the entry's `tokenizer`), the worker tokenizes, cuts each input to the
  model's token limit (workers.backends.tokens; under vLLM, max_model_len - 1) and sends token ids
  (or, with `upstream_token_ids: false`, the text of the kept ids), so `usage` is exact. Without one it sends the text, and each input's token count comes from the
  upstream's `usage`: a request's total is split over its inputs by their length in characters (so
  the total is the upstream's own, and a client's share is exact when its inputs went alone).
  Token ids from the client are sent as they are (cut to the limit). Under a vLLM, text is sent
  with `truncate_prompt_tokens` at the same limit. Without a tokenizer, `truncate: false` is not
  checked here: the upstream's own rule applies.
- A batch goes out as one request per kind of input (text, token ids) and Matryoshka size, split
  over the replicas' free slots when there are several; the vectors come back in order. An input
  that an upstream refuses (a 4xx about the input) fails alone, with the upstream's message: a
  refused request of several inputs is split in halves until the refused one is found.
- `dimensions`: sent upstream when the entry says `upstream_dimensions: true`; otherwise the full
  vector comes back and the shared `finalize` cuts and re-normalizes it.
- Replicas, failover and health: workers.backends.replicas.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.errors import InvalidRequest
from common.launch.served import ServedCommand
from common.registry import ModelSpec, Upstream
from common.settings import Settings

from .base import EmbedInput, Prepared
from .replicas import Replica, ReplicaPool
from .tokens import Piece, Tokens, text_of

CHARS_PER_TOKEN = 4  # the batch budget's guess of an input's tokens when there is no tokenizer


@dataclass(frozen=True)
class Sent:
    """What one input sends: its text or token ids, and the Matryoshka size it asks the upstream for."""

    input: str | list[int]
    dimensions: int | None


class UpstreamBackend:
    device = "upstream"

    def __init__(
        self,
        spec: ModelSpec,
        settings: Settings,
        upstreams: list[tuple[Upstream, str | None]],
        server: ServedCommand | None = None,
        server_timeout_s: float = 0.0,
    ):
        """`upstreams`: each server with its API key; `server`: one to start and supervise first,
        healthy within `server_timeout_s` (a managed vLLM)."""
        self.spec, self.settings = spec, settings
        self.server, self.server_timeout_s = server, server_timeout_s
        self.pool = ReplicaPool(
            spec.name,
            [Replica(upstream, key) for upstream, key in upstreams],
            timeout_s=settings.upstream_timeout_s,
            failures=settings.upstream_failures,
            cooldown_s=settings.upstream_cooldown_s,
            every_s=settings.upstream_health_every_s,
        )
        self.passes_in_flight = self.pool.concurrency
        self._requests = ThreadPoolExecutor(self.pool.concurrency, thread_name_prefix="embedq-upstream")
        self.tokens: Tokens | None = None
        self.dim = spec.dim or 0

    def load(self) -> None:
        if (path := self.spec.resolved_tokenizer()) is not None:
            from transformers import AutoTokenizer

            self.tokens = Tokens(AutoTokenizer.from_pretrained(path), self.spec.token_limit)
        if self.server is not None:
            self.server.start()
            self.server.wait_healthy(self.server_timeout_s)
        self.pool.start()
        if not self.dim:  # with a size known, the worker starts at once and serves when a replica is up
            self.pool.wait_checked(self.settings.upstream_timeout_s)
            self.dim = self.pool.dim or 0

    def warmup(self) -> None:
        pass  # the health checks have run the model

    def available(self) -> bool:
        return self.pool.available()

    def stats(self) -> dict[str, str]:
        """Each replica's state and counters (and the supervised server's, for a managed one), as
        JSON under `upstreams`: what `/health/ready` and `/metrics` read."""
        replicas = self.pool.snapshot()
        if self.server is not None:
            for replica in replicas:
                replica["server"] = self.server.status()
        return {"upstreams": json.dumps(replicas)}

    def close(self) -> None:
        self.pool.stop()
        self._requests.shutdown(wait=False, cancel_futures=True)
        if self.server is not None:
            self.server.stop()

    def tokenize(self, text: str, add_special_tokens: bool) -> list[Piece]:
        if self.tokens is None:
            raise InvalidRequest(f"The model '{self.spec.name}' has no tokenizer here (set its `tokenizer`).", "model")
        return self.tokens.pieces(text, add_special_tokens)

    def prepare(self, item: EmbedInput) -> Prepared:
        dimensions = item.dimensions if self.spec.upstream_dimensions else None
        if self.tokens is not None:
            text = text_of(self.spec, item)
            ids = self.tokens.ids(item, text)
            if not self.spec.upstream_token_ids:
                # An input that may have been cut, or that came as ids, goes as the text of its kept ids.
                sent = self.tokens.text(ids) if item.token_ids is not None or len(ids) >= self.tokens.limit else text
                return Prepared(cost=len(ids), n_tokens=len(ids), payload=Sent(sent, dimensions))
            return Prepared(cost=len(ids), n_tokens=len(ids), payload=Sent(ids, dimensions))
        if item.token_ids is not None:
            ids = list(item.token_ids)[: self.spec.token_limit]
            return Prepared(cost=len(ids), n_tokens=len(ids), payload=Sent(ids, dimensions))
        text = text_of(self.spec, item)
        cost = min(len(text) // CHARS_PER_TOKEN + 2, self.spec.token_limit)
        return Prepared(cost=cost, n_tokens=0, payload=Sent(text, dimensions))

    def embed(self, batch: Sequence[Prepared]) -> list[np.ndarray | Exception]:
        groups: dict[tuple[bool, int | None], list[int]] = {}
        for index, prepared in enumerate(batch):
            sent = prepared.payload
            groups.setdefault((isinstance(sent.input, str), sent.dimensions), []).append(index)
        free = max(self.pool.free_slots(), 1)
        parts = [part for indices in groups.values() for part in _split(indices, free)]
        outputs: list[np.ndarray | Exception] = [None] * len(batch)  # type: ignore[list-item]
        if len(parts) == 1:
            results = [self._request(batch, parts[0])]
        else:
            results = list(self._requests.map(lambda part: self._request(batch, part), parts))
        for part, vectors in zip(parts, results):
            for index, vector in zip(part, vectors):
                outputs[index] = vector
        return outputs

    def _request(self, batch: Sequence[Prepared], part: list[int]) -> list[np.ndarray | Exception]:
        """The vectors of `batch[part]` from one upstream request; a refused request of several
        inputs is split in halves, so that the refused input fails alone."""
        sent = [batch[i].payload for i in part]
        payload: dict[str, Any] = {"input": [s.input for s in sent], "encoding_format": "base64"}
        if sent[0].dimensions:
            payload["dimensions"] = sent[0].dimensions
        if self.spec.vllm is not None and isinstance(sent[0].input, str):
            payload["truncate_prompt_tokens"] = self.spec.token_limit  # vLLM's own cut, for text
        try:
            vectors, usage = self.pool.embed(payload, len(part))
        except InvalidRequest as exc:
            if len(part) == 1:
                return [exc]
            half = len(part) // 2
            return self._request(batch, part[:half]) + self._request(batch, part[half:])
        if isinstance(sent[0].input, str) and self.tokens is None:
            _share_usage([batch[i] for i in part], usage.get("prompt_tokens"))
        return vectors


def _split(indices: list[int], parts: int) -> list[list[int]]:
    """`indices` in at most `parts` runs of near-equal length, in order."""
    size = math.ceil(len(indices) / min(parts, len(indices)))
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def _share_usage(prepared: list[Prepared], total: int | None) -> None:
    """Split an upstream request's token count over its text inputs by their length in characters
    (largest remainders, so the shares add up to the total); without a count, leave the guesses."""
    if not isinstance(total, int):
        for p in prepared:
            p.n_tokens = p.cost
        return
    lengths = [max(len(p.payload.input), 1) for p in prepared]
    exact = [total * n / sum(lengths) for n in lengths]
    shares = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: exact[i] - shares[i], reverse=True)
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    for p, share in zip(prepared, shares):
        p.n_tokens = share


def api_key(upstream: Upstream) -> str | None:
    """The API key of `upstream`, from the environment variable its entry names."""
    if upstream.api_key_env is None:
        return None
    key = os.environ.get(upstream.api_key_env)
    if key is None:
        raise ValueError(f"{upstream.url}: the environment variable {upstream.api_key_env} (its API key) is not set")
    return key


def create(spec: ModelSpec, device: str, settings: Settings) -> UpstreamBackend:
    return UpstreamBackend(spec, settings, [(upstream, api_key(upstream)) for upstream in spec.upstreams])
