"""House rules that keep the layers apart, the front end light and the routing right.

Layers, bottom up: `common` (shared by every process), then `api` and `workers` beside each other.
No module imports a layer above its own or beside it, and no process loads what only another needs.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from common.contract import route_task
from common.delivery.app import create_celery_app
from common.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"common": {"api", "workers"}, "api": {"workers"}, "workers": {"api", "fastapi", "starlette"}}


def imported_modules(path: Path) -> set[str]:
    """Every absolute module a file imports (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join([*base, node.module] if node.module else base))
            else:
                found.add(node.module)
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_import_runs_up_or_across_the_layers(layer):
    offences = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in sorted((ROOT / layer).rglob("*.py"))
        for module in imported_modules(path)
        if module.split(".")[0] in FORBIDDEN[layer]
    ]
    assert not offences


def test_the_scan_sees_relative_imports():
    assert "common.delivery.lost" in imported_modules(ROOT / "common" / "jobs" / "ledger.py")
    assert "common.errors" in imported_modules(ROOT / "common" / "inputs" / "kinds.py")


def loaded(code: str, watched: tuple[str, ...]) -> list[str]:
    """Which of `watched` a fresh interpreter has loaded after running `code`."""
    check = f"{code}; import sys; print(','.join(m for m in {watched!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True, cwd=ROOT)
    return [m for m in out.stdout.strip().split(",") if m]


def test_the_api_process_loads_no_model_or_document_code():
    watched = ("torch", "transformers", "colpali_engine", "onnxruntime", "onnx", "pypdfium2", "workers")
    assert loaded("import api.main; api.main.create_app()", watched) == []


def test_model_workers_load_no_document_code_or_web_framework():
    assert loaded("import workers.start, workers.model.tasks", ("pypdfium2", "fastapi")) == []


def test_the_command_line_loads_no_process_code():
    watched = ("api", "workers", "torch", "fastapi", "celery")
    assert loaded("import common.launch.cli", watched) == []


def test_every_task_has_a_route():
    import workers.ingest.tasks
    import workers.model.tasks
    import workers.search.tasks  # noqa: F401

    app = create_celery_app(Settings(redis_url="redis://127.0.0.1:1/0"))
    app.finalize()
    ours = sorted(name for name in app.tasks if name.startswith("embedq."))
    assert ours == [
        "embedq.embed",
        "embedq.index_chunks",
        "embedq.index_pages",
        "embedq.ingest_file",
        "embedq.search_pages",
        "embedq.tokenize",
    ]
    for name in ours:
        route = route_task(name, (), {"model": "m", "modality": "text"}, {})
        assert route and route["queue"] != app.conf.task_default_queue, name


def test_queue_names_and_delivery_semantics():
    app = create_celery_app(Settings(redis_url="redis://127.0.0.1:1/0", visibility_timeout_s=7))
    assert route_task("embedq.embed", (), {"model": "m", "modality": "image"}, {}) == {"queue": "embed.m.image"}
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert app.conf.broker_transport_options["visibility_timeout"] == 7
    assert app.conf.task_serializer == "msgpack"
