"""Token ids for a text input, cut to a model's limit: the one way the backends that tokenize (the
local text models, and upstreams given a tokenizer) do it, so that the ids an upstream gets are
those the local model would run."""

from __future__ import annotations

import threading
from typing import Any

from common.inputs.text import check_token_ids, too_long
from common.registry import ModelSpec

from .base import EmbedInput


def text_of(spec: ModelSpec, item: EmbedInput) -> str:
    """The text the model sees: a query gets the model's query prefix (Qwen3's instruction, BGE's prompt)."""
    if item.input_type == "query":
        return f"{spec.query_prefix}{item.text}"
    return item.text or ""


Piece = tuple[int, str, bool, "int | None", "int | None"]  # id, text, special, start, stop


def pieces(tokenizer: Any, text: str, add_special_tokens: bool) -> list[Piece]:
    """`text`'s tokens as TEI's /tokenize lists them: a special token has its own spelling and no
    offsets; another has the characters of `text` it covers, [start, stop)."""
    encoded = tokenizer(
        text, add_special_tokens=add_special_tokens, return_offsets_mapping=True, return_special_tokens_mask=True
    )
    spelled = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    return [
        (token_id, spelling, True, None, None) if special else (token_id, text[start:stop], False, start, stop)
        for token_id, (start, stop), special, spelling in zip(
            encoded["input_ids"], encoded["offset_mapping"], encoded["special_tokens_mask"], spelled
        )
    ]


class Tokens:
    def __init__(self, tokenizer: Any, limit: int):
        self.tokenizer, self.limit = tokenizer, limit
        # HF fast tokenizers are not safe to call from several threads at once.
        self._lock = threading.Lock()

    def ids(self, item: EmbedInput, text: str) -> list[int]:
        """`item`'s own token ids (checked against the vocabulary) or those of `text`, cut to the
        limit, or `InputTooLong` when the input is over it and asks not to be truncated."""
        if item.token_ids is not None:
            ids = list(item.token_ids)
            check_token_ids(ids, self.tokenizer)
            if len(ids) > self.limit:
                self._refuse_if_strict(item, len(ids))
                ids = ids[: self.limit]
            return ids
        with self._lock:
            ids = self.tokenizer(text)["input_ids"]
            if len(ids) > self.limit:
                self._refuse_if_strict(item, len(ids))
                ids = self.tokenizer(text, truncation=True, max_length=self.limit)["input_ids"]
        return ids

    def pieces(self, text: str, add_special_tokens: bool) -> list[Piece]:
        with self._lock:
            return pieces(self.tokenizer, text, add_special_tokens)

    def text(self, ids: list[int]) -> str:
        """The text of `ids`, for an upstream that takes only text."""
        with self._lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _refuse_if_strict(self, item: EmbedInput, n_tokens: int) -> None:
        if not item.truncate:
            raise too_long(n_tokens, self.limit)
