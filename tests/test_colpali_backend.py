"""The late-interaction backend against colpali-engine's own reference, on tiny random checkpoints.

For every family, the same checkpoint and inputs go through our backend (one batch per modality,
mixed sizes, so padding happens) and through the colpali-engine model and processor used the
documented way (`process_images` / `process_queries` / `process_texts`, then `model(**batch)`).
"""

from __future__ import annotations

import io

import colpali_engine.models as colpali_models
import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import InputTooLong, InvalidRequest
from common.registry import ModelSpec
from common.settings import Settings
from tests.tiny_models import tiny_models_dir
from workers.backends.base import EmbedInput
from workers.backends.colpali import create

FAMILIES = {  # tiny checkpoint -> (model class, processor class)
    "colqwen2": ("ColQwen2", "ColQwen2Processor"),
    "colqwen2_5": ("ColQwen2_5", "ColQwen2_5_Processor"),
    "colmodernvbert": ("ColModernVBert", "ColModernVBertProcessor"),
    "colidefics3": ("ColIdefics3", "ColIdefics3Processor"),
    "colpali": ("ColPali", "ColPaliProcessor"),
}
PAGE_SIZES = [(64, 64), (128, 96), (96, 128), (128, 64)]  # (width, height)
QUERIES = ["hi", "what was the revenue in 2023?", "Which figure shows the attention map of the encoder?"]
DOCUMENTS = ["Revenue grew by 12% in 2023.", "The encoder attends to every patch.", "x"]
MAX_INPUT_TOKENS = 64


def page(width: int, height: int, seed: int, fmt: str = "PNG", **save) -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, **save)
    return out.getvalue()


PAGES = [page(w, h, seed) for seed, (w, h) in enumerate(PAGE_SIZES)]


def spec_for(name: str, **overrides) -> ModelSpec:
    return ModelSpec(
        name=name,
        backend="colpali",
        model_class=FAMILIES[name][0],
        path=str(tiny_models_dir() / name),
        modalities=["text", "image"],
        max_input_tokens=MAX_INPUT_TOKENS,
        **overrides,
    )


def loaded_backend(name: str, **overrides):
    backend = create(spec_for(name, **overrides), "cpu", Settings())
    backend.load()
    return backend


def rows_by_mask(output: torch.Tensor, batch) -> list[np.ndarray]:
    return [rows[mask.bool()].float().numpy() for rows, mask in zip(output, batch["attention_mask"])]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def pooled(rows: np.ndarray) -> np.ndarray:
    mean = rows.mean(axis=0)
    return mean / np.linalg.norm(mean)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    """Our outputs and the reference outputs for one family: {kind: (ours, reference, batch)}."""
    name = request.param
    backend = loaded_backend(name)
    backend.warmup()
    model_cls, processor_cls = (getattr(colpali_models, cls) for cls in FAMILIES[name])
    path = tiny_models_dir() / name
    model, processor = model_cls.from_pretrained(path).eval(), processor_cls.from_pretrained(path)
    images = [Image.open(io.BytesIO(p)) for p in PAGES]
    queries = [EmbedInput("text", text=q, input_type="query") for q in QUERIES]
    inputs = {
        "images": ([EmbedInput("image", image=p) for p in PAGES], processor.process_images(images)),
        "queries": (queries, processor.process_queries(QUERIES)),
        "documents": ([EmbedInput("text", text=d) for d in DOCUMENTS], processor.process_texts(DOCUMENTS)),
    }
    outputs = {}
    for kind, (items, batch) in inputs.items():
        ours = backend.embed([backend.prepare(item) for item in items])
        with torch.inference_mode():
            outputs[kind] = (ours, rows_by_mask(model(**batch), batch), batch)
    return name, backend, processor, outputs


def test_token_vectors_equal_the_models_own_rows(family):
    name, backend, _processor, outputs = family
    assert backend.dim == 128
    for kind, (ours, reference, batch) in outputs.items():
        if kind != "images" or name != "colpali":  # ColPali pages are all one length
            assert not batch["attention_mask"].bool().all(), f"{kind}: the batch should need padding"
        for vectors, expected in zip(ours, reference):
            assert isinstance(vectors, np.ndarray) and vectors.dtype == np.float32
            assert vectors.shape == expected.shape, kind  # the valid rows, no padding rows
            assert np.isfinite(vectors).all(), kind
            assert cosines(vectors, expected).min() >= 0.9999, kind


def test_rows_are_the_inputs_own_length_alone(family):
    _name, _backend, processor, outputs = family
    images, _, _ = outputs["images"]
    for data, vectors in zip(PAGES, images):
        alone = processor.process_images([Image.open(io.BytesIO(data))])
        assert len(vectors) == alone["input_ids"].shape[1]
    queries, _, _ = outputs["queries"]
    for text, vectors in zip(QUERIES, queries):
        assert len(vectors) == processor.process_queries([text])["input_ids"].shape[1]


