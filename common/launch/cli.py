"""The `embedq` command line. Each command starts one kind of process, named by its import string,
so that this module imports neither the API nor the workers, and a process loads only its own."""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

import typer

app = typer.Typer(help="embedq: queue-driven embedding service.", no_args_is_help=True, add_completion=False)


# How the search worker runs (set before torch and NumPy load): its int8 scan uses every core, then
# Milvus Lite and gRPC need them for the rerank's read. OpenMP threads that spin-wait after the scan
# (libgomp's default) and OpenBLAS threads for the small rerank product took those cores: a search
# at 3k pages took 99 ms instead of 64.
SEARCH_WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_NUM_THREADS": "1"}


def _start(target: str, *args: object) -> None:
    """Call `module:function` with `args`."""
    module, _, function = target.partition(":")
    getattr(importlib.import_module(module), function)(*args)


def _worker_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Celery logs every task received and done at INFO, result included: too costly per request.
    logging.getLogger("celery").setLevel(logging.WARNING)


@app.command()
def up(flower: bool = typer.Option(False, "--flower", help="Also serve Flower on 127.0.0.1:5555.")) -> None:
    """Start the local stack (Redis, Milvus Lite, API, workers) in the foreground."""
    from .stack import run_stack

    raise typer.Exit(run_stack(flower))


@app.command()
def api(host: str | None = None, port: int | None = None) -> None:
    """Serve the HTTP API."""
    import uvicorn

    from ..settings import get_settings
    from ..tenants import KeyConfigError, KeyRing

    settings = get_settings()
    try:
        KeyRing.from_settings(settings)
    except KeyConfigError as exc:
        typer.echo(f"embedq: refusing to start the API: {exc}", err=True)
        raise typer.Exit(2) from None
    uvicorn.run(
        "api.main:create_app",
        factory=True,
        host=host or settings.host,
        port=port or settings.port,
        log_level="warning",
        access_log=False,
    )


@app.command()
def worker(
    model: str = typer.Option(..., help="A model name from models.yaml."),
    device: str | None = typer.Option(None, help="cpu, cuda:0, ...; default from models.yaml."),
    modality: list[str] | None = typer.Option(None, help="text and/or image; default: all the model serves."),
) -> None:
    """Run a GPU-pinned (or CPU) worker for one model."""
    _worker_logging()
    _start("workers.start:model_worker", model, device, modality)


@app.command("ingest-worker")
def ingest_worker() -> None:
    """Run the CPU worker that renders uploaded documents into pages and chunks."""
    _worker_logging()
    _start("workers.start:ingest_worker")


@app.command("search-worker")
def search_worker() -> None:
    """Run the worker that searches late-interaction collections (it holds their pages in memory)."""
    for name, value in SEARCH_WORKER_ENV.items():
        os.environ.setdefault(name, value)
    _worker_logging()
    _start("workers.start:search_worker")


@app.command()
def flower(
    address: str = typer.Option("127.0.0.1", help="Bind address; Flower's API goes without auth only on loopback."),
    port: int = typer.Option(5555),
) -> None:
    """Serve Flower (workers, queues, tasks) for embedq's Celery app."""
    from .flower import run_flower

    run_flower(address, port)


@app.command("merge-adapters")
def merge_adapters(
    base: Path = typer.Option(..., help="The base late-interaction checkpoint (a directory)."),
    adapter: Path = typer.Option(..., help="The PEFT LoRA adapter directory."),
    out: Path = typer.Option(..., help="Where to save the merged checkpoint."),
    dtype: str = typer.Option("auto", help="bf16, fp16, fp32, or auto (the checkpoint's own)."),
) -> None:
    """Merge a LoRA adapter into its base model; serve the result like any checkpoint."""
    _start("workers.merge_adapters:merge_adapters", base, adapter, out, dtype)
    typer.echo(f"merged checkpoint saved to {out}")


@app.command()
def models() -> None:
    """List the served models."""
    from ..registry import load_registry
    from ..settings import get_settings

    for spec in load_registry(get_settings().models_file):
        typer.echo(f"{spec.name}\t{spec.backend}\t{','.join(spec.modalities)}\t{spec.path}")


if __name__ == "__main__":
    app()
