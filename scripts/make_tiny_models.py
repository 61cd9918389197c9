"""Build tiny, randomly initialised checkpoints of the model families embedq serves, fully offline.

Each checkpoint is saved with `save_pretrained` next to its processor or tokenizer, so the tests
load it through the normal `from_pretrained` path, exactly as a real checkpoint. Weights are
seeded, so a rebuild gives the same model. The whole set is a few MB and builds in seconds.

    python scripts/make_tiny_models.py OUT_DIR [--only colqwen2 qwen3_embed ...]

Visual retrievers, one per colpali-engine class the colpali backend serves (its `FAMILIES`):
late-interaction colqwen2, colqwen2_5, colqwen3, colqwen3_5, colmodernvbert, colpali, colidefics3,
colgemma3, and their single-vector twins biqwen2, biqwen2_5, biqwen3, biqwen3_5, bimodernvbert,
bipali, biidefics3, bigemma3 (the same architecture without the projection, pooled in its forward).
Text, each also laid out for sentence-transformers with its query prompt: qwen3_embed (a Qwen3Model
with last-token pooling, as Qwen3-Embedding) and bert_cls (a BertModel with CLS pooling, as BGE).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workers.backends.torch_compat import ensure_torchvision

ensure_torchvision()

import torch  # noqa: E402
from tokenizers import processors  # noqa: E402
from tokenizers.pre_tokenizers import ByteLevel  # noqa: E402
from transformers import Qwen2Tokenizer  # noqa: E402

from workers.backends.colpali import colpali_classes  # noqa: E402

SEED = 0
# The query prompts of Qwen3-Embedding's and BGE's sentence-transformers configs.
QWEN3_TASK = "Given a web search query, retrieve relevant passages that answer the query"
QWEN3_QUERY_PROMPT = f"Instruct: {QWEN3_TASK}\nQuery:"
BGE_QUERY_PROMPT = "Represent this sentence for searching relevant passages: "
# Text towers share one shape: big enough to be a real transformer, small enough for seconds.
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
# Vision towers of the Idefics3-style and PaliGemma families: 32 px tiles of 8 px patches.
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
VISION.update(image_size=32, patch_size=8)
QWEN_SPECIALS = "<|im_start|> <|im_end|> <|vision_start|> <|vision_end|> <|vision_pad|> <|image_pad|> <|video_pad|>"
IDEFICS3_SPECIALS = " ".join(
    ["<|im_start|> <|begin_of_text|> <fake_token_around_image> <image> <global-img> <end_of_utterance> <pad>"]
    + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
)
GEMMA3_SPECIALS = "<start_of_turn> <end_of_turn> <start_of_image> <end_of_image> <image_soft_token>"
# Gemma3's chat template, cut to what colpali-engine's Gemma3 processors use: user turns of text and images.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
)


def byte_tokenizer(specials: str, **special_tokens: str) -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer (the 256 byte symbols, no merges) with the given special tokens.
    Every text tokenizes, one token per UTF-8 byte, which keeps the vocabulary (and model) tiny."""
    vocab = {symbol: i for i, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], **special_tokens)
    tokenizer.add_special_tokens({"additional_special_tokens": specials.split()})
    return tokenizer


def vocab_size(tokenizer) -> int:
    return (len(tokenizer) + 63) // 64 * 64


