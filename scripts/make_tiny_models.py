"""Build tiny, randomly initialised checkpoints of the model families embedq serves, fully offline.

Each checkpoint is saved with `save_pretrained` next to its processor or tokenizer, so the tests
load it through the normal `from_pretrained` path, exactly as a real checkpoint. Weights are
seeded, so a rebuild gives the same model. The whole set is a few MB and builds in seconds.

    python scripts/make_tiny_models.py OUT_DIR [--only colqwen2 qwen3_embed ...]

Late-interaction families: colqwen2, colqwen2_5, colmodernvbert, colpali, colidefics3.
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


def byte_tokenizer(specials: str, **special_tokens: str) -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer (the 256 byte symbols, no merges) with the given special tokens.
    Every text tokenizes, one token per UTF-8 byte, which keeps the vocabulary (and model) tiny."""
    vocab = {symbol: i for i, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], **special_tokens)
    tokenizer.add_special_tokens({"additional_special_tokens": specials.split()})
    return tokenizer


def vocab_size(tokenizer) -> int:
    return (len(tokenizer) + 63) // 64 * 64


def build_colqwen(out: Path, version: str) -> None:
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    if version == "2":
        from colpali_engine.models import ColQwen2 as model_cls
        from colpali_engine.models import ColQwen2Processor as processor_cls
        from transformers import Qwen2VLConfig as config_cls

        # Qwen2-VL's patch merger projects to `hidden_size`: it must be the text hidden size.
        vision = dict(depth=1, embed_dim=32, hidden_size=TEXT["hidden_size"], num_heads=2, mlp_ratio=2)
    else:
        from colpali_engine.models import ColQwen2_5 as model_cls
        from colpali_engine.models import ColQwen2_5_Processor as processor_cls
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


def build_idefics3_style(out: Path, family: str) -> None:
    from transformers import Idefics3ImageProcessor

    if family == "colmodernvbert":
        from colpali_engine.models import ColModernVBert as model_cls
        from colpali_engine.models import ColModernVBertProcessor as processor_cls
        from transformers import ModernVBertConfig as config_cls

        bos, scale_key = "<|begin_of_text|>", "pixel_shuffle_factor"
    else:
        from colpali_engine.models import ColIdefics3 as model_cls
        from colpali_engine.models import ColIdefics3Processor as processor_cls
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
    if family == "colmodernvbert":
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


def build_colpali(out: Path) -> None:
    from colpali_engine.models import ColPali, ColPaliProcessor
    from transformers import PaliGemmaConfig, SiglipImageProcessor

    tokenizer = byte_tokenizer("<image>", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    n_image_tokens = (VISION["image_size"] // VISION["patch_size"]) ** 2
    image_processor = SiglipImageProcessor(
        size={"height": VISION["image_size"], "width": VISION["image_size"]}, image_seq_length=n_image_tokens
    )
    # PaliGemma's processor adds 1152 <loc…>/<seg…> tokens: build it first to size the vocabulary.
    processor = ColPaliProcessor(image_processor=image_processor, tokenizer=tokenizer)
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
    ColPali(config).save_pretrained(out)


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
    "colqwen2": lambda out: build_colqwen(out, "2"),
    "colqwen2_5": lambda out: build_colqwen(out, "2.5"),
    "colmodernvbert": lambda out: build_idefics3_style(out, "colmodernvbert"),
    "colidefics3": lambda out: build_idefics3_style(out, "colidefics3"),
    "colpali": build_colpali,
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
