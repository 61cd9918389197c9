"""The colpali backend against colpali-engine's own reference, on tiny random checkpoints.

For every family, the same checkpoint and inputs go through our backend (one batch per modality,
mixed sizes, so padding happens) and through the colpali-engine model and processor used the
documented way (`process_images` / `process_queries` / `process_texts`, then `model(**batch)`):
token vectors for the late-interaction Col* families, one pooled vector per input for the Bi* ones.
"""

from __future__ import annotations

import io

import colpali_engine.models as colpali_models
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from api.main import create_app
from common.errors import InputTooLong, InvalidRequest
from common.registry import ModelSpec, single_vector_class
from common.settings import Settings
from tests.tiny_models import tiny_models_dir
from workers.backends import colpali
from workers.backends.base import EmbedInput, finalize
from workers.backends.colpali import create

LATE_INTERACTION = {  # tiny checkpoint -> (model class, processor class)
    "colqwen2": ("ColQwen2", "ColQwen2Processor"),
    "colqwen2_5": ("ColQwen2_5", "ColQwen2_5_Processor"),
    "colqwen3": ("ColQwen3", "ColQwen3Processor"),
    "colqwen3_5": ("ColQwen3_5", "ColQwen3_5Processor"),
    "colmodernvbert": ("ColModernVBert", "ColModernVBertProcessor"),
    "colidefics3": ("ColIdefics3", "ColIdefics3Processor"),
    "colpali": ("ColPali", "ColPaliProcessor"),
    "colgemma3": ("ColGemma3", "ColGemmaProcessor3"),
}
SINGLE_VECTOR = {
    "biqwen2": ("BiQwen2", "BiQwen2Processor"),
    "biqwen2_5": ("BiQwen2_5", "BiQwen2_5_Processor"),
    "biqwen3": ("BiQwen3", "BiQwen3Processor"),
    "biqwen3_5": ("BiQwen3_5", "BiQwen3_5Processor"),
    "bimodernvbert": ("BiModernVBert", "BiModernVBertProcessor"),
    "biidefics3": ("BiIdefics3", "BiIdefics3Processor"),
    # BiPaliProcessor loads neither tokenizer nor image processor under transformers 5; it only
    # renames ColPaliProcessor, which the backend takes in its place.
    "bipali": ("BiPali", "ColPaliProcessor"),
    "bigemma3": ("BiGemma3", "BiGemmaProcessor3"),
}
FAMILIES = {**LATE_INTERACTION, **SINGLE_VECTOR}
# Their from_pretrained fails under transformers 5 (it reads the base class's
# `_checkpoint_conversion_mapping`) unless given a key_mapping; an empty one is what it meant.
NEEDS_KEY_MAPPING = {"BiQwen2", "BiQwen2_5", "BiGemma3"}
FIXED_PAGE_TOKENS = {"colpali": 16, "bipali": 16, "colgemma3": 4, "bigemma3": 4}  # every page, whatever its size
QWEN_STYLE = ["colqwen2", "colqwen2_5", "colqwen3", "colqwen3_5", "biqwen2", "biqwen2_5", "biqwen3", "biqwen3_5"]
IDEFICS3_STYLE = ["colmodernvbert", "colidefics3", "bimodernvbert", "biidefics3"]
PAGE_SIZES = [(64, 64), (128, 96), (96, 128), (128, 64)]  # (width, height)
QUERIES = ["hi", "what was the revenue in 2023?", "Which figure shows the attention map of the encoder?"]
DOCUMENTS = ["Revenue grew by 12% in 2023.", "The encoder attends to every patch.", "x"]
MAX_INPUT_TOKENS = 80  # above every test text with its prompt (ColGemma3's chat turn: 68 tokens)


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


def reference(name: str):
    """colpali-engine's own model and processor for the tiny checkpoint `name`."""
    model_cls, processor_cls = (getattr(colpali_models, cls) for cls in FAMILIES[name])
    path = tiny_models_dir() / name
    options = {"key_mapping": {}} if model_cls.__name__ in NEEDS_KEY_MAPPING else {}
    return model_cls.from_pretrained(path, **options).eval(), processor_cls.from_pretrained(path)


def embedded(name: str, reference_rows):
    """Our outputs and the reference outputs for one family: {kind: (ours, reference, batch)}."""
    backend = loaded_backend(name)
    backend.warmup()
    model, processor = reference(name)
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
            outputs[kind] = (ours, reference_rows(model(**batch), batch), batch)
    return name, backend, model, processor, outputs


