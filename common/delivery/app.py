"""The one Celery app of embedq, shared by the API (to send), workers (to run) and other backends.

Tasks are defined in the worker packages (as shared tasks, bound to the app the process made);
this module only configures broker, result backend, routing and delivery semantics, so importing
it never pulls in torch. Each process makes its app once, where it makes its other clients.
"""

from __future__ import annotations

from celery import Celery

from ..contract import route_task
from ..settings import Settings
from . import transport

transport.register()


def create_celery_app(settings: Settings) -> Celery:
    app = Celery("embedq", broker=settings.redis_url, backend=settings.redis_url)
    app.conf.update(
        # msgpack carries vectors as bytes; JSON would need float lists or base64.
        task_serializer="msgpack",
        result_serializer="msgpack",
        accept_content=["msgpack", "json"],
        result_accept_content=["msgpack", "json"],
        task_routes=(route_task,),
        task_default_queue="embedq.default",
        # A task is acknowledged only once done; a SIGKILLed worker's unacknowledged tasks go back
        # to the queue after the visibility timeout, and another worker runs them.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "socket_connect_timeout": settings.redis_connect_timeout_s,
            "socket_timeout": settings.redis_socket_timeout_s,
            "health_check_interval": 15,
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
            # A worker killed inside a restore scan leaves its lock behind; kombu's default 300 s
            # would stall every other worker's restores that long.
            "unacked_mutex_expire": 30,
            # Queues are read in the order the worker lists them: text before image.
            "queue_order_strategy": "priority",
        },
        result_expires=settings.result_expires_s,
        # Job tasks keep no result (their work is counted on the job), but a failure is kept, so
        # the job watch can count the work of a task that raised before it reported.
        task_store_errors_even_if_ignored=True,
        redis_socket_connect_timeout=settings.redis_connect_timeout_s,
        redis_socket_timeout=settings.redis_socket_timeout_s,
        redis_retry_on_timeout=True,
        # A worker keeps trying to reach a Redis that restarts, however long it takes.
        broker_connection_retry=True,
        broker_connection_max_retries=None,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=settings.task_events,
        task_send_sent_event=settings.task_events,
    )
    return app
