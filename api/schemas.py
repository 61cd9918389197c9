"""Request and response bodies of the HTTP API (OpenAI's shapes, plus documented extensions)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.errors import InvalidRequest
from common.inputs.text import check_unicode

Model = TypeVar("Model", bound=BaseModel)


class Body(BaseModel):
    """A request body: no unknown fields, and only text that is valid Unicode (a JSON string can
    hold lone surrogates, which nothing downstream can encode)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _unicode(self) -> Body:
        for name in type(self).model_fields:
            check_unicode(getattr(self, name), name)
        return self


def parse(model: type[Model], fields: dict[str, Any] | bytes) -> Model:
    """`model` from a body a route reads itself (JSON bytes, or form or JSON fields), its first
    validation failure a 400 naming the field."""
    try:
        if isinstance(fields, bytes):
            return model.model_validate_json(fields)
        return model.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = str(first["loc"][0]) if first.get("loc") else None
        raise InvalidRequest(f"{param or 'body'}: {first['msg']}", param) from None


MAX_POOL_FACTOR = 16  # a page of 736 tokens keeps 46 vectors at 16
TokenId = Annotated[int, Field(ge=0, lt=2**31)]  # checked against the model's vocabulary by its worker
EmbeddingInput = str | list[str] | list[TokenId] | list[list[TokenId]]
CacheFlag = Annotated[bool, Field(description="false: this request neither reads nor writes the embedding cache.")]


class EmbeddingRequest(Body):
    input: EmbeddingInput = Field(
        description="A string, a list of strings, a list of token ids, or a list of such lists."
    )
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, gt=0, le=65536, description="Matryoshka: truncate then re-normalize.")
    user: str | None = None
    # embedq extensions
    input_type: Literal["query", "document"] = Field(
        default="document", description="`query` adds the model's query instruction (Qwen3-Embedding)."
    )
    normalize: bool | None = Field(default=None, description="L2-normalize; default from models.yaml.")
    truncate: bool = Field(default=True, description="false: refuse over-long input with 400 instead of cutting it.")
    cache: CacheFlag = True


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "embedq"
    capabilities: dict[str, Any] | None = Field(
        default=None, description="`GET /v1/models/{id}`: what the model takes and gives, and its live workers."
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class _LateInteractionOptions(Body):
    model: str
    output: Literal["pooled", "multivector"] = Field(
        default="multivector",
        description="`pooled`: one vector (the mean of the token vectors); `multivector`: the token vectors. "
        "Unset: multivector where the model gives token vectors, pooled for single-vector (Bi*) models.",
    )
    normalize: bool = Field(default=True, description="L2-normalize the pooled vector (token vectors come normalized).")
    encoding_format: Literal["float", "base64"] = "float"
    dtype: Literal["float32", "float16"] = Field(default="float32", description="Float width of base64 output.")
    cache: CacheFlag = True


class TextEmbeddingRequest(_LateInteractionOptions):
    input: str | list[str]
    input_type: Literal["query", "document"] = "query"
    truncate: bool = True


class ImageEmbeddingRequest(_LateInteractionOptions):
    images: list[str] = Field(description="Raw base64 or `data:image/...;base64,...` URLs.")


class RerankRequest(Body):
    """Cohere's and TEI's rerank shape; `images` (raw base64 or data: URLs) for visual models."""

    model: str
    query: str = Field(min_length=1)
    documents: list[str] | None = Field(default=None, description="Texts to score against the query.")
    images: list[str] | None = Field(default=None, description="Or page images: raw base64 or data: URLs.")
    top_n: int | None = Field(default=None, ge=1, description="Return only the best top_n (default: all).")
    return_documents: bool = Field(default=False, description="Echo each text document in its result.")
    truncate: bool = True
    cache: CacheFlag = True

    @model_validator(mode="after")
    def _one_kind(self) -> RerankRequest:
        if (self.documents is None) == (self.images is None):
            raise ValueError("send either 'documents' or 'images'")
        return self


class TokenizeRequest(Body):
    model: str
    input: str | list[str]
    input_type: Literal["query", "document"] = Field(
        default="document", description="`query`: the tokens of the text with the model's query prefix."
    )
    add_special_tokens: bool = True


class CollectionCreate(Body):
    name: str = Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$", description="Letters, digits and _, not starting with a digit."
    )
    model: str = Field(
        description="A served model; late-interaction models make page collections, text models chunk collections."
    )
    pool_factor: int | None = Field(
        default=None,
        ge=1,
        le=MAX_POOL_FACTOR,
        description="Page collections: store each page's token vectors pooled by this factor (colpali-engine's "
        "HierarchicalTokenPooler; 3 keeps a third of them); 1 or absent: not pooled.",
    )


class SearchRequest(Body):
    query: str = Field(min_length=1)
    top_k: int = Field(default=10, ge=1, le=1000)
    filter: str | None = Field(default=None, description='A Milvus boolean expression, e.g. `doc_id == "abc"`.')
