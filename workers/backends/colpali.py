"""Late-interaction and single-vector visual retrievers through colpali-engine: the Col* families
(ColQwen2, ColQwen2.5, ColQwen3, ColQwen3.5, ColPali, ColIdefics3, ColModernVBert, ColGemma3)
return one `(n_tokens, dim)` float32 array of token vectors per input, the Bi* families (BiQwen2,
BiQwen2.5, BiQwen3, BiQwen3.5, BiPali, BiIdefics3, BiModernVBert, BiGemma3) one `(dim,)` vector.

`prepare` does all the CPU work for one input with the model's own processor: queries go through
`process_queries` (query prefix + 10 augmentation tokens, as colpali-engine trains them; the Gemma3
processors put the query in a chat turn as "Query: ...", ColGemma3's with no augmentation), text
documents through `process_texts` (no augmentation, as its training collator feeds text passages),
images through `process_images`. `embed` pads those per-input features into one batch exactly as
the processor pads a batch (tokens on the tokenizer's side, pixels with zeros) and runs one forward
pass. A Col* model's output keeps the rows the attention mask marks valid, L2-normalised per token
as the model makes them (pooling is the shared post-processor's job); a Bi* model pools and
normalises in its own forward (last token for the decoders, the mean over the mask for BiPali and
BiModernVBert).

Visual tokens per page are bounded by `spec.max_num_visual_tokens`:
- Qwen2-VL style (ColQwen2, ColQwen2.5, ColQwen3, ColQwen3.5 and their Bi* twins): one token per
  `patch_size * merge_size` square after the 2x2 merge (28 px for Qwen2/2.5, 32 px for Qwen3/3.5),
  so the image processor's max pixels (`size["longest_edge"]`) is set to
  `max_num_visual_tokens * (patch_size * merge_size)**2`, as colpali-engine's own
  `max_num_visual_tokens` argument does; larger pages are scaled down.
- Idefics3 style (ColIdefics3, ColModernVBert, BiIdefics3, BiModernVBert): a page is scaled to a
  longest edge, cut into square tiles of `image_seq_len` tokens, plus one global tile. The longest
  edge is lowered (never raised: these processors upscale every page to it) to `k` tiles, the most
  with `(k*k + 1) * image_seq_len` tokens within the bound, or to one tile (no split) when none fits.
- PaliGemma and Gemma3 (ColPali, ColGemma3, BiPali, BiGemma3): every page is resized to one fixed
  square and gives a fixed number of tokens set by the checkpoint (`image_seq_length`; Gemma3's
  pan-and-scan crops stay off, colpali-engine's processor never asks for them, and its
  `max_num_visual_tokens` argument changes nothing there); loading fails with a clear message when
  that number is over the bound.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import math
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from common.errors import InputTooLong, ServiceUnavailable
from common.inputs.images import load_image
from common.inputs.text import check_token_ids, too_long
from common.registry import ModelSpec
from common.settings import Settings

from .base import EmbedInput, Prepared
from .device import load_options, oom_as_out_of_memory, resolve_device
from .tokens import Piece, pieces


@dataclass(frozen=True)
class Family:
    """What the backend needs to know of one colpali-engine model class."""

    processor: str  # its processor class in colpali_engine.models
    model_type: str  # the `model_type` of its checkpoints' config
    single_vector: bool = False  # one pooled, normalised vector per input (Bi*), not token vectors (Col*)
    # `key_mapping` for from_pretrained where the class's own default fails: unless given one, BiQwen2,
    # BiQwen2_5 and BiGemma3 read their base class's `_checkpoint_conversion_mapping`, which
    # transformers 5 dropped (it applies those renames by model_type, whatever mapping is passed).
    key_mapping: dict[str, str] | None = None


# colpali-engine model class -> its family. Adding one is a row here and a tiny checkpoint builder in
# scripts/make_tiny_models.py; `common.registry.single_vector_class` must agree on `single_vector`.
FAMILIES = {
    "ColQwen2": Family("ColQwen2Processor", "qwen2_vl"),
    "ColQwen2_5": Family("ColQwen2_5_Processor", "qwen2_5_vl"),
    "ColQwen3": Family("ColQwen3Processor", "qwen3_vl"),
    "ColQwen3_5": Family("ColQwen3_5Processor", "qwen3_5"),
    "ColPali": Family("ColPaliProcessor", "paligemma"),
    "ColIdefics3": Family("ColIdefics3Processor", "idefics3"),
    "ColModernVBert": Family("ColModernVBertProcessor", "modernvbert"),
    "ColGemma3": Family("ColGemmaProcessor3", "gemma3"),
    "BiQwen2": Family("BiQwen2Processor", "qwen2_vl", single_vector=True, key_mapping={}),
    "BiQwen2_5": Family("BiQwen2_5_Processor", "qwen2_5_vl", single_vector=True, key_mapping={}),
    "BiQwen3": Family("BiQwen3Processor", "qwen3_vl", single_vector=True),
    "BiQwen3_5": Family("BiQwen3_5Processor", "qwen3_5", single_vector=True),
    # BiPaliProcessor only renames ColPaliProcessor, and with transformers 5 its `(*args, **kwargs)`
    # signature hides its tokenizer and image processor from `from_pretrained`: it loads neither.
    "BiPali": Family("ColPaliProcessor", "paligemma", single_vector=True),
    "BiIdefics3": Family("BiIdefics3Processor", "idefics3", single_vector=True),
    "BiModernVBert": Family("BiModernVBertProcessor", "modernvbert", single_vector=True),
    "BiGemma3": Family("BiGemmaProcessor3", "gemma3", single_vector=True, key_mapping={}),
}

# Per-token features, padded on the tokenizer's side; every other feature is padded with zeros
# after its end along dimension 1 (patches of Qwen, tiles of Idefics3).
_TOKEN_FEATURES = {"input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"}


def colpali_classes(model_class: str) -> tuple[type, type]:
    """The colpali-engine model and processor classes called `model_class`."""
    if model_class not in FAMILIES:
        raise ValueError(f"unknown colpali model_class {model_class!r}; known: {sorted(FAMILIES)}")
    import colpali_engine.models as models

    return getattr(models, model_class), getattr(models, FAMILIES[model_class].processor)


def load_model(model_class: str, path: str, **options):
    """`model_class.from_pretrained(path, **options)`, with the family's own loading arguments."""
    model_cls, _ = colpali_classes(model_class)
    family = FAMILIES[model_class]
    if family.key_mapping is not None:
        options = {"key_mapping": dict(family.key_mapping), **options}
    return model_cls.from_pretrained(path, **options)