def test_pooled_vectors_match(family):
    _, _, _, outputs = family
    for kind, (ours, reference, _) in outputs.items():
        for vectors, expected in zip(ours, reference):
            assert cosines(pooled(vectors), pooled(expected)) >= 0.9999, kind


def test_maxsim_scores_match_score_multi_vector(family):
    _, _, processor, outputs = family
    queries, reference_queries, _ = outputs["queries"]
    passages = outputs["images"][0] + outputs["documents"][0]
    reference_passages = outputs["images"][1] + outputs["documents"][1]
    ours = np.array([[(q @ p.T).max(axis=1).sum() for p in passages] for q in queries])
    # batch_size=1: score_multi_vector pads the passages of a chunk with zero rows, which turns a
    # query token's negative best similarity into 0 (seen here on the one-token passage "x").
    expected = processor.score_multi_vector(
        [torch.from_numpy(q) for q in reference_queries],
        [torch.from_numpy(p) for p in reference_passages],
        batch_size=1,
        device="cpu",
    ).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-4)


def test_cost_counts_tokens_and_visual_tokens(family):
    _, backend, processor, _ = family
    image = backend.prepare(EmbedInput("image", image=PAGES[1]))
    alone = processor.process_images([Image.open(io.BytesIO(PAGES[1]))])
    assert image.cost == image.n_tokens == int((alone["input_ids"] == processor.image_token_id).sum()) > 0
    query = backend.prepare(EmbedInput("text", text=QUERIES[1], input_type="query"))
    assert query.cost == query.n_tokens == processor.process_queries([QUERIES[1]])["input_ids"].shape[1]


def test_over_long_text_is_refused_or_truncated(family):
    _, backend, processor, _ = family
    text = "a long question " * 20
    with pytest.raises(InputTooLong):
        backend.prepare(EmbedInput("text", text=text, input_type="query", truncate=False))
    cut = backend.prepare(EmbedInput("text", text=text, input_type="query"))
    assert MAX_INPUT_TOKENS - 3 <= cut.n_tokens <= MAX_INPUT_TOKENS
    augmentation = processor.tokenizer.convert_tokens_to_ids(processor.query_augmentation_token)
    assert (cut.payload[1]["input_ids"][0, -10:] == augmentation).all()  # the query suffix survives the cut
    [vectors] = backend.embed([cut])
    assert vectors.shape == (cut.n_tokens, 128)


@pytest.mark.parametrize("name", ["colqwen2", "colqwen2_5", "colmodernvbert", "colidefics3"])
def test_visual_tokens_are_bounded(name):
    bound = 8
    backend = loaded_backend(name, max_num_visual_tokens=bound)
    unbounded = loaded_backend(name)
    for data in PAGES:
        assert backend.prepare(EmbedInput("image", image=data)).cost <= bound
    big = PAGES[1]
    assert unbounded.prepare(EmbedInput("image", image=big)).cost > bound
    if name.startswith("colqwen"):  # the same bound as colpali-engine's own `max_num_visual_tokens`
        processor = getattr(colpali_models, FAMILIES[name][1]).from_pretrained(
            tiny_models_dir() / name, max_num_visual_tokens=bound
        )
        ids = processor.process_images([Image.open(io.BytesIO(big))])["input_ids"]
        assert backend.prepare(EmbedInput("image", image=big)).cost == int((ids == processor.image_token_id).sum())


def test_colpali_fixed_page_tokens_must_fit_the_bound():
    with pytest.raises(ValueError, match="max_num_visual_tokens"):
        loaded_backend("colpali", max_num_visual_tokens=8)
    assert loaded_backend("colpali", max_num_visual_tokens=16).prepare(EmbedInput("image", image=PAGES[0])).cost == 16


def test_exif_orientation_is_applied():
    backend = loaded_backend("colqwen2")
    upright = Image.open(io.BytesIO(page(64, 128, seed=7)))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    rotated = io.BytesIO()
    stored.save(rotated, format="PNG", exif=exif)
    png = io.BytesIO()
    upright.save(png, format="PNG")
    items = [EmbedInput("image", image=data) for data in (rotated.getvalue(), png.getvalue())]
    a, b = backend.embed([backend.prepare(item) for item in items])
    assert a.shape == b.shape and cosines(a, b).min() >= 0.9999


def test_undecodable_image_is_an_invalid_request():
    backend = loaded_backend("colqwen2")
    with pytest.raises(InvalidRequest):
        backend.prepare(EmbedInput("image", image=b"not an image"))