def rows_by_mask(output: torch.Tensor, batch) -> list[np.ndarray]:
    return [rows[mask.bool()].float().numpy() for rows, mask in zip(output, batch["attention_mask"])]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def pooled(rows: np.ndarray) -> np.ndarray:
    mean = rows.mean(axis=0)
    return mean / np.linalg.norm(mean)


@pytest.fixture(scope="module", params=list(LATE_INTERACTION))
def family(request):
    """A late-interaction family: (name, backend, model, processor, {kind: (ours, reference, batch)})."""
    return embedded(request.param, rows_by_mask)


@pytest.fixture(scope="module", params=list(SINGLE_VECTOR))
def single(request):
    """A single-vector family, its reference being one pooled row per input."""
    return embedded(request.param, lambda output, batch: list(output.float().numpy()))


def needs_padding(name: str, kind: str, batch) -> None:
    if kind != "images" or name not in FIXED_PAGE_TOKENS:  # those pages are all one length
        assert not batch["attention_mask"].bool().all(), f"{kind}: the batch should need padding"


def test_token_vectors_equal_the_models_own_rows(family):
    name, backend, model, _processor, outputs = family
    assert backend.dim == model.dim == (320 if name == "colqwen3" else 128)  # ColQwen3 projects to 320
    for kind, (ours, reference, batch) in outputs.items():
        needs_padding(name, kind, batch)
        for vectors, expected in zip(ours, reference):
            assert isinstance(vectors, np.ndarray) and vectors.dtype == np.float32
            assert vectors.shape == expected.shape, kind  # the valid rows, no padding rows
            assert np.isfinite(vectors).all(), kind
            assert cosines(vectors, expected).min() >= 0.9999, kind


def test_rows_are_the_inputs_own_length_alone(family):
    _name, _backend, _model, processor, outputs = family
    images, _, _ = outputs["images"]
    for data, vectors in zip(PAGES, images):
        alone = processor.process_images([Image.open(io.BytesIO(data))])
        assert len(vectors) == alone["input_ids"].shape[1]
    queries, _, _ = outputs["queries"]
    for text, vectors in zip(QUERIES, queries):
        assert len(vectors) == processor.process_queries([text])["input_ids"].shape[1]


def test_pooled_vectors_match(family):
    *_, outputs = family
    for kind, (ours, reference, _) in outputs.items():
        for vectors, expected in zip(ours, reference):
            assert cosines(pooled(vectors), pooled(expected)) >= 0.9999, kind


def test_maxsim_scores_match_score_multi_vector(family):
    *_, processor, outputs = family
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


def check_cost(name, backend, processor) -> None:
    image = backend.prepare(EmbedInput("image", image=PAGES[1]))
    alone = processor.process_images([Image.open(io.BytesIO(PAGES[1]))])
    # Gemma3's processor names its begin-of-image token `image_token_id`; its patch tokens are the tokenizer's.
    patch_token = processor.tokenizer.image_token_id if "gemma3" in name else processor.image_token_id
    assert image.cost == image.n_tokens == int((alone["input_ids"] == patch_token).sum()) > 0
    if name in FIXED_PAGE_TOKENS:
        assert image.cost == FIXED_PAGE_TOKENS[name]
    query = backend.prepare(EmbedInput("text", text=QUERIES[1], input_type="query"))
    assert query.cost == query.n_tokens == processor.process_queries([QUERIES[1]])["input_ids"].shape[1]


def test_cost_counts_tokens_and_visual_tokens(family):
    name, backend, _model, processor, _ = family
    check_cost(name, backend, processor)


def test_over_long_text_is_refused_or_truncated(family):
    name, backend, _model, processor, _ = family
    text = "a long question " * 20
    with pytest.raises(InputTooLong):
        backend.prepare(EmbedInput("text", text=text, input_type="query", truncate=False))
    cut = backend.prepare(EmbedInput("text", text=text, input_type="query"))
    assert MAX_INPUT_TOKENS - 3 <= cut.n_tokens <= MAX_INPUT_TOKENS
    ids = cut.payload[1]["input_ids"][0]
    if name == "colgemma3":  # its queries are a chat turn ("Query: ..."), with no augmentation tokens
        assert processor.tokenizer.decode(ids).endswith("<end_of_turn>\n")  # the turn's end survives the cut
    else:
        augmentation = processor.tokenizer.convert_tokens_to_ids(processor.query_augmentation_token)
        assert (ids[-10:] == augmentation).all()  # the query suffix survives the cut
    [vectors] = backend.embed([cut])
    assert vectors.shape == (cut.n_tokens, backend.dim)


