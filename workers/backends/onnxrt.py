"""The text backend's ONNX Runtime engine (`engine: onnx`): the checkpoint exported to ONNX at its
first load (torch.onnx, fp32) and cached, so that later loads only open the file; a forward pass
takes the padded ids and attention mask and gives the last hidden state, on the CPU.

The export is cached beside the model when its directory can be written, else under
`var_dir/onnx`, in a folder named by a fingerprint of the checkpoint's files (new weights, new
export). It is written to a temporary folder and renamed into place: of two workers exporting at
once, the first rename wins and the other worker uses its export.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from transformers import AutoModel

log = logging.getLogger(__name__)

FILE = "model.onnx"
INPUTS = ("input_ids", "attention_mask")


def fingerprint(model_path: str) -> str:
    """Names, sizes and modification times of the checkpoint's files (a hub id: the id itself)."""
    digest = hashlib.sha1(model_path.encode())
    local = Path(model_path)
    if local.is_dir():
        for item in sorted(p for p in local.iterdir() if p.is_file()):
            stat = item.stat()
            digest.update(f"{item.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def export_locations(model_path: str, var_dir: Path) -> list[Path]:
    """Where the export of `model_path` may live, in the order they are tried."""
    key = fingerprint(model_path)
    local = Path(model_path)
    beside = [local / "embedq-onnx" / key] if local.is_dir() else []
    return [*beside, var_dir / "onnx" / f"{local.name}-{key}"]


class _LastHidden(torch.nn.Module):
    """The model with only the output the text backend pools (BERT's pooler head would run for nothing)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def export(model_path: str, folder: Path) -> None:
    """Write `model_path`'s fp32 ONNX graph, with dynamic batch and sequence sizes, into `folder`."""
    model = AutoModel.from_pretrained(model_path, dtype=torch.float32, attn_implementation="eager").eval()
    example = {
        "input_ids": torch.ones((2, 8), dtype=torch.long),
        "attention_mask": torch.ones((2, 8), dtype=torch.long),
    }
    shape = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
    program = torch.onnx.export(
        _LastHidden(model).eval(),
        (),
        kwargs=example,
        input_names=list(INPUTS),
        output_names=["last_hidden_state"],
        dynamic_shapes={name: shape for name in INPUTS},
        dynamo=True,
        verbose=False,
    )
    program.save(str(folder / FILE))


def publish(staged: Path, final: Path) -> None:
    """Rename the staged export into place; when another worker's is there already, keep that one."""
    try:
        staged.rename(final)
    except OSError:
        if not (final / FILE).exists():
            raise
        shutil.rmtree(staged, ignore_errors=True)


def cached_export(model_path: str, var_dir: Path) -> Path:
    """The ONNX file of `model_path`, exported now unless a cached one exists."""
    locations = export_locations(model_path, var_dir)
    for final in locations:
        if (final / FILE).exists():
            return final / FILE
    for final in locations:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            staged = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        except OSError as exc:  # not writable there (a model installed read-only): try the next place
            log.info("cannot cache an ONNX export in %s (%s)", final.parent, exc)
            continue
        try:
            started = time.perf_counter()
            export(model_path, staged)
            publish(staged, final)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        log.info("exported %s to ONNX in %.1fs: %s", model_path, time.perf_counter() - started, final)
        return final / FILE
    raise OSError(f"no writable place for the ONNX export of {model_path}: {[str(p.parent) for p in locations]}")


class OnnxForward:
    """One ONNX Runtime session on the CPU, with as many intra-op threads as the torch engine uses."""

    def __init__(self, model_path: str, var_dir: Path, threads: int):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.file = cached_export(model_path, var_dir)
        self.session = ort.InferenceSession(str(self.file), options, providers=["CPUExecutionProvider"])

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        [hidden] = self.session.run(None, feed)
        return torch.from_numpy(np.asarray(hidden, dtype=np.float32))
