"""Checks on text inputs, the same at the HTTP edge and in the backends: how many, not empty,
token ids in the vocabulary, and what an over-long input with `truncate: false` is told."""

from __future__ import annotations

from collections.abc import Sequence, Sized
from typing import Any

from ..errors import EmptyInput, InputTooLong, InvalidRequest, TooManyInputs

PARAM = "input"


def check_unicode(value: Any, param: str) -> None:
    """Refuse text that cannot be UTF-8 (lone surrogates, which a JSON string can spell as
    `\\ud800`), anywhere in `value` (strings, and the lists and dicts holding them)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest(f"'{param}' holds text that is not valid Unicode (a lone surrogate).", param) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_unicode(key, param)
            check_unicode(item, param)
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_unicode(item, param)


def check_count(items: Sequence, max_items: int, param: str) -> None:
    if not items:
        raise EmptyInput(f"'{param}' must not be empty.", param)
    if len(items) > max_items:
        raise TooManyInputs(f"'{param}' has {len(items)} items; at most {max_items} are allowed per request.", param)


def text_inputs(raw: Any, max_inputs: int) -> list[dict[str, Any]]:
    """OpenAI's four input shapes (a string, a list of strings, a list of token ids, a list of such
    lists) -> one `{"text"}` or `{"token_ids"}` entry per input."""
    if isinstance(raw, str):
        raw = [raw]
    check_count(raw, max_inputs, PARAM)
    if isinstance(raw[0], int):
        raw = [raw]
    if all(isinstance(text, str) for text in raw):
        if any(text == "" for text in raw):
            raise InvalidRequest("'input' must not contain empty strings.", PARAM)
        return [{"text": text} for text in raw]
    if any(len(ids) == 0 for ids in raw):
        raise InvalidRequest("'input' must not contain empty token lists.", PARAM)
    return [{"token_ids": ids} for ids in raw]


def check_token_ids(ids: Sequence[int], tokenizer: Sized) -> None:
    """Every id `tokenizer` knows is valid: `len(tokenizer)` counts the added special tokens (a
    Qwen tokenizer's `<|endoftext|>` and up), which its `vocab_size` leaves out."""
    known = len(tokenizer)
    if any(not 0 <= t < known for t in ids):
        raise InvalidRequest(f"Token ids must be in [0, {known}) for this model's tokenizer.", PARAM)


def too_long(n_tokens: int, limit: int) -> InputTooLong:
    """The error for an input over the model's limit that the request asked not to truncate."""
    return InputTooLong(
        f"An input has {n_tokens} tokens, over this model's limit of {limit} (send truncate: true to cut it instead).",
        PARAM,
    )
