"""The blob store: uploaded files and rendered page images, kept outside Redis.

Redis is the queue, not the warehouse: an upload waits here until its file is ingested, and a
page image until its batch is embedded; tasks carry only their keys. The store is any fsspec URL
(`EMBEDQ_BLOB_URL`): a local folder by default (`./var/blobs`, shared by the processes of one
machine), or an object store such as `s3://bucket/prefix` (with s3fs installed) when workers run
on several machines.

Keys: `uploads/<job>/<file index>` and `pages/<job>/<file index>/<page>.png`; a job's blobs go
when it ends (jobs.watch) or when their work no longer needs them.
"""

from __future__ import annotations

import contextlib

from fsspec.core import url_to_fs


def upload_key(job_id: str, index: int) -> str:
    return f"uploads/{job_id}/{index}"


def page_key(job_id: str, index: int, page: int) -> str:
    return f"pages/{job_id}/{index}/{page}.png"


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

    def delete_job(self, job_id: str) -> None:
        """Every blob of a job."""
        for folder in ("uploads", "pages"):
            with contextlib.suppress(FileNotFoundError):
                self._fs.rm(self._path(f"{folder}/{job_id}"), recursive=True)
