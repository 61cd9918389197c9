"""Kept page images and document records: the blob store on a local folder and on a real S3
endpoint (moto's server, through s3fs), and the API routes that list documents and serve page
images (ETag and 304, keys, tenants, the console's session cookie, deletes), against a real API
process, Redis and Milvus Lite. Ingestion writing them, and the console showing them:
tests/test_console.py."""

from __future__ import annotations

import io
import logging
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from common.inputs.images import page_views
from common.launch import procs
from common.settings import Settings
from common.store.blobs import BlobStore, page_image_key
from common.store.milvus import MilvusStore, PageRecord

from .stack import start_api

KEYS = {"alice": "alice-key-0123", "bob": "bob-key-4567"}
DIM = 8


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def test_a_page_is_kept_full_size_and_as_a_thumbnail():
    page = Image.new("RGB", (1000, 1414), (200, 30, 30))
    views = page_views(page, quality=80, thumb_width=256)
    full, thumb = (Image.open(io.BytesIO(views[name])) for name in ("full", "thumb"))
    assert (full.format, full.size) == ("JPEG", (1000, 1414))
    assert (thumb.format, thumb.size) == ("JPEG", (256, 362))
    assert len(views["thumb"]) < len(views["full"])


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server (a real HTTP endpoint), reached through the AWS variables s3fs reads."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as env:
        for name, value in {
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            env.setenv(name, value)
        yield
    server.stop()


@pytest.fixture(params=["local", "s3"])
def blobs(request, tmp_path):
    if request.param == "local":
        return BlobStore(str(tmp_path / "blobs"))
    request.getfixturevalue("s3_endpoint")
    return BlobStore(f"s3://embedq-test-{tmp_path.name.lower().replace('_', '-')[-20:]}/blobs")  # bucket made here


def test_documents_are_kept_listed_and_deleted(blobs):
    for doc_id, created in (("b/2", 20), ("a 1", 10)):  # any character in a doc_id
        blobs.put_document(
            "reports", {"doc_id": doc_id, "filename": "f.pdf", "pages": 2, "metadata": {}, "created": created}
        )
        for page in (1, 2):
            blobs.put(page_image_key("reports", doc_id, page, "thumb"), f"{doc_id}:{page}".encode())
    blobs.put_document("other", {"doc_id": "a 1", "filename": "g.pdf", "pages": 1, "metadata": {}, "created": 5})
    blobs.put(page_image_key("other", "a 1", 1, "thumb"), b"other")
    blobs.put_document("reports", {"doc_id": "a 1", "filename": "f.pdf", "pages": 2, "metadata": {}, "created": 10})
    assert [d["doc_id"] for d in blobs.documents("reports")] == ["a 1", "b/2"]  # oldest first, written twice: once
    assert blobs.get(page_image_key("reports", "b/2", 2, "thumb")) == b"b/2:2"

    blobs.delete_document("reports", "a 1")
    assert [d["doc_id"] for d in blobs.documents("reports")] == ["b/2"]
    assert blobs.get(page_image_key("reports", "a 1", 1, "thumb")) is None
    assert blobs.get(page_image_key("other", "a 1", 1, "thumb")) == b"other"  # the same doc_id elsewhere stays

    blobs.delete_collection("reports")
    assert blobs.documents("reports") == [] and blobs.get(page_image_key("reports", "b/2", 1, "thumb")) is None
    assert [d["filename"] for d in blobs.documents("other")] == ["g.pdf"]


# The API's routes


@pytest.fixture(scope="module")
def images_api(stack_env, logs, tmp_path_factory):
    """An API with keys for two tenants, its blob store a folder the test writes to, and Milvus."""
    folder = tmp_path_factory.mktemp("page-images") / "blobs"
    env = {
        **stack_env,
        "EMBEDQ_API_KEYS": ",".join(f"{name}:{key}" for name, key in KEYS.items()),
        "EMBEDQ_BLOB_URI": str(folder),
    }
    proc, base = start_api(env, logs / "api-page-images.log")
    store = MilvusStore(stack_env["EMBEDQ_MILVUS_URI"])
    yield base, store, BlobStore(str(folder))
    store.close()
    procs.stop([proc])


@pytest.fixture
def alice_pages(images_api):
    """Alice's page collection with document 'd/1' of two pages, as ingestion leaves it."""
    _, store, blobs = images_api
    name = f"pages_{time.monotonic_ns()}"
    store.create_collection(name, "multivector", DIM, "colqwen2", tenant="alice")
    vectors = np.random.RandomState(0).randn(3, DIM).astype(np.float16)
    store.upsert_pages(name, [PageRecord("d/1", page, "q1.pdf", {"q": 1}, vectors) for page in (1, 2)])
    blobs.put_document(
        name, {"doc_id": "d/1", "filename": "q1.pdf", "pages": 2, "chunks": None, "metadata": {"q": 1}, "created": 1}
    )
    for page in (1, 2):
        for view, data in page_views(Image.new("RGB", (600, 800), (0, 0, 60 * page)), 80, 256).items():
            blobs.put(page_image_key(name, "d/1", page, view), data)
    yield name
    store.drop_collection(name)


def image_path(name: str, page: int = 1) -> str:
    return f"/v1/collections/{name}/documents/d%2F1/pages/{page}/image"


def test_documents_are_listed(images_api, alice_pages):
    base = images_api[0]
    listed = httpx.get(f"{base}/v1/collections/{alice_pages}/documents", headers=auth("alice")).json()["data"]
    assert listed == [
        {
            "object": "document",
            "doc_id": "d/1",
            "filename": "q1.pdf",
            "pages": 2,
            "chunks": None,
            "metadata": {"q": 1},
            "created": 1,
        }
    ]


def test_a_page_image_with_its_etag(images_api, alice_pages):
    base = images_api[0]
    url = base + image_path(alice_pages, 2)
    full = httpx.get(url, headers=auth("alice"))
    thumb = httpx.get(url, params={"size": "thumb"}, headers=auth("alice"))
    assert full.status_code == thumb.status_code == 200
    assert full.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(full.content)).size == (600, 800)
    assert Image.open(io.BytesIO(thumb.content)).size == (256, 341)
    assert full.headers["etag"] != thumb.headers["etag"]
    assert "no-cache" in full.headers["cache-control"]
    again = httpx.get(url, headers={**auth("alice"), "If-None-Match": full.headers["etag"]})
    assert (again.status_code, again.content, again.headers["etag"]) == (304, b"", full.headers["etag"])
    stale = httpx.get(url, headers={**auth("alice"), "If-None-Match": '"something-else"'})
    assert stale.status_code == 200
    assert httpx.get(url, params={"size": "huge"}, headers=auth("alice")).status_code in (400, 422)
    assert httpx.get(base + image_path(alice_pages, 3), headers=auth("alice")).status_code == 404