def visual_token_ids(processor) -> list[int]:
    """The ids of the tokens that stand for image patches. Gemma3's processor calls its
    begin-of-image token `image_token_id`; `image_token_ids` names the patch tokens for every family."""
    return list(getattr(processor, "image_token_ids", None) or [processor.image_token_id])


def output_dim(model) -> int:
    """The width of the model's vectors: a Col* model's projection `dim`, else (Bi*) its text hidden
    size, cut to the Matryoshka `embedding_dim` its forward defaults to (BiGemma3: 2560)."""
    if getattr(model, "dim", None):
        return model.dim
    width = model.config.get_text_config().hidden_size
    cut = inspect.signature(model.forward).parameters.get("embedding_dim")
    return min(width, cut.default) if cut is not None and isinstance(cut.default, int) else width


def bound_visual_tokens(processor, max_tokens: int) -> None:
    """Make `processor` give at most `max_tokens` visual tokens per page (see the module doc)."""
    image_processor = processor.image_processor
    if hasattr(image_processor, "merge_size"):  # Qwen2-VL style
        size = image_processor.size
        size["longest_edge"] = max_tokens * (image_processor.patch_size * image_processor.merge_size) ** 2
        size["shortest_edge"] = min(size["shortest_edge"], size["longest_edge"])
    elif hasattr(image_processor, "max_image_size"):  # Idefics3 style
        tiles = max_tokens // processor.image_seq_len
        if tiles == 0:
            raise ValueError(
                f"max_num_visual_tokens={max_tokens} is under the {processor.image_seq_len} tokens of one image tile"
            )
        per_side = math.isqrt(tiles - 1) if tiles >= 5 else 1
        longest = per_side * image_processor.max_image_size["longest_edge"]
        image_processor.size["longest_edge"] = min(image_processor.size["longest_edge"], longest)
    elif processor.image_seq_length > max_tokens:  # PaliGemma, Gemma3: fixed per checkpoint
        raise ValueError(
            f"this model gives every page {processor.image_seq_length} visual tokens, over "
            f"max_num_visual_tokens={max_tokens}; raise max_num_visual_tokens"
        )


def collate(features: Sequence[dict[str, np.ndarray]], pad_id: int, left: bool) -> dict[str, np.ndarray]:
    """Stack single-input processor features into one batch, padded as the processor pads."""
    batch = {}
    for key in features[0]:
        arrays = [f[key] for f in features]
        width = max(a.shape[1] for a in arrays)
        padded = []
        for a in arrays:
            pad = [(0, 0)] * a.ndim
            pad[1] = (width - a.shape[1], 0) if key in _TOKEN_FEATURES and left else (0, width - a.shape[1])
            padded.append(np.pad(a, pad, constant_values=pad_id if key == "input_ids" else 0))
        batch[key] = np.concatenate(padded)
    return batch