def build_colqwen(out: Path, model_class: str) -> None:
    """Qwen2-VL and Qwen2.5-VL: ColQwen2, ColQwen2_5, BiQwen2, BiQwen2_5."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    model_cls, processor_cls = colpali_classes(model_class)
    if not model_class.endswith("Qwen2_5"):
        from transformers import Qwen2VLConfig as config_cls

        # Qwen2-VL's patch merger projects to `hidden_size`: it must be the text hidden size.
        vision = dict(depth=1, embed_dim=32, hidden_size=TEXT["hidden_size"], num_heads=2, mlp_ratio=2)
    else:
        from transformers import Qwen2_5_VLConfig as config_cls

        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, window_size=56)
        vision.update(out_hidden_size=TEXT["hidden_size"], fullatt_block_indexes=[1])
    tokenizer = byte_tokenizer(QWEN_SPECIALS)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIALS.split()}
    # 28x28 px per visual token after the 2x2 merge: 4 to 64 tokens a page.
    image_processor = Qwen2VLImageProcessor(min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28)
    processor = processor_cls(image_processor, tokenizer, video_processor=Qwen2VLVideoProcessor())
    processor.save_pretrained(out)
    head_dim = TEXT["hidden_size"] // TEXT["num_attention_heads"]
    config = config_cls(
        text_config=dict(
            **TEXT,
            vocab_size=vocab_size(tokenizer),
            # multimodal RoPE splits head_dim/2 rotary frequencies over (time, height, width)
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    assert sum(config.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    model_cls(config).save_pretrained(out)


def build_colqwen3(out: Path, model_class: str) -> None:
    """Qwen3-VL and Qwen3.5: ColQwen3, ColQwen3_5, BiQwen3, BiQwen3_5. Both take Qwen3-VL's processor
    (16 px patches, so 32x32 px per visual token after the 2x2 merge); Qwen3.5's text model mixes
    linear-attention (Gated DeltaNet) layers with full-attention ones, one of each here."""
    from transformers import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    model_cls, processor_cls = colpali_classes(model_class)
    tokenizer = byte_tokenizer(QWEN_SPECIALS)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIALS.split()}
    # 4 to 64 tokens a page, normalised to [-1, 1] as Qwen3-VL's own preprocessor config does.
    image_processor = Qwen2VLImageProcessor(
        patch_size=16, min_pixels=4 * 32 * 32, max_pixels=64 * 32 * 32, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor_cls(image_processor, tokenizer, video_processor=Qwen3VLVideoProcessor()).save_pretrained(out)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16)
    # a learned 8x8 grid of position embeddings, interpolated to each page's patch grid
    vision.update(out_hidden_size=TEXT["hidden_size"], num_position_embeddings=64)
    text = dict(**TEXT, head_dim=16, vocab_size=vocab_size(tokenizer), bos_token_id=None)
    text.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    # interleaved multimodal RoPE over (time, height, width): its sections add up to the rotary frequencies
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_interleaved": True}
    if model_class.endswith("Qwen3_5"):
        text.update(layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2)
        text.update(linear_key_head_dim=16, linear_value_head_dim=16, linear_num_value_heads=4)
        rope.update(partial_rotary_factor=0.5, mrope_section=[2, 1, 1])  # 8 of 16 dims rotate: 4 frequencies
    else:
        vision.update(deepstack_visual_indexes=[0])  # the first block's features also feed the first text layer
        rope.update(mrope_section=[2, 3, 3])
    config = model_cls.config_class(
        text_config=dict(text, rope_parameters=rope),
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model_cls(config).save_pretrained(out)


def build_idefics3_style(out: Path, model_class: str) -> None:
    """Idefics3 and ModernVBert: ColIdefics3, ColModernVBert, BiIdefics3, BiModernVBert."""
    from transformers import Idefics3ImageProcessor

    model_cls, processor_cls = colpali_classes(model_class)
    if model_class.endswith("ModernVBert"):
        from transformers import ModernVBertConfig as config_cls

        bos, scale_key = "<|begin_of_text|>", "pixel_shuffle_factor"
    else:
        from transformers import Idefics3Config as config_cls

        bos, scale_key = "<|im_start|>", "scale_factor"
    tokenizer = byte_tokenizer(
        IDEFICS3_SPECIALS, bos_token=bos, eos_token="<end_of_utterance>", pad_token="<pad>", unk_token="<pad>"
    )
    token_ids = dict(
        vocab_size=vocab_size(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    scale = 2
    image_seq_len = (VISION["image_size"] // VISION["patch_size"]) ** 2 // scale**2
    # Pages are resized to a longest edge of 64 px and cut into 32 px tiles: up to 2x2 tiles plus
    # the whole page as a global tile, 4 tokens each.
    image_processor = Idefics3ImageProcessor(
        size={"longest_edge": 2 * VISION["image_size"]}, max_image_size={"longest_edge": VISION["image_size"]}
    )
    processor_cls(image_processor, tokenizer, image_seq_len=image_seq_len).save_pretrained(out)
    if model_class.endswith("ModernVBert"):
        text = dict(model_type="modernbert", **TEXT, **token_ids)
        text.pop("num_key_value_heads")
        text.update(cls_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.eos_token_id)
        vision = dict(model_type="siglip_vision_model", **VISION)
    else:
        text = dict(model_type="llama", **TEXT, **token_ids)
        vision = VISION
    config = config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        **{scale_key: scale},
    )
    model_cls(config).save_pretrained(out)


def build_colpali(out: Path, model_class: str) -> None:
    """PaliGemma: ColPali, BiPali."""
    from transformers import PaliGemmaConfig, SiglipImageProcessor

    model_cls, processor_cls = colpali_classes(model_class)
    tokenizer = byte_tokenizer("<image>", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    n_image_tokens = (VISION["image_size"] // VISION["patch_size"]) ** 2
    image_processor = SiglipImageProcessor(
        size={"height": VISION["image_size"], "width": VISION["image_size"]}, image_seq_length=n_image_tokens
    )
    # PaliGemma's processor adds 1152 <loc…>/<seg…> tokens: build it first to size the vocabulary.
    processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(out)
    size = vocab_size(tokenizer)
    text = dict(model_type="gemma", **TEXT, head_dim=16, vocab_size=size, pad_token_id=tokenizer.pad_token_id)
    text.update(num_key_value_heads=1, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = PaliGemmaConfig(
        text_config=text,
        vision_config=dict(model_type="siglip_vision_model", **VISION),
        projection_dim=TEXT["hidden_size"],
        hidden_size=TEXT["hidden_size"],
        vocab_size=size,
        image_token_index=processor.image_token_id,
    )
    model_cls(config).save_pretrained(out)


def build_colgemma3(out: Path, model_class: str) -> None:
    """Gemma3: ColGemma3, BiGemma3. Every page is resized to one 32 px square: 16 SigLIP patches,
    average-pooled to 4 image tokens (Gemma3's processor gives each image a fixed number)."""
    from transformers import Gemma3Config, Gemma3ImageProcessor

    model_cls, processor_cls = colpali_classes(model_class)
    tokenizer = byte_tokenizer(
        GEMMA3_SPECIALS,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        # Gemma3's processor reads these named tokens from its tokenizer
        boi_token="<start_of_image>",
        eoi_token="<end_of_image>",
        image_token="<image_soft_token>",
        chat_template=GEMMA3_CHAT_TEMPLATE,
    )
    size = VISION["image_size"]
    image_processor = Gemma3ImageProcessor(
        size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    tokens_per_image = 4
    processor_cls(image_processor, tokenizer, image_seq_length=tokens_per_image).save_pretrained(out)
    text = dict(**TEXT, head_dim=16, query_pre_attn_scalar=16, vocab_size=vocab_size(tokenizer))
    # one sliding-window layer (a window shorter than a page's prompt) and one global layer
    text.update(layer_types=["sliding_attention", "full_attention"], sliding_window=16)
    text.update(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    config = Gemma3Config(
        text_config=dict(text, eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(model_type="siglip_vision_model", **VISION),
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
    )
    model_cls(config).save_pretrained(out)


def build_qwen3_embed(out: Path) -> None:
    """A Qwen3-Embedding look-alike: left padding, EOS appended to every input, last-token pooling."""
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = byte_tokenizer("<|im_start|> <|im_end|>", padding_side="left")
    eos = tokenizer.eos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:1 {eos}:1", special_tokens=[(eos, tokenizer.eos_token_id)]
    )
    tokenizer.save_pretrained(out)
    config = Qwen3Config(
        **TEXT,
        head_dim=16,
        vocab_size=vocab_size(tokenizer),
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    Qwen3Model(config).save_pretrained(out)
    save_sentence_transformer(out, "lasttoken", QWEN3_QUERY_PROMPT)


def build_bert_cls(out: Path) -> None:
    """A BGE look-alike: a BERT encoder with a WordPiece vocabulary of single characters, CLS pooling."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,:;!?'\"-()")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + [f"##{c}" for c in chars]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, model_max_length=512)
    tokenizer.save_pretrained(out)
    config = BertConfig(
        hidden_size=TEXT["hidden_size"],
        intermediate_size=TEXT["intermediate_size"],
        num_hidden_layers=TEXT["num_hidden_layers"],
        num_attention_heads=TEXT["num_attention_heads"],
        vocab_size=vocab_size(tokenizer),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    BertModel(config).save_pretrained(out)
    save_sentence_transformer(out, "cls", BGE_QUERY_PROMPT)


def save_sentence_transformer(out: Path, pooling_mode: str, query_prompt: str) -> None:
    """Lay the checkpoint in `out` out for sentence-transformers too: pooling, normalization, prompts."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    transformer = Transformer(str(out), max_seq_length=512)
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling_mode)
    prompts = {"query": query_prompt, "document": ""}
    SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu", prompts=prompts).save(str(out))


BUILDERS: dict[str, Callable[[Path], None]] = {
    "colqwen2": lambda out: build_colqwen(out, "ColQwen2"),
    "colqwen2_5": lambda out: build_colqwen(out, "ColQwen2_5"),
    "colqwen3": lambda out: build_colqwen3(out, "ColQwen3"),
    "colqwen3_5": lambda out: build_colqwen3(out, "ColQwen3_5"),
    "colmodernvbert": lambda out: build_idefics3_style(out, "ColModernVBert"),
    "colidefics3": lambda out: build_idefics3_style(out, "ColIdefics3"),
    "colpali": lambda out: build_colpali(out, "ColPali"),
    "colgemma3": lambda out: build_colgemma3(out, "ColGemma3"),
    "biqwen2": lambda out: build_colqwen(out, "BiQwen2"),
    "biqwen2_5": lambda out: build_colqwen(out, "BiQwen2_5"),
    "biqwen3": lambda out: build_colqwen3(out, "BiQwen3"),
    "biqwen3_5": lambda out: build_colqwen3(out, "BiQwen3_5"),
    "bimodernvbert": lambda out: build_idefics3_style(out, "BiModernVBert"),
    "biidefics3": lambda out: build_idefics3_style(out, "BiIdefics3"),
    "bipali": lambda out: build_colpali(out, "BiPali"),
    "bigemma3": lambda out: build_colgemma3(out, "BiGemma3"),
    "qwen3_embed": build_qwen3_embed,
    "bert_cls": build_bert_cls,
}


def build_all(out_dir: Path | str, only: list[str] | None = None) -> dict[str, Path]:
    """Build the named checkpoints (all by default) under `out_dir`; skip those already there.

    Each is built in a scratch folder and renamed into place, so a half-built checkpoint is never
    seen and processes building the same set at once do not clash."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unknown = set(only or ()) - set(BUILDERS)
    if unknown:
        raise ValueError(f"unknown tiny models {sorted(unknown)}; known: {sorted(BUILDERS)}")
    built = {}
    for name in only or BUILDERS:
        target = out_dir / name
        if not target.exists():
            scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out_dir))
            torch.manual_seed(SEED)
            BUILDERS[name](scratch)
            try:
                os.rename(scratch, target)
            except OSError:  # another process finished it first
                shutil.rmtree(scratch)
        built[name] = target
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--only", nargs="+", choices=sorted(BUILDERS), help="build only these")
    args = parser.parse_args()
    for name, path in build_all(args.out_dir, args.only).items():
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        print(f"{name:15s} {size / 1e6:6.2f} MB  {path}")


if __name__ == "__main__":
    main()
