"""Building embedding responses at the HTTP edge: the only place vectors become JSON."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from fastapi import Response

from common.vectors import WireDtype, to_base64

from .dispatch import Embedded


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status, media_type="application/json")


def embedding_list(
    model: str, result: Embedded, encoding_format: str, dtype: WireDtype = "float32", with_shape: bool = False
) -> Response:
    """OpenAI's list shape. `base64` gives each input's vector or matrix as one base64 string of
    little-endian floats; `with_shape` adds each array's shape (matrices need it to be decoded)."""

    def encode(array: np.ndarray) -> Any:
        return to_base64(array, dtype) if encoding_format == "base64" else array

    data = []
    for index, array in enumerate(result.arrays):
        item: dict[str, Any] = {"object": "embedding", "index": index, "embedding": encode(array)}
        if with_shape:
            item["shape"] = list(array.shape)
            item["dtype"] = dtype
        data.append(item)
    tokens = sum(result.tokens)
    return json_response(
        {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    )