class ColpaliBackend:
    def __init__(self, spec: ModelSpec, device: str, settings: Settings):
        self.spec = spec
        self.settings = settings
        self.device = resolve_device(device)
        self.options = load_options(spec, self.device)
        self.dtype, self.attention = self.options["dtype"], self.options["attn_implementation"]
        # HF tokenizers are not safe to call from several threads at once; a few copies of the
        # processor let that many task threads preprocess pages while the device runs a batch.
        self._processors: queue.Queue | None = None
        self._processors_lock = threading.Lock()
        self.single_vector = False
        self.dim = 0

    def load(self) -> None:
        _, processor_cls = colpali_classes(self.spec.model_class)
        path = self.spec.resolved_path()
        self.use(load_model(self.spec.model_class, path, **self.options).eval(), processor_cls.from_pretrained(path))

    def use(self, model, processor) -> None:
        """Serve `model` with `processor`, as `load` does once it has read them."""
        self.single_vector = FAMILIES[self.spec.model_class].single_vector
        self.model, self.processor = model, processor
        bound_visual_tokens(self.processor, self.spec.max_num_visual_tokens)
        self._visual_token_ids = visual_token_ids(self.processor)
        self.dim = output_dim(self.model)

    def _processor_pool(self) -> queue.Queue:
        """`self.processor` and copies of it, one per CPU thread, made on first use."""
        with self._processors_lock:
            if self._processors is None:
                self._processors = queue.Queue()
                self._processors.put(self.processor)
                for _ in range(max(self.settings.cpu_threads, 1) - 1):
                    self._processors.put(copy.deepcopy(self.processor))
            return self._processors

    @contextlib.contextmanager
    def _borrow_processor(self) -> Iterator:
        pool = self._processor_pool()
        timeout = self.settings.request_timeout_s
        try:
            processor = pool.get(timeout=timeout)
        except queue.Empty:
            raise ServiceUnavailable(f"No processor was free within {timeout:.0f}s.") from None
        try:
            yield processor
        finally:
            pool.put(processor)

    def warmup(self) -> None:
        page = io.BytesIO()
        Image.new("RGB", (96, 128), "white").save(page, format="PNG")
        self.embed([self.prepare(EmbedInput("text", text="warm up", input_type="query"))])
        self.embed([self.prepare(EmbedInput("image", image=page.getvalue()))])

    def tokenize(self, text: str, add_special_tokens: bool) -> list[Piece]:
        """The tokenizer's tokens of `text`, without the processor's query prefix and augmentation."""
        with self._borrow_processor() as processor:
            return pieces(processor.tokenizer, text, add_special_tokens)

    def prepare(self, item: EmbedInput) -> Prepared:
        if item.modality == "image":
            image = load_image(item.image, self.settings.max_image_pixels)
            with self._borrow_processor() as processor:
                features = processor.process_images([image])
            n_tokens = int(np.isin(features["input_ids"].numpy(), self._visual_token_ids).sum())
        else:
            with self._borrow_processor() as processor:
                features = self._process_text(processor, item)
            n_tokens = features["input_ids"].shape[1]
        # PaliGemma's processor adds training labels; a forward given labels would compute a loss.
        payload = {key: value.numpy() for key, value in features.items() if key != "labels"}
        return Prepared(cost=n_tokens, n_tokens=n_tokens, payload=(item.modality, payload))

    def _process_text(self, processor, item: EmbedInput):
        tokenizer = processor.tokenizer
        if item.token_ids is not None:
            check_token_ids(item.token_ids, tokenizer)
            text = tokenizer.decode(item.token_ids)
        else:
            text = item.text or ""
        process = processor.process_queries if item.input_type == "query" else processor.process_texts
        features = process([text])
        n_tokens = features["input_ids"].shape[1]
        if n_tokens <= self.spec.max_input_tokens:
            return features
        if not item.truncate:
            raise too_long(n_tokens, self.spec.max_input_tokens)
        # Cut the text itself, so the processor's prefix and query augmentation tokens stay whole;
        # a decoded token prefix may re-tokenize a little longer, hence the loop.
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        keep = len(ids)
        while n_tokens > self.spec.max_input_tokens:
            if keep == 0:
                raise InputTooLong(
                    f"This model's limit of {self.spec.max_input_tokens} tokens leaves no room for text.", "input"
                )
            keep = max(keep - (n_tokens - self.spec.max_input_tokens), 0)
            features = process([tokenizer.decode(ids[:keep])])
            n_tokens = features["input_ids"].shape[1]
        return features

    def model_inputs(self, batch: Sequence[Prepared]) -> dict[str, torch.Tensor]:
        """The tensors one forward pass takes for `batch`, collated and on the device."""
        if len({p.payload[0] for p in batch}) > 1:
            raise ValueError("a batch must hold inputs of one modality")
        tokenizer = self.processor.tokenizer
        features = collate([p.payload[1] for p in batch], tokenizer.pad_token_id, tokenizer.padding_side == "left")
        inputs = {}
        for key, array in features.items():
            tensor = torch.from_numpy(array).to(self.device)
            inputs[key] = tensor.to(self.dtype) if tensor.is_floating_point() else tensor
        return inputs

    def embed(self, batch: Sequence[Prepared]) -> list[np.ndarray]:
        with torch.inference_mode(), oom_as_out_of_memory():
            inputs = self.model_inputs(batch)
            vectors = self.model(**inputs)
            if self.single_vector:  # (batch, dim), pooled and normalised by the model
                return list(vectors.float().cpu().numpy())
            # Select by mask first: with SDPA, left-padded rows can be NaN rather than zero.
            mask = inputs["attention_mask"].bool()
            rows = vectors[mask].float().cpu().numpy()
            lengths = mask.sum(dim=1).tolist()
        return np.split(rows, np.cumsum(lengths)[:-1])


def create(spec: ModelSpec, device: str, settings: Settings) -> ColpaliBackend:
    return ColpaliBackend(spec, device, settings)
