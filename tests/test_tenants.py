"""API keys on every route and tenants, against a real API process, Redis, Milvus Lite and MiniLM
worker: every route of the OpenAPI schema but health refuses a request without a key, before its
body is read; a key list that would leave the API open does not start; another tenant's collections
and jobs are not found, an admin sees them all, and plain keys share one tenant."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest
from pydantic import ValidationError

from common.launch import procs
from common.settings import Settings
from common.tenants import KeyConfigError, KeyRing, Principal

from .conftest import MINILM, ROOT
from .stack import start_api

KEYS = {"alice": "alice-key-0123", "bob": "bob-key-4567", "root": "root-key-89ab", "": "shared-key-cdef"}
OPEN_PATHS = {"/healthz", "/health/live", "/health/ready"}


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


@pytest.fixture(scope="module")
def tenants_api(stack_env, logs, minilm_worker, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "api-keys"
    key_file.write_text(
        "# one a line\n" + "".join(f"{name}:{key}\n" for name, key in KEYS.items() if name) + "\n" + KEYS[""] + "\n"
    )
    env = {**stack_env, "EMBEDQ_API_KEYS_FILE": str(key_file), "EMBEDQ_ADMIN_KEYS": "root"}
    proc, base = start_api(env, logs / "api-tenants.log")
    yield base
    procs.stop([proc])


def _settings(**values) -> Settings:
    return Settings(_env_file=None, **values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"api_keys": "a:"}, "tenant 'a' has an empty key"),
        ({"api_keys": ":secret"}, "tenant name ''"),
        ({"api_keys": "a:k1,b:k1"}, "listed twice"),
        ({"api_keys": "a:k1", "admin_keys": "b"}, "EMBEDQ_ADMIN_KEYS names ['b']"),
        ({"api_keys_file": "/nonexistent/api-keys"}, "cannot be read"),
    ],
)
def test_unusable_key_lists_are_refused(values, message):
    with pytest.raises(KeyConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        KeyRing.from_settings(_settings(**values))


@pytest.mark.parametrize("listed", [",", "a, ,b", "key,"])
def test_a_blank_entry_is_refused(listed):
    with pytest.raises(ValidationError, match="is empty"):
        _settings(api_keys=listed)


def test_an_empty_key_file_is_refused(tmp_path):
    (tmp_path / "keys").write_text("# nothing yet\n\n")
    with pytest.raises(KeyConfigError, match="holds no key"):
        KeyRing.from_settings(_settings(api_keys_file=tmp_path / "keys"))


def test_the_ring_knows_each_key_and_nothing_else():
    ring = KeyRing.from_settings(_settings(api_keys="plain-key, alice:a-key:with-colon", admin_keys="alice"))
    assert ring.principal("Bearer plain-key") == Principal("", admin=False)
    assert ring.principal("Bearer a-key:with-colon") == Principal("alice", admin=True)
    assert ring.principal("bearer  plain-key ") == Principal("")
    for refused in ["", "Bearer", "Bearer wrong", "Basic plain-key", "Bearer plain-key2", "Bearer alice:a-key"]:
        assert ring.principal(refused) is None, refused
    assert KeyRing.from_settings(_settings()).principal("") == Principal("", admin=True)  # no keys: open


def test_the_api_does_not_start_with_an_unusable_key_list(stack_env):
    env = {**stack_env, "EMBEDQ_API_KEYS": "alice:"}
    done = subprocess.run(
        [sys.executable, "-m", "common.launch.cli", "api", "--port", str(procs.free_port())],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "refusing to start the API" in done.stderr and "tenant 'alice' has an empty key" in done.stderr


def test_every_route_but_health_needs_a_key(tenants_api):
    base = tenants_api
    assert httpx.get(f"{base}/openapi.json").status_code == 401
    assert httpx.get(f"{base}/docs").status_code == 401
    schema = httpx.get(f"{base}/openapi.json", headers=auth("alice")).json()
    checked = 0
    for path, operations in schema["paths"].items():
        url = base + path.replace("{", "").replace("}", "")  # any value: the key is checked first
        for method in operations:
            for headers in ({}, {"Authorization": "Bearer not-a-key"}, {"Authorization": f"Basic {KEYS['alice']}"}):
                answer = httpx.request(method, url, headers=headers, json={"model": MINILM, "input": "x"})
                if path in OPEN_PATHS:
                    assert answer.status_code in (200, 503), (method, path)
                else:
                    assert answer.status_code == 401, (method, path, answer.status_code)
                    assert answer.headers["www-authenticate"] == "Bearer"
                    assert answer.json()["error"]["code"] == "invalid_api_key"
                checked += 1
    assert checked > 3 * 15
    assert httpx.get(f"{base}/metrics").status_code == 401
    assert httpx.get(f"{base}/metrics", headers=auth("bob")).status_code == 200


def test_an_unauthenticated_upload_is_refused_before_its_body(tenants_api):
    host, port = tenants_api.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/collections/any/documents HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 62914560\r\n\r\n"
        )
        started = time.monotonic()
        answer = sock.recv(4096)  # not one byte of the 60 MiB body was sent
    assert answer.startswith(b"HTTP/1.1 401"), answer[:80]
    assert time.monotonic() - started < 5


def _create(base: str, tenant: str, name: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/collections", json={"name": name, "model": MINILM}, headers=auth(tenant), timeout=60)


def _names(base: str, tenant: str) -> set[str]:
    answer = httpx.get(f"{base}/v1/collections", headers=auth(tenant))
    assert answer.status_code == 200
    return {c["name"] for c in answer.json()["data"]}


def test_tenants_see_only_their_own_collections_and_jobs(tenants_api):
    base = tenants_api
    for tenant, name in [("alice", "alice_notes"), ("bob", "bob_notes"), ("", "shared_notes")]:
        created = _create(base, tenant, name)
        assert created.status_code == 201, created.text
        assert created.json()["tenant"] == tenant
    assert _names(base, "alice") >= {"alice_notes"} and not _names(base, "alice") & {"bob_notes", "shared_notes"}
    assert not _names(base, "bob") & {"alice_notes", "shared_notes"}
    assert "shared_notes" in _names(base, "") and not _names(base, "") & {"alice_notes", "bob_notes"}
    assert _names(base, "root") >= {"alice_notes", "bob_notes", "shared_notes"}  # an admin sees all

    upload = httpx.post(
        f"{base}/v1/collections/alice_notes/documents",
        files=[("files", ("a.txt", b"alice's private note", "text/plain"))],
        headers=auth("alice"),
    )
    assert upload.status_code == 202, upload.text
    job = upload.json()["id"]
    assert upload.json()["tenant"] == "alice"

    url = f"{base}/v1/collections/alice_notes"
    foreign = [
        httpx.get(url, headers=auth("bob")),
        httpx.get(url, headers=auth("")),
        httpx.delete(url, headers=auth("bob")),
        httpx.delete(f"{url}/documents/d1", headers=auth("bob")),
        httpx.post(f"{url}/search", json={"query": "note"}, headers=auth("bob")),
        httpx.post(f"{url}/documents", files=[("files", ("b.txt", b"bob's", "text/plain"))], headers=auth("bob")),
        httpx.get(f"{base}/v1/jobs/{job}", headers=auth("bob")),
        httpx.delete(f"{base}/v1/jobs/{job}", headers=auth("bob")),
        httpx.get(f"{base}/v1/jobs/{job}/events", headers=auth("bob")),
    ]
    for answer in foreign:
        assert answer.status_code == 404, (answer.request.method, answer.request.url, answer.status_code)
        assert "alice" not in answer.text.replace("alice_notes", "")
    # Names are one namespace: another tenant cannot take one that is in use.
    assert _create(base, "bob", "alice_notes").status_code == 400

    assert httpx.get(url, headers=auth("alice")).json()["tenant"] == "alice"
    assert httpx.get(f"{base}/v1/jobs/{job}", headers=auth("root")).json()["tenant"] == "alice"
    assert httpx.get(f"{base}/v1/jobs/{job}", headers=auth("alice")).status_code == 200
    searched = httpx.post(f"{url}/search", json={"query": "note"}, headers=auth("root"), timeout=60)
    assert searched.status_code == 200, searched.text
    for tenant, name in [("alice", "alice_notes"), ("bob", "bob_notes"), ("root", "shared_notes")]:
        assert httpx.delete(f"{base}/v1/collections/{name}", headers=auth(tenant)).status_code == 200