def test_single_vectors_equal_the_models_own(single):
    name, backend, model, _processor, outputs = single
    assert backend.dim == model.config.get_text_config().hidden_size  # no projection: the hidden state, pooled
    for kind, (ours, reference, batch) in outputs.items():
        needs_padding(name, kind, batch)
        assert len(ours) == len(reference)
        for vector, expected in zip(ours, reference):
            assert isinstance(vector, np.ndarray) and vector.dtype == np.float32
            assert vector.shape == expected.shape == (backend.dim,), kind
            assert np.isfinite(vector).all(), kind
            assert cosines(vector, expected) >= 0.9999, kind
            assert abs(np.linalg.norm(vector) - 1) < 1e-4, kind  # the model normalises
            # the shared post-processor keeps a single vector as it is when asked for `pooled`
            np.testing.assert_allclose(
                finalize(vector, pooled=True, normalize=True, dimensions=None), vector, atol=1e-6
            )


def test_single_vector_scores_match_score_single_vector(single):
    *_, processor, outputs = single
    queries, reference_queries, _ = outputs["queries"]
    passages = outputs["images"][0] + outputs["documents"][0]
    reference_passages = outputs["images"][1] + outputs["documents"][1]
    ours = np.stack(queries) @ np.stack(passages).T
    expected = processor.score_single_vector(
        [torch.from_numpy(q) for q in reference_queries], [torch.from_numpy(p) for p in reference_passages], "cpu"
    ).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-6)


def test_single_vector_cost_counts_tokens_and_visual_tokens(single):
    name, backend, _model, processor, _ = single
    check_cost(name, backend, processor)


def test_single_vector_models_are_not_multivector():
    for name in SINGLE_VECTOR:
        spec = spec_for(name)
        assert not spec.multivector
        with pytest.raises(ValueError, match="one vector per input"):
            spec_for(name, late_interaction=True)
    assert all(spec_for(name).multivector for name in LATE_INTERACTION)
    # the registry's naming rule (no torch in common/) and the backend's family table agree
    assert {cls: single_vector_class(cls) for cls in colpali.FAMILIES} == {
        cls: family.single_vector for cls, family in colpali.FAMILIES.items()
    }
    assert {classes[0] for classes in FAMILIES.values()} == set(colpali.FAMILIES)  # each served class is tested


def test_the_api_refuses_multivector_output_for_a_single_vector_model(redis_server, tmp_path):
    models_file = tmp_path / "models.yaml"
    models_file.write_text(
        f"""models:
  - name: bi
    backend: colpali
    model_class: BiQwen2_5
    path: {tiny_models_dir() / "biqwen2_5"}
    modalities: [text, image]
"""
    )
    with TestClient(create_app(Settings(redis_url=f"{redis_server}/13", models_file=models_file))) as client:
        response = client.post("/v1/embeddings/text", json={"model": "bi", "input": "hi", "output": "multivector"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "output"


@pytest.mark.parametrize("name", QWEN_STYLE + IDEFICS3_STYLE)
def test_visual_tokens_are_bounded(name):
    bound = 8
    backend = loaded_backend(name, max_num_visual_tokens=bound)
    unbounded = loaded_backend(name)
    for data in PAGES:
        assert backend.prepare(EmbedInput("image", image=data)).cost <= bound
    big = PAGES[1]
    assert unbounded.prepare(EmbedInput("image", image=big)).cost > bound
    if name in QWEN_STYLE:  # the same bound as colpali-engine's own `max_num_visual_tokens`
        processor = getattr(colpali_models, FAMILIES[name][1]).from_pretrained(
            tiny_models_dir() / name, max_num_visual_tokens=bound
        )
        ids = processor.process_images([Image.open(io.BytesIO(big))])["input_ids"]
        assert backend.prepare(EmbedInput("image", image=big)).cost == int((ids == processor.image_token_id).sum())


@pytest.mark.parametrize("name", list(FIXED_PAGE_TOKENS))
def test_fixed_page_tokens_must_fit_the_bound(name):
    tokens = FIXED_PAGE_TOKENS[name]
    with pytest.raises(ValueError, match="max_num_visual_tokens"):
        loaded_backend(name, max_num_visual_tokens=tokens - 1)
    backend = loaded_backend(name, max_num_visual_tokens=tokens)
    assert {backend.prepare(EmbedInput("image", image=data)).cost for data in PAGES} == {tokens}


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
