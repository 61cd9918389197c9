"""scripts/bench_gpu.py: its smoke mode (tiny models on the CPU) runs end to end and reports every
model and batch size; the full-size architectures it builds have the published parameter counts
(built on the meta device: no weights, no memory) and their processors give the expected visual
tokens for an A4 page; an out-of-memory batch is reported and the larger ones skipped."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import pytest
import torch

from common.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench_gpu.py"


@lru_cache
def bench() -> ModuleType:
    """`scripts/bench_gpu.py` as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def table_rows(stdout: str) -> list[dict[str, str]]:
    """The rows of the per-batch Markdown table, as {column: cell}."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    header_at = next(i for i, line in enumerate(lines) if line.startswith("| model | config |"))
    header = [cell.strip() for cell in lines[header_at].strip("|").split("|")]
    rows = []
    for line in lines[header_at + 2 :]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows.append(dict(zip(header, cells)))
    return rows


def test_tiny_smoke_run_reports_every_model_and_batch_size(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--tiny", "--device", "cpu", "--quick", "--batch-sizes", "1", "2", "--query-batch-sizes", "1", "4"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = table_rows(proc.stdout)
    for model in ("colqwen2_5", "colmodernvbert"):
        for kind, sizes in (("page", ["1", "2"]), ("query", ["1", "4"])):
            for size in sizes:
                [row] = [r for r in rows if (r["model"], r["input"], r["batch"]) == (model, kind, size)]
                assert row["config"] == "bf16 sdpa" and row["status"] == "ok", row
                for column in ("forward items/s", "embed items/s", "e2e items/s", "TFLOP/s"):
                    assert float(row[column]) > 0, (column, row)
    result = json.loads(out.read_text())
    assert result["meta"]["ceiling_tflops"] > 0
    assert result["meta"]["skipped_configs"].keys() == {"fa2", "nf4"}  # no CUDA here
    assert {s["model"] for s in result["models"]} == {"colqwen2_5", "colmodernvbert"}
    for summary in result["models"]:
        assert 0 < summary["visual_tokens_per_page"] <= 64 and summary["gflop_per_page"] > 0
    assert len(result["rows"]) == len(rows) == 8


@pytest.mark.parametrize(
    ("name", "params", "visual_tokens"),
    [
        # Qwen2.5-VL-3B: 3,754,622,976 (language model 3,085,938,688 with tied embeddings, vision
        # tower 668,684,288) + ColQwen's 2048x128 projection with bias.
        ("colqwen2_5", 3_754_885_248, 736),  # 1240x1754 -> 644x896 px -> 23x32 merged patches
        # ModernBERT-base-size text 149.0M + SigLIP-base-512 vision 93.5M + connector 9.4M + projection.
        ("colmodernvbert", 252_100_736, 640),  # longest edge 1536 -> 3x3 tiles + global, 64 tokens each
    ],
)
def test_full_size_architectures_on_meta_device(name, params, visual_tokens):
    module = bench()
    config, processor = module.full_size(name)
    model = module.build_model(module.MODEL_CLASSES[name], config, "meta", torch.bfloat16, "sdpa")
    assert module.count_params(model) == params
    assert next(model.parameters()).device.type == "meta" and model.dtype == torch.bfloat16

    spec = module.ModelSpec(name=name, backend="colpali", path="-", model_class=module.MODEL_CLASSES[name])
    backend = module.ColpaliBackend(spec, "cpu", Settings())
    backend.use(model, processor)
    page = backend.prepare(module.page_inputs(1)[0])
    assert page.n_tokens == visual_tokens


class OomAbove:
    """Stands in for the model: a CUDA out-of-memory error above `limit` inputs a batch (a mock,
    since no GPU runs here); smaller batches go to the real tiny model."""

    def __init__(self, model, limit: int):
        self.model, self.limit = model, limit

    def __call__(self, **inputs):
        if inputs["input_ids"].shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.model(**inputs)


def test_out_of_memory_batch_is_reported_and_larger_ones_skipped():
    module = bench()
    name = "colmodernvbert"
    config, processor = module.tiny_size(name, module.parse_args(["--tiny"]).tiny_dir)
    model_class = module.MODEL_CLASSES[name]
    spec = module.ModelSpec(name=name, backend="colpali", path="-", dtype="fp32", model_class=model_class)
    backend = module.InMemoryBackend(
        spec.model_copy(update={"attention": "sdpa", "max_num_visual_tokens": 64}), "cpu", config, processor
    )
    backend.load()
    backend.model = OomAbove(backend.model, limit=2)
    raw = module.query_inputs()[:4]
    prepared = [backend.prepare(item) for item in raw]
    opts = module.Options(runs=1, warmup=1, e2e_items=4, threads=2, ceiling_tflops=None)
    rows = [module.Row(name, "fp32 sdpa", "query", b) for b in (1, 2, 4, 8)]
    module.measure_sweep(backend, rows, prepared, raw, opts, {})
    assert [r.status for r in rows] == ["ok", "ok", "OOM", "skipped (OOM at 4)"]
    assert rows[1].forward_per_s > 0 and rows[2].forward_per_s is None
