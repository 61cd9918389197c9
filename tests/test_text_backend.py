"""The text backend against sentence-transformers on the same tiny checkpoints (a Qwen3-Embedding
look-alike with last-token pooling and its instruction prompt, a BGE look-alike with CLS pooling):
documents, queries, mixed lengths in one batch, Matryoshka dimensions; every id the tokenizer knows
as input."""

from __future__ import annotations

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from common.errors import InvalidRequest
from common.registry import ModelSpec
from common.settings import Settings
from tests.tiny_models import builder, tiny_models_dir
from workers.backends.base import EmbedInput, finalize
from workers.backends.text import create

# Lengths from 1 to ~70 tokens in one batch, so that padding is exercised.
DOCUMENTS = ["a", "hello world", "the quick brown fox jumps over the lazy dog " * 4, "embedq: 4"]
QUERIES = ["what is embedq?", "fox"]
SPECS = {
    "qwen3_embed": dict(pooling="last_token", query_instruction=builder().QWEN3_TASK, dimensions=[64, 32]),
    "bert_cls": dict(pooling="cls", query_prompt=builder().BGE_QUERY_PROMPT, dimensions=[64, 16]),
}


def spec(name: str, **overrides) -> ModelSpec:
    fields = dict(name=name, backend="text", path=str(tiny_models_dir() / name), device="cpu", **SPECS[name])
    return ModelSpec(**{**fields, **overrides})


@pytest.fixture(scope="module", params=sorted(SPECS))
def pair(request):
    """(our backend, the sentence-transformers reference) on one tiny checkpoint."""
    backend = create(spec(request.param), "cpu", Settings())
    backend.load()
    return backend, SentenceTransformer(str(tiny_models_dir() / request.param), device="cpu")


def ours(backend, texts: list[str], input_type: str = "document", dimensions: int | None = None) -> np.ndarray:
    """What a worker answers: one batch through prepare and embed, then the shared finalize."""
    prepared = [backend.prepare(EmbedInput("text", text=t, input_type=input_type)) for t in texts]
    arrays = backend.embed(prepared)
    return np.stack([finalize(a, pooled=True, normalize=True, dimensions=dimensions) for a in arrays])


def assert_same(got: np.ndarray, expected: np.ndarray) -> None:
    """Cosine >= 0.9999 row by row, and equal elementwise: random tiny weights give vectors that are
    close in angle whatever the input, so the cosine alone would not tell inputs apart."""
    assert got.shape == expected.shape
    cosines = (got * expected).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosines.min() >= 0.9999
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_documents_of_mixed_length_in_one_batch(pair):
    backend, reference = pair
    lengths = {len(backend.prepare(EmbedInput("text", text=t)).payload) for t in DOCUMENTS}
    assert len(lengths) == len(DOCUMENTS)  # every row padded to a different extent
    expected = reference.encode(DOCUMENTS, batch_size=len(DOCUMENTS), convert_to_numpy=True)
    assert_same(ours(backend, DOCUMENTS), expected)


def test_queries_get_the_models_query_prompt(pair):
    backend, reference = pair
    expected = reference.encode(QUERIES, prompt_name="query", convert_to_numpy=True)
    got = ours(backend, QUERIES, input_type="query")
    assert_same(got, expected)
    plain = reference.encode(QUERIES, convert_to_numpy=True)
    assert np.abs(got - plain).max() > 1e-3  # the prompt made a difference the check can see


def test_matryoshka_dimensions(pair):
    backend, reference = pair
    for dimensions in backend.spec.dimensions:
        # sentence-transformers truncates after normalizing; embedq, as OpenAI, gives unit vectors
        expected = reference.encode(DOCUMENTS, truncate_dim=dimensions, convert_to_numpy=True)
        expected /= np.linalg.norm(expected, axis=1, keepdims=True)
        assert_same(ours(backend, DOCUMENTS, dimensions=dimensions), expected)


def test_every_id_the_tokenizer_knows_is_accepted(pair):
    backend, reference = pair
    tokenizer = backend.tokenizer
    ids = tokenizer("hello world")["input_ids"]
    assert set(ids) & set(tokenizer.all_special_ids)  # the EOS, or the CLS and SEP, pooling needs
    if backend.spec.name == "qwen3_embed":
        assert max(ids) >= tokenizer.vocab_size  # Qwen's special tokens lie past its base vocabulary
    prepared = backend.prepare(EmbedInput("text", token_ids=ids))
    [got] = backend.embed([prepared])
    expected = reference.encode(["hello world"], convert_to_numpy=True)
    assert_same(finalize(got, pooled=True, normalize=True, dimensions=None)[None], expected)
    with pytest.raises(InvalidRequest, match=rf"\[0, {len(tokenizer)}\)"):
        backend.prepare(EmbedInput("text", token_ids=[*ids[:-1], len(tokenizer)]))
