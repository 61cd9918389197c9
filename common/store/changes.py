"""The feed of changes to a late-interaction collection's pages, for the search workers' copies.

Search workers hold every page of a collection in memory (workers.search) and must see each
write, delete and drop, whichever process or machine made it. Every change made through
`MilvusStore` is appended, after Milvus has it, to a Redis Stream per collection; a search worker
reads the entries past the last one it applied before each search (one XRANGE, nothing when idle)
and re-reads the named pages from Milvus, so an entry only says *what* changed and replaying one
twice is harmless. The streams are not trimmed: an entry is a few hundred bytes per write batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import redis

from .. import keys

START = "0-0"  # the id before every entry


@dataclass(frozen=True)
class Change:
    id: str
    op: Literal["upsert", "delete", "drop"]
    page_keys: tuple[str, ...] = ()  # for upsert
    doc_id: str = ""  # for delete


class PageChanges:
    def __init__(self, client: redis.Redis):
        self._client = client

    def upserted(self, collection: str, page_keys: list[str]) -> None:
        self._client.xadd(keys.page_changes(collection), {"op": "upsert", "keys": json.dumps(page_keys)})

    def deleted(self, collection: str, doc_id: str) -> None:
        self._client.xadd(keys.page_changes(collection), {"op": "delete", "doc_id": doc_id})

    def dropped(self, collection: str) -> None:
        self._client.xadd(keys.page_changes(collection), {"op": "drop"})

    def last_id(self, collection: str) -> str:
        """The id of the newest entry: a copy loaded after reading it replays only what follows."""
        newest = self._client.xrevrange(keys.page_changes(collection), count=1)
        return newest[0][0].decode() if newest else START

    def since(self, collection: str, after: str) -> list[Change]:
        """The entries after id `after`, oldest first."""
        changes = []
        for entry_id, fields in self._client.xrange(keys.page_changes(collection), min=f"({after}", max="+"):
            fields = {k.decode(): v.decode() for k, v in fields.items()}
            changes.append(
                Change(
                    entry_id.decode(),
                    fields["op"],
                    tuple(json.loads(fields.get("keys", "[]"))),
                    fields.get("doc_id", ""),
                )
            )
        return changes
