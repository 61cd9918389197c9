"""Benchmark the late-interaction models on one device: ColQwen2.5 (3B) and ColModernVBert at full size.

The models are built from their published architectures with random weights (the arithmetic is
that of the trained weights) directly on the device, and driven through the service's own
`ColpaliBackend` (`prepare` on the CPU, `embed` on the device), so what is timed is what a worker
runs. The processors are built offline: the byte-level tokenizer of `make_tiny_models.py` (one
token per UTF-8 byte, about 4 times a BPE tokenizer's count for English text) with the real image
processor settings, bounded to `--max-visual-tokens` (768) per page as the service bounds them.

Input: a synthetic A4 page rendered at 150 dpi (1240x1754 px, text-like content, PNG as the
ingest pipeline passes pages), about 736 visual tokens for ColQwen2.5 after the bound; short
queries for the query rate. Reported per configuration (bf16 + SDPA; bf16 + FlashAttention 2 when
`flash_attn` imports; NF4 4-bit through the backends' shared `quantization_config` when bitsandbytes
imports on CUDA) and batch size:

- forward: `model(**inputs)` on inputs already on the device, timed with CUDA events;
- embed: the backend's `embed` (collate, host-to-device copy, forward, valid rows back to numpy);
- e2e: pages through `prepare` in a thread pool while `embed` runs batch after batch, as a worker
  overlaps them;
- TFLOP/s and its share of the measured bf16 matmul ceiling (a square matmul loop). Model FLOPs
  are counted with `torch.utils.flop_counter` over one bf16 + SDPA forward of the same batch:
  2*m*n*k for every matmul and convolution, 4*s_q*s_k*d per attention head (no causal halving),
  which for a page is about 2 * active params * tokens of each tower plus attention;
- peak memory (`torch.cuda.max_memory_allocated`, weights included). A batch that runs out of
  memory is reported as OOM and the larger batch sizes of that configuration are skipped.

Warm-up runs are excluded; figures are medians of `--runs` runs. `prepare` (PNG decode + processor,
one thread) is timed on its own, per model.

    python scripts/bench_gpu.py --device cuda:0                    # the full benchmark
    python scripts/bench_gpu.py --device cuda:0 --quick --json bench-gpu.json
    python scripts/bench_gpu.py --tiny --device cpu --batch-sizes 1 2 --quick   # smoke test, seconds
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

import workers.backends  # noqa: E402,F401  (makes torchvision importable before transformers)
from common.inputs.images import encode_png  # noqa: E402
from common.registry import ModelSpec  # noqa: E402
from common.settings import Settings  # noqa: E402
from tests.tiny_models import builder  # noqa: E402  (the tiny checkpoints' builder, for --tiny)
from workers.backends.base import EmbedInput, OutOfMemory, Prepared  # noqa: E402
from workers.backends.colpali import ColpaliBackend, colpali_classes  # noqa: E402
from workers.backends.device import resolve_attention  # noqa: E402

SEED = 0
MODEL_CLASSES = {"colqwen2_5": "ColQwen2_5", "colmodernvbert": "ColModernVBert"}
A4_150DPI = (1240, 1754)
QUERIES = [
    "What was the total revenue in the third quarter of 2023?",
    "Which subsidiary reported the largest operating loss?",
    "How many employees did the company have at year end?",
    "What is the recommended dosage for children under twelve?",
    "Which figure shows the attention pattern of the encoder?",
    "What are the side effects listed in table 3?",
    "When does the warranty period start?",
    "What is the maximum operating temperature of the pump?",
    "Who signed the agreement on behalf of the supplier?",
    "What was the net cash flow from financing activities?",
    "Which regions grew faster than ten percent?",
    "How is the torque converted to the output shaft?",
    "What interest rate applies after the fixed period ends?",
    "Which datasets were used to evaluate retrieval?",
    "What does the flow chart on page 4 describe?",
    "What is the deadline for the final report?",
]

# Qwen2.5-VL-3B-Instruct (ColQwen2.5's backbone): its text config and the Qwen2.5-VL vision tower.
QWEN2_5_VL_3B_TEXT = dict(
    hidden_size=2048,
    num_hidden_layers=36,
    num_attention_heads=16,
    num_key_value_heads=2,
    intermediate_size=11008,
    vocab_size=151936,
    max_position_embeddings=128000,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    # multimodal RoPE: head_dim 128 -> 64 frequencies over (time, height, width)
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
)
QWEN2_5_VL_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    out_hidden_size=2048,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    tokens_per_second=2,
)
# Qwen2.5-VL's published preprocessor (min and max pixels); the service lowers the max to its bound.
QWEN2_VL_PIXELS = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384}
# ColModernVBert: a ModernBERT-base-size text model (vocabulary 50368 + 40 added tokens) and a
# SigLIP2-base-patch16-512-size vision model; pixel shuffle 4 gives 64 tokens per 512 px tile.
MODERNBERT_BASE_TEXT = dict(
    model_type="modernbert",
    hidden_size=768,
    intermediate_size=1152,
    num_hidden_layers=22,
    num_attention_heads=12,
    max_position_embeddings=8192,
    vocab_size=50368 + 40,
)
SIGLIP2_BASE_512_VISION = dict(
    model_type="siglip_vision_model",
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=512,
    patch_size=16,
)
MODERNVBERT_PIXEL_SHUFFLE = 4
# Pages scaled to a longest edge (the 768-token bound lowers it to 1536: 3x3 tiles + the global one).
MODERNVBERT_SIZES = {"size": {"longest_edge": 2048}, "max_image_size": {"longest_edge": 512}}


# --- models and processors ---------------------------------------------------------------------


def full_size(name: str) -> tuple[object, object]:
    """(config, processor) of the published architecture `name`, built offline."""
    tiny = builder()
    model_cls, processor_cls = colpali_classes(MODEL_CLASSES[name])
    if name == "colqwen2_5":
        from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        tokenizer = tiny.byte_tokenizer(tiny.QWEN_SPECIALS)
        ids = {token: tokenizer.convert_tokens_to_ids(token) for token in tiny.QWEN_SPECIALS.split()}
        image_processor = Qwen2VLImageProcessor(size=dict(QWEN2_VL_PIXELS), patch_size=14, merge_size=2)
        processor = processor_cls(image_processor, tokenizer, video_processor=Qwen2VLVideoProcessor())
        text = dict(QWEN2_5_VL_3B_TEXT, bos_token_id=None, eos_token_id=tokenizer.eos_token_id)
        text.update(pad_token_id=tokenizer.pad_token_id)
        config = model_cls.config_class(
            text_config=text,
            vision_config=dict(QWEN2_5_VL_VISION),
            tie_word_embeddings=True,
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
    elif name == "colmodernvbert":
        from transformers import Idefics3ImageProcessor

        tokenizer = tiny.byte_tokenizer(
            tiny.IDEFICS3_SPECIALS,
            bos_token="<|begin_of_text|>",
            eos_token="<end_of_utterance>",
            pad_token="<pad>",
            unk_token="<pad>",
        )
        vision = SIGLIP2_BASE_512_VISION
        image_seq_len = (vision["image_size"] // vision["patch_size"]) ** 2 // MODERNVBERT_PIXEL_SHUFFLE**2
        image_processor = Idefics3ImageProcessor(**copy.deepcopy(MODERNVBERT_SIZES))
        processor = processor_cls(image_processor, tokenizer, image_seq_len=image_seq_len)
        text = dict(MODERNBERT_BASE_TEXT, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
        text.update(eos_token_id=tokenizer.eos_token_id, cls_token_id=tokenizer.bos_token_id)
        text.update(sep_token_id=tokenizer.eos_token_id)
        config = model_cls.config_class(
            text_config=text,
            vision_config=dict(vision),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            pixel_shuffle_factor=MODERNVBERT_PIXEL_SHUFFLE,
        )
    else:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODEL_CLASSES)}")
    return config, processor


def tiny_size(name: str, tiny_dir: Path) -> tuple[object, object]:
    """(config, processor) of the tiny checkpoint `make_tiny_models.py` builds for `name`."""
    model_cls, processor_cls = colpali_classes(MODEL_CLASSES[name])
    path = builder().build_all(tiny_dir, [name])[name]
    return model_cls.config_class.from_pretrained(path), processor_cls.from_pretrained(path)


def build_model(model_class: str, config, device: str | torch.device, dtype: torch.dtype, attention: str):
    """`model_class(config)` with random weights, created on `device` in `dtype` (no CPU copy first)."""
    model_cls, _ = colpali_classes(model_class)
    torch.manual_seed(SEED)
    with torch.device(device):
        model = model_cls._from_config(copy.deepcopy(config), dtype=dtype, attn_implementation=attention)
    return model.eval()


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


class InMemoryBackend(ColpaliBackend):
    """The service's backend with its model built from a config on the device, not loaded."""

    def __init__(self, spec: ModelSpec, device: str, config, processor):
        super().__init__(spec, device, Settings())
        self._config = config
        self._processor = processor

    def load(self) -> None:
        self.use(
            build_model(self.spec.model_class, self._config, self.device, self.dtype, self.attention), self._processor
        )


