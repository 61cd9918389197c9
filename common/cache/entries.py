"""What the embedding cache keeps, and under what key; no I/O here.

A key is the sha256 of three things: the model's identity (its name, and hashes of its weights path
and of every ModelSpec field that changes what it computes); every option that changes a vector
(common.contract.EMBED_OPTIONS, `normalize` resolved against the model's default); and the input's
bytes (its UTF-8 text, its token ids, or its image file). An entry is one input's vector or token
vectors, in the dtype they were produced in, with their shape and the input's token count (what
`usage` reports).
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any, NamedTuple

import numpy as np

from ..contract import EMBED_OPTIONS
from ..keys import CACHE_ENTRY_PREFIX
from ..registry import ModelSpec

# ModelSpec fields that say how or where a model runs, not what it computes (name and path are
# hashed on their own). Every other field is part of the identity, so a field added later changes
# the keys until it is listed here.
NOT_IDENTITY = frozenset({"name", "path", "device", "batch_token_budget", "max_batch_size", "dimensions", "modalities"})
VERSION = "v1"  # of the entry format below: a new one misses every old entry instead of misreading it
_DTYPES = ("<f4", "<f2")
_HEAD = struct.Struct("<BBI")  # dtype index, ndim, tokens; then ndim uint32 dimensions


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def model_identity(spec: ModelSpec) -> str:
    config = json.dumps(spec.model_dump(mode="json", exclude=set(NOT_IDENTITY)), sort_keys=True)
    return f"{spec.name}:{_sha(spec.path)}:{_sha(config)}"


def vector_options(spec: ModelSpec, options: dict[str, Any]) -> dict[str, Any]:
    """The options as the embed task reads them: those not given take its defaults, and an unset
    `normalize` the model's."""
    resolved = {**EMBED_OPTIONS, **options}
    if resolved["normalize"] is None:
        resolved["normalize"] = spec.normalize
    return resolved


def _input_bytes(entry: dict[str, Any]) -> tuple[bytes, bytes]:
    if "text" in entry:
        return b"text", entry["text"].encode()
    if "token_ids" in entry:
        return b"token_ids", np.asarray(entry["token_ids"], "<i8").tobytes()
    return b"image", entry["image"]


class Keys:
    """The keys of inputs that one model embeds with one set of options: the model and the options
    are hashed once, and each input's bytes onto a copy of that."""

    def __init__(self, spec: ModelSpec, modality: str, options: dict[str, Any]):
        resolved = vector_options(spec, options)
        # JSON escapes every control character, so the NUL after it ends it unambiguously.
        header = json.dumps({"model": model_identity(spec), "modality": modality, **resolved}, sort_keys=True)
        self._base = hashlib.sha256(header.encode() + b"\0")

    def of(self, entry: dict[str, Any]) -> str:
        kind, data = _input_bytes(entry)
        digest = self._base.copy()
        digest.update(kind + b"\0")
        digest.update(data)
        return f"{CACHE_ENTRY_PREFIX}{VERSION}:{digest.hexdigest()}"


class Entry(NamedTuple):
    array: np.ndarray
    tokens: int


def encode(array: np.ndarray, tokens: int) -> bytes:
    code = _DTYPES.index(array.dtype.newbyteorder("<").str)
    head = _HEAD.pack(code, array.ndim, tokens) + struct.pack(f"<{array.ndim}I", *array.shape)
    return head + np.ascontiguousarray(array, _DTYPES[code]).tobytes()


def decode(raw: bytes) -> Entry:
    """An entry from its bytes; ValueError (or struct.error) for bytes that are not one."""
    code, ndim, tokens = _HEAD.unpack_from(raw)
    shape = struct.unpack_from(f"<{ndim}I", raw, _HEAD.size)
    array = np.frombuffer(raw, _DTYPES[code], offset=_HEAD.size + 4 * ndim).reshape(shape)
    return Entry(array, tokens)


class Lookup:
    """One request's inputs against the cache: what it holds for them, which are left to compute
    (an input repeated in the request once), and the answer put back together in the inputs' order."""

    def __init__(self, keys: Keys, inputs: list[dict[str, Any]], model: str, modality: str):
        self.keys = [keys.of(entry) for entry in inputs]
        self.model, self.modality = model, modality
        self.found: list[Entry | None] = [None] * len(inputs)

    def take(self, values: list[bytes | None]) -> None:
        """The cache's answer to a read of `keys`."""
        self.found = [None if value is None else decode(value) for value in values]

    @property
    def missing(self) -> list[int]:
        """The inputs to compute: those not found, the first of each key."""
        first = {}
        for i, (key, entry) in enumerate(zip(self.keys, self.found)):
            if entry is None:
                first.setdefault(key, i)
        return list(first.values())

    def entries(self, arrays: list[np.ndarray], tokens: list[int]) -> dict[str, bytes]:
        """What to write: the missing inputs' computed arrays and token counts, in `missing`'s order."""
        return {self.keys[i]: encode(a, n) for i, a, n in zip(self.missing, arrays, tokens)}

    def merge(self, arrays: list[np.ndarray], tokens: list[int]) -> tuple[list[np.ndarray], list[int]]:
        """Every input's array and token count: the found ones, and the computed ones (in `missing`'s
        order) where nothing was found."""
        computed = {self.keys[i]: Entry(a, n) for i, a, n in zip(self.missing, arrays, tokens)}
        merged = [entry if entry is not None else computed[key] for key, entry in zip(self.keys, self.found)]
        return [entry.array for entry in merged], [entry.tokens for entry in merged]
