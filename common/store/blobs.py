"""The blob store: uploaded files, rendered page images, and the pages and documents kept to be seen.

Redis is the queue, not the warehouse: an upload waits here until its file is ingested, and a
page image until its batch is embedded; tasks carry only their keys. Each ingested document also
keeps here a record (doc_id, filename, pages or chunks, metadata, created) and, for pages, each
page as a full-size image and a thumbnail, for the console and for clients that hand a hit's page
to a VLM. The store is any fsspec URL (`EMBEDQ_BLOB_URI`): a local folder by default
(`./var/blobs`, which only the processes of one machine share), or an object store such as
`s3://bucket/prefix` (s3fs; credentials and endpoint from the usual AWS variables, so MinIO too)
when processes run on several machines. The bucket is made when the store opens, if missing.

Keys: `uploads/<job>/<file index>` and `pages/<job>/<file index>/<page>.png` go when their job
ends (jobs.watch) or when their work no longer needs them; `documents/<collection>/<document>/`
(`document.json`, `pages/<page>-full.jpg`, `pages/<page>-thumb.jpg`) goes with its document or
collection. Every write replaces what the key held, so a redelivered task writes the same again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json

from fsspec.core import url_to_fs


def upload_key(job_id: str, index: int) -> str:
    return f"uploads/{job_id}/{index}"


def page_key(job_id: str, index: int, page: int) -> str:
    return f"pages/{job_id}/{index}/{page}.png"


def document_folder(collection: str, doc_id: str) -> str:
    """A document's folder: its doc_id hashed, since a doc_id may hold any character."""
    return f"documents/{collection}/{hashlib.sha256(doc_id.encode()).hexdigest()[:32]}"


def page_image_key(collection: str, doc_id: str, page: int, view: str) -> str:
    """A kept page image; `view`: full or thumb (common.inputs.images.PAGE_VIEWS)."""
    return f"{document_folder(collection, doc_id)}/pages/{page}-{view}.jpg"


class BlobStore:
    def __init__(self, url: str):
        self.url = url
        self._fs, self._root = url_to_fs(url)
        self._fs.makedirs(self._root, exist_ok=True)

    def _path(self, key: str) -> str:
        return f"{self._root.rstrip('/')}/{key}"

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        self._fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with self._fs.open(path, "wb") as out:
            out.write(data)

    def get(self, key: str) -> bytes | None:
        try:
            with self._fs.open(self._path(key), "rb") as blob:
                return blob.read()
        except FileNotFoundError:
            return None

    def delete(self, *keys: str) -> None:
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                self._fs.rm_file(self._path(key))

    def _delete_folder(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._fs.rm(self._path(key), recursive=True)

    def delete_job(self, job_id: str) -> None:
        """Every blob of a job."""
        for folder in ("uploads", "pages"):
            self._delete_folder(f"{folder}/{job_id}")

    # Documents kept to be seen

    def put_document(self, collection: str, record: dict) -> None:
        """A document's record (`doc_id`, `filename`, `pages` or `chunks`, `metadata`, `created`)."""
        self.put(f"{document_folder(collection, record['doc_id'])}/document.json", json.dumps(record).encode())

    def documents(self, collection: str) -> list[dict]:
        """The records of the collection's documents, oldest first."""
        folder = self._path(f"documents/{collection}")
        self._fs.invalidate_cache(folder)  # s3fs keeps listings: other processes add documents
        paths = self._fs.glob(f"{folder}/*/document.json")
        records = []
        for path in paths:
            # Gone since the listing, or being written (a local file is not replaced atomically).
            with contextlib.suppress(FileNotFoundError, ValueError), self._fs.open(path, "rb") as blob:
                records.append(json.loads(blob.read()))
        return sorted(records, key=lambda r: (r["created"], r["doc_id"]))

    def delete_document(self, collection: str, doc_id: str) -> None:
        """The document's record and page images."""
        self._delete_folder(document_folder(collection, doc_id))

    def delete_collection(self, collection: str) -> None:
        self._delete_folder(f"documents/{collection}")