# --- inputs ------------------------------------------------------------------------------------


def synthetic_page(seed: int, size: tuple[int, int] = A4_150DPI) -> bytes:
    """A white A4 page with a heading, paragraphs of word-like text and a ruled table, as PNG."""
    rng = random.Random(seed)
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    body, heading = ImageFont.load_default(size=22), ImageFont.load_default(size=40)

    def words(count: int) -> str:
        return " ".join(
            "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10))) for _ in range(count)
        )

    margin, y = 110, 120
    draw.text((margin, y), words(4).title(), font=heading, fill="black")
    y += 90
    while y < height - 160:
        if rng.random() < 0.12 and y < height - 500:  # a table
            rows, cols = rng.randint(4, 8), rng.randint(3, 5)
            cell_w, cell_h = (width - 2 * margin) // cols, 36
            for r in range(rows + 1):
                draw.line((margin, y + r * cell_h, width - margin, y + r * cell_h), fill="black", width=2)
            for c in range(cols + 1):
                draw.line((margin + c * cell_w, y, margin + c * cell_w, y + rows * cell_h), fill="black", width=2)
            for r in range(rows):
                for c in range(cols):
                    draw.text((margin + c * cell_w + 8, y + r * cell_h + 6), words(2), font=body, fill="black")
            y += rows * cell_h + 40
            continue
        for _ in range(rng.randint(3, 9)):  # a paragraph
            line = words(rng.randint(8, 14))
            while draw.textlength(line, font=body) > width - 2 * margin:
                line = line.rsplit(" ", 1)[0]
            draw.text((margin, y), line, font=body, fill=(20, 20, 20))
            y += 32
        y += 24
    draw.text((width // 2 - 10, height - 90), str(seed + 1), font=body, fill="black")
    return encode_png(image)


def page_inputs(count: int) -> list[EmbedInput]:
    return [EmbedInput("image", image=synthetic_page(seed)) for seed in range(count)]


def query_inputs() -> list[EmbedInput]:
    return [EmbedInput("text", text=text, input_type="query") for text in QUERIES]


# --- timing ------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_times(fn: Callable[[], object], device: torch.device, runs: int) -> list[float]:
    """Seconds per call of `fn`: CUDA events on a GPU, the wall clock elsewhere."""
    times = []
    synchronize(device)
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    return times


def wall_times(fn: Callable[[], object], device: torch.device, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        synchronize(device)
        started = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return times


def matmul_ceiling(device: torch.device, dtype: torch.dtype, size: int, runs: int) -> float:
    """TFLOP/s of a loop of `size`^3 matmuls in `dtype`: the device's dense ceiling in practice."""
    generator = torch.Generator(device=device).manual_seed(SEED)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    out = torch.empty(size, size, device=device, dtype=dtype)
    iterations = 20 if device.type == "cuda" else 2

    def loop() -> None:
        for _ in range(iterations):
            torch.mm(a, b, out=out)

    device_times(loop, device, 2)
    seconds = statistics.median(device_times(loop, device, runs))
    a = b = out = None  # let the device memory go (the closure still holds the names)
    return 2 * size**3 * iterations / seconds / 1e12


def count_flops(fn: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# --- one measurement ---------------------------------------------------------------------------


@dataclass
class Row:
    model: str
    config: str
    input: str  # "page" or "query"
    batch: int
    visual_tokens: float | None = None  # per page
    seq_len: int | None = None  # padded sequence length of the batch
    forward_per_s: float | None = None
    forward_ms: float | None = None
    embed_per_s: float | None = None
    e2e_per_s: float | None = None
    gflop_per_item: float | None = None
    tflops: float | None = None
    ceiling_share: float | None = None
    peak_gib: float | None = None
    status: str = "ok"


@dataclass
class Options:
    runs: int
    warmup: int
    e2e_items: int
    threads: int
    ceiling_tflops: float | None


def pipelined_rate(
    backend: ColpaliBackend, raw: Sequence[EmbedInput], batch_size: int, count: int, threads: int
) -> float:
    """Items/s with `prepare` in a thread pool running ahead of `embed`, batch after batch."""
    count = max(batch_size, count // batch_size * batch_size)
    items = [raw[i % len(raw)] for i in range(count)]
    synchronize(backend.device)
    with ThreadPoolExecutor(threads) as pool:
        started = time.perf_counter()
        futures = [pool.submit(backend.prepare, item) for item in items]
        for start in range(0, count, batch_size):
            backend.embed([future.result() for future in futures[start : start + batch_size]])
        elapsed = time.perf_counter() - started
    return count / elapsed


def measure(
    backend: ColpaliBackend,
    row: Row,
    prepared: Sequence[Prepared],
    raw: Sequence[EmbedInput],
    opts: Options,
    flops: dict[tuple[str, int], int],
) -> Row:
    device = backend.device
    batch = [prepared[i % len(prepared)] for i in range(row.batch)]
    if row.input == "page":
        row.visual_tokens = statistics.mean(p.n_tokens for p in batch)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    inputs = backend.model_inputs(batch)
    row.seq_len = int(inputs["input_ids"].shape[1])

    def forward() -> None:
        backend.model(**inputs)

    with torch.inference_mode():
        key = (row.input, row.batch)
        # FLOPs are counted on a warm-up run, where the model's ops are all visible to torch:
        # FlashAttention 2 and bitsandbytes kernels are not, so those reuse the SDPA count.
        if key not in flops and backend.attention in ("sdpa", "eager") and backend.spec.quantization == "none":
            flops[key] = count_flops(forward)
        device_times(forward, device, opts.warmup)
        seconds = statistics.median(device_times(forward, device, opts.runs))
    row.forward_ms = seconds * 1000
    row.forward_per_s = row.batch / seconds
    if key in flops:
        row.gflop_per_item = flops[key] / row.batch / 1e9
        row.tflops = flops[key] / seconds / 1e12
        if opts.ceiling_tflops:
            row.ceiling_share = row.tflops / opts.ceiling_tflops
    inputs = None  # let the device memory go (the closure still holds the name)
    backend.embed(batch)  # warm-up of the embed path
    row.embed_per_s = row.batch / statistics.median(wall_times(lambda: backend.embed(batch), device, opts.runs))
    row.e2e_per_s = pipelined_rate(backend, raw, row.batch, opts.e2e_items, opts.threads)
    if device.type == "cuda":
        row.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def measure_sweep(
    backend: ColpaliBackend,
    rows: list[Row],
    prepared: Sequence[Prepared],
    raw: Sequence[EmbedInput],
    opts: Options,
    flops: dict[tuple[str, int], int],
) -> list[Row]:
    """Measure each row (ascending batch sizes); after an OOM, skip the larger batches."""
    oom_at = None
    for row in rows:
        if oom_at is not None:
            row.status = f"skipped (OOM at {oom_at})"
            continue
        try:
            measure(backend, row, prepared, raw, opts, flops)
        except (torch.OutOfMemoryError, OutOfMemory) as exc:
            row.status = "OOM"
            oom_at = row.batch
            print(
                f"  {row.model} {row.config} {row.input} batch {row.batch}: out of memory ({str(exc)[:120]})",
                file=sys.stderr,
            )
        if backend.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
        print(table_line(row), file=sys.stderr, flush=True)  # a run cut short still shows what it measured
    return rows


# --- driver ------------------------------------------------------------------------------------


def configurations(device: torch.device, wanted: Sequence[str], dtype_name: str) -> tuple[list[tuple], dict[str, str]]:
    """[(label, attention, quantization)] that can run here, and why the others cannot."""
    runnable, skipped = [], {}
    has_flash = importlib.util.find_spec("flash_attn") is not None
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    for name in wanted:
        if name == "sdpa":
            runnable.append((f"{dtype_name} sdpa", "sdpa", "none"))
        elif name == "fa2":
            if device.type != "cuda" or not has_flash:
                skipped[name] = "needs CUDA and flash_attn"
            else:
                runnable.append((f"{dtype_name} fa2", "flash_attention_2", "none"))
        elif name == "nf4":
            if device.type != "cuda" or not has_bnb:
                skipped[name] = "needs CUDA and bitsandbytes"
            else:
                attention = resolve_attention("auto", device)
                runnable.append((f"nf4 {'fa2' if attention == 'flash_attention_2' else attention}", attention, "4bit"))
    return runnable, skipped


def release(backend: ColpaliBackend | None) -> None:
    if backend is not None and hasattr(backend, "model"):
        del backend.model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_model(name: str, args, opts: Options, configs: list[tuple]) -> tuple[dict, list[Row]]:
    device = torch.device(args.device)
    config, processor = tiny_size(name, args.tiny_dir) if args.tiny else full_size(name)
    spec = ModelSpec(
        name=name,
        backend="colpali",
        path="(built in memory)",
        device=args.device,
        dtype=args.dtype,
        model_class=MODEL_CLASSES[name],
        max_num_visual_tokens=args.max_visual_tokens,
        modalities=["text", "image"],
    )
    raw_pages, raw_queries = page_inputs(args.pages), query_inputs()
    summary: dict = {"model": name, "tiny": args.tiny}
    rows: list[Row] = []
    flops: dict[tuple[str, int], int] = {}
    checkpoint = None
    try:
        for label, attention, quantization in configs:
            run_spec = spec.model_copy(update={"attention": attention, "quantization": quantization})
            started = time.perf_counter()
            backend = None
            try:
                if quantization == "none":
                    backend = InMemoryBackend(run_spec, args.device, config, processor)
                else:  # bitsandbytes quantizes while loading: save the random model once, load it as a worker does
                    if checkpoint is None:
                        checkpoint = tempfile.TemporaryDirectory(prefix=f"bench-{name}-", dir=args.workdir)
                        write_checkpoint(spec, args.device, config, processor, Path(checkpoint.name))
                    backend = ColpaliBackend(
                        run_spec.model_copy(update={"path": checkpoint.name}), args.device, Settings()
                    )
                backend.load()
                synchronize(device)
                print(f"{name} {label}: loaded in {time.perf_counter() - started:.1f} s", file=sys.stderr)
                if "params" not in summary:
                    summary["params"] = count_params(backend.model)
                    summary.update(measure_prepare(backend, raw_pages, raw_queries, args.prepare_runs))
                prepared_pages = [backend.prepare(item) for item in raw_pages]
                prepared_queries = [backend.prepare(item) for item in raw_queries]
                page_rows = [Row(name, label, "page", b) for b in sorted(args.batch_sizes)]
                query_rows = [Row(name, label, "query", b) for b in sorted(args.query_batch_sizes)]
                rows += measure_sweep(backend, page_rows, prepared_pages, raw_pages, opts, flops)
                rows += measure_sweep(backend, query_rows, prepared_queries, raw_queries, opts, flops)
            except (torch.OutOfMemoryError, OutOfMemory) as exc:
                print(f"{name} {label}: out of memory while loading ({str(exc)[:120]})", file=sys.stderr)
                rows.append(Row(name, label, "page", 0, status="OOM while loading"))
            except Exception as exc:  # one configuration failing (a kernel, a package) must not lose the others
                traceback.print_exc()
                rows.append(Row(name, label, "page", 0, status=f"failed: {type(exc).__name__}: {str(exc)[:80]}"))
            finally:
                release(backend)
    finally:
        if checkpoint is not None:
            checkpoint.cleanup()
    page_flops = [flops[k] / k[1] for k in flops if k[0] == "page"]
    summary["gflop_per_page"] = page_flops[0] / 1e9 if page_flops else None
    return summary, rows


def write_checkpoint(spec: ModelSpec, device: str, config, processor, out: Path) -> None:
    """Save the random bf16 model and its processor, for a run that must go through `from_pretrained`."""
    source = InMemoryBackend(spec.model_copy(update={"attention": "sdpa"}), device, config, processor)
    try:
        source.load()
        source.model.save_pretrained(out)
        source.processor.save_pretrained(out)
    finally:
        release(source)


def measure_prepare(
    backend: ColpaliBackend, pages: Sequence[EmbedInput], queries: Sequence[EmbedInput], runs: int
) -> dict:
    """`prepare` rates on one thread (PNG decode + processor for pages), and the token counts."""
    backend.prepare(pages[0])  # warm-up
    page_s = [
        wall_times(lambda item=item: backend.prepare(item), torch.device("cpu"), 1)[0]
        for _ in range(runs)
        for item in pages
    ]
    query_s = [
        wall_times(lambda item=item: backend.prepare(item), torch.device("cpu"), 1)[0]
        for _ in range(runs)
        for item in queries
    ]
    page = backend.prepare(pages[0])
    return {
        "visual_tokens_per_page": page.n_tokens,
        "page_seq_len": int(page.payload[1]["input_ids"].shape[1]),
        "query_tokens_mean": statistics.mean(backend.prepare(q).n_tokens for q in queries),
        "prepare_pages_per_s": 1 / statistics.median(page_s),
        "prepare_queries_per_s": 1 / statistics.median(query_s),
    }


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if value == 0 or abs(value) >= 10 ** (digits - 1):
        return f"{value:.0f}"
    return f"{value:.{max(digits - 1 - math.floor(math.log10(abs(value))), 0)}f}"


def markdown(meta: dict, summaries: list[dict], rows: list[Row]) -> str:
    lines = [
        f"Device: {meta['device_name']} ({meta['device']}), torch {meta['torch']}, "
        f"transformers {meta['transformers']}, dtype {meta['dtype']}{', tiny models' if meta['tiny'] else ''}.",
        f"Matmul ceiling: {fmt(meta['ceiling_tflops'])} TFLOP/s "
        f"({meta['dtype']} {meta['matmul_size']}^3 loop, median).",
    ]
    if meta["skipped_configs"]:
        lines.append("Not run: " + "; ".join(f"{k} ({v})" for k, v in meta["skipped_configs"].items()) + ".")
    lines += [
        "",
        "| model | params | visual tokens/page | page seq len | query tokens | GFLOP/page | prepare pages/s (1 thread) "
        "| prepare queries/s (1 thread) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s['model']} | {fmt(s['params'] / 1e6 if 'params' in s else None)} M "
            f"| {s.get('visual_tokens_per_page', '-')} "
            f"| {s.get('page_seq_len', '-')} | {fmt(s.get('query_tokens_mean'))} | {fmt(s.get('gflop_per_page'))} "
            f"| {fmt(s.get('prepare_pages_per_s'))} | {fmt(s.get('prepare_queries_per_s'))} |"
        )
    lines += [
        "",
        "| model | config | input | batch | seq len | forward items/s | forward ms/batch | embed items/s "
        "| e2e items/s | TFLOP/s | % of ceiling | peak GiB | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [table_line(r) for r in rows]
    return "\n".join(lines)


def table_line(r: Row) -> str:
    share = None if r.ceiling_share is None else 100 * r.ceiling_share
    return (
        f"| {r.model} | {r.config} | {r.input} | {r.batch} | {r.seq_len or '-'} | {fmt(r.forward_per_s)} "
        f"| {fmt(r.forward_ms)} | {fmt(r.embed_per_s)} | {fmt(r.e2e_per_s)} | {fmt(r.tflops)} | {fmt(share)} "
        f"| {fmt(r.peak_gib)} | {r.status} |"
    )


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--models", nargs="+", choices=sorted(MODEL_CLASSES), default=["colqwen2_5", "colmodernvbert"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, help="page batch sizes (default 1 2 4 8 16 32)")
    parser.add_argument("--query-batch-sizes", nargs="+", type=int, default=[1, 64])
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=["sdpa", "fa2", "nf4"],
        default=["sdpa", "fa2", "nf4"],
        help="bf16 + SDPA, bf16 + FlashAttention 2, NF4 4-bit (each where it can run)",
    )
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--max-visual-tokens", type=int, help="visual tokens per page (default 768; tiny: 64)")
    parser.add_argument("--tiny", action="store_true", help="tiny checkpoints of make_tiny_models.py (smoke test)")
    parser.add_argument(
        "--tiny-dir", type=Path, default=Path(os.environ.get("EMBEDQ_TINY_MODELS_DIR", ROOT / "tiny-models"))
    )
    parser.add_argument("--quick", action="store_true", help="fewer runs and batch sizes")
    parser.add_argument("--runs", type=int, help="timed runs per figure, median reported (default 5; quick 3)")
    parser.add_argument("--matmul-size", type=int, help="side of the ceiling matmul (default 8192; CPU 1024)")
    parser.add_argument("--prepare-threads", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--workdir", type=Path, help="where the NF4 run writes its temporary checkpoint")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.batch_sizes is None:
        args.batch_sizes = [1, 4, 16] if args.quick else [1, 2, 4, 8, 16, 32]
    if args.max_visual_tokens is None:
        args.max_visual_tokens = 64 if args.tiny else 768
    if args.runs is None:
        args.runs = 3 if args.quick else 5
    cpu = torch.device(args.device).type == "cpu"
    if args.matmul_size is None:
        args.matmul_size = 512 if args.tiny and cpu else 1024 if cpu else 8192
    args.pages = 4
    args.prepare_runs = 1 if args.quick else 2
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.tiny and device.type == "cpu":
        # Tiny models gain nothing from intra-op threads, and on a busy machine every OpenMP
        # barrier waits for a preempted thread: one thread keeps the smoke run steady.
        torch.set_num_threads(1)
    ceiling = matmul_ceiling(device, dtype, args.matmul_size, args.runs)
    opts = Options(
        runs=args.runs,
        warmup=1 if args.quick else 2,
        e2e_items=8 if args.quick else 16,
        threads=args.prepare_threads,
        ceiling_tflops=ceiling,
    )
    configs, skipped = configurations(device, args.configs, args.dtype)
    import transformers

    meta = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "flash_attn": package_version("flash_attn"),
        "bitsandbytes": package_version("bitsandbytes"),
        "dtype": args.dtype,
        "tiny": args.tiny,
        "max_visual_tokens": args.max_visual_tokens,
        "page_size": list(A4_150DPI),
        "ceiling_tflops": ceiling,
        "matmul_size": args.matmul_size,
        "runs": args.runs,
        "configs": [c[0] for c in configs],
        "skipped_configs": skipped,
    }
    print(f"matmul ceiling {fmt(ceiling)} TFLOP/s; running {meta['configs']}; not {skipped}", file=sys.stderr)
    summaries, rows = [], []
    for name in args.models:
        summary, model_rows = bench_model(name, args, opts, configs)
        summaries.append(summary)
        rows += model_rows
        result = {"meta": meta, "models": summaries, "rows": [asdict(r) for r in rows]}
        if args.json:  # after each model, so a run cut short keeps what it measured
            args.json.write_text(json.dumps(result, indent=2))
    print(markdown(meta, summaries, rows))
    return result


if __name__ == "__main__":
    main()