def test_images_need_a_key_and_are_their_tenants(images_api, alice_pages):
    base = images_api[0]
    url = base + image_path(alice_pages)
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(url, headers=auth("bob")).status_code == 404
    assert httpx.get(f"{base}/v1/collections/{alice_pages}/documents", headers=auth("bob")).status_code == 404


def test_the_console_session_cookie_stands_for_the_key(images_api, alice_pages):
    base = images_api[0]
    assert httpx.get(f"{base}/console/").status_code == 200  # the console's assets are open
    assert httpx.get(f"{base}/console/session").json()["auth"] is True
    assert httpx.post(f"{base}/console/session", headers={"Authorization": "Bearer wrong"}).status_code == 401
    signed = httpx.post(f"{base}/console/session", headers=auth("alice"))
    assert signed.status_code == 200
    cookie = signed.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and KEYS["alice"] not in cookie
    token = signed.cookies["embedq_session"]
    with httpx.Client(base_url=base, cookies={"embedq_session": token}) as browser:
        assert browser.get(image_path(alice_pages)).status_code == 200
        assert browser.get(f"/v1/collections/{alice_pages}/documents").status_code == 200
    expiry, _, signature = token.partition(".")
    for forged in (f"{int(expiry) + 60}.{signature}", f"{expiry}.{'0' * 64}", "", "garbage"):
        answer = httpx.get(base + image_path(alice_pages), cookies={"embedq_session": forged})
        assert answer.status_code == 401, forged
    as_bob = httpx.post(f"{base}/console/session", headers=auth("bob")).cookies["embedq_session"]
    assert httpx.get(base + image_path(alice_pages), cookies={"embedq_session": as_bob}).status_code == 404


def test_deleting_a_document_or_its_collection_deletes_its_images(images_api, alice_pages):
    base, store, blobs = images_api
    url = base + image_path(alice_pages)
    assert (
        httpx.delete(f"{base}/v1/collections/{alice_pages}/documents/d%2F1", headers=auth("alice")).status_code == 200
    )
    assert httpx.get(url, headers=auth("alice")).status_code == 404
    assert httpx.get(f"{base}/v1/collections/{alice_pages}/documents", headers=auth("alice")).json()["data"] == []
    assert store.count(alice_pages) == 0

    blobs.put(page_image_key(alice_pages, "d/1", 1, "full"), b"again")
    assert httpx.delete(f"{base}/v1/collections/{alice_pages}", headers=auth("alice")).status_code == 200
    assert blobs.get(page_image_key(alice_pages, "d/1", 1, "full")) is None


@pytest.mark.parametrize("variable", ["EMBEDQ_BLOB_URI", "EMBEDQ_BLOB_URL"])  # the second: its old name
def test_the_blob_store_is_named_by_either_variable(monkeypatch, variable):
    monkeypatch.setenv(variable, "s3://bucket/prefix")
    assert Settings().blob_location == "s3://bucket/prefix"
