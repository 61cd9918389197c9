"""Vectors between processes and at the HTTP edge.

Inside embedq vectors travel as raw little-endian bytes with a shape and dtype (never JSON float
lists); JSON lists are made only at the HTTP edge when a client asks for `float`.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np

from .errors import TooLarge

WireDtype = Literal["float32", "float16"]


def pack(arrays: Iterable[np.ndarray], dtype: WireDtype = "float32") -> dict[str, Any]:
    """Arrays -> a msgpack-friendly dict of bytes (one entry per input)."""
    arrays = [np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<")) for a in arrays]
    return {"dtype": dtype, "shapes": [list(a.shape) for a in arrays], "data": [a.tobytes() for a in arrays]}


def unpack(packed: dict[str, Any]) -> list[np.ndarray]:
    dtype = np.dtype(packed["dtype"]).newbyteorder("<")
    return [np.frombuffer(raw, dtype=dtype).reshape(shape) for raw, shape in zip(packed["data"], packed["shapes"])]


def to_base64(array: np.ndarray, dtype: WireDtype = "float32") -> str:
    """OpenAI's base64 format: the little-endian bytes of the (flattened) array."""
    return base64.b64encode(np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()).decode()


def check_answer_bytes(nbytes: int, limit: int) -> None:
    """Refuse an answer of `nbytes` bytes of vectors over `limit` (EMBEDQ_MAX_RESPONSE_BYTES)."""
    if nbytes > limit:
        raise TooLarge(
            f"The answer would hold {nbytes:,} bytes of vectors; the limit is {limit:,} "
            "(EMBEDQ_MAX_RESPONSE_BYTES): send fewer or shorter inputs per request.",
            "input",
        )


def maxsim(query: np.ndarray, documents: Iterable[np.ndarray]) -> np.ndarray:
    """Late-interaction scores, as colpali-engine's `score_multi_vector`: for each document, the sum
    over the query's token vectors of their best dot product with its token vectors (float32)."""
    query = np.asarray(query, np.float32)
    return np.array([(query @ np.asarray(d, np.float32).T).max(axis=1).sum() for d in documents], np.float32)
