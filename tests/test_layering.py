"""House rules that keep the front end light and the routing right."""

from __future__ import annotations

import subprocess
import sys

from common.celery_app import create_celery_app
from common.queues import route_task
from common.settings import Settings


def test_api_imports_no_torch_or_model_code():
    code = (
        "import sys, api.main; api.main.create_app(); "
        "bad = [m for m in ('torch', 'transformers', 'colpali_engine', 'workers') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_workers_import_no_fastapi():
    code = "import sys, workers.tasks, workers.search, workers.main; print('fastapi' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_every_task_has_a_route():
    import workers.search  # noqa: F401  (registers the search task)
    import workers.tasks  # noqa: F401  (registers the tasks)

    app = workers.tasks.app
    ours = [name for name in app.tasks if name.startswith("embedq.")]
    assert ours
    for name in ours:
        route = route_task(name, (), {"model": "m", "modality": "text"}, {})
        assert route and route["queue"] != app.conf.task_default_queue, name


def test_queue_names_and_delivery_semantics():
    app = create_celery_app(Settings(redis_url="redis://127.0.0.1:1/0", visibility_timeout_s=7))
    assert route_task("embedq.embed", (), {"model": "m", "modality": "image"}, {}) == {"queue": "embed.m.image"}
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert app.conf.broker_transport_options["visibility_timeout"] == 7
    assert app.conf.task_serializer == "msgpack"
