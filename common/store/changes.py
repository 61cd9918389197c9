"""The feed of changes to a late-interaction collection's pages, for the search workers' copies.

Search workers hold every page of a collection in memory (workers.search) and must see each
write, delete and drop, whichever process or machine made it. Every change made through
`MilvusStore` is appended, after Milvus has it, to a Redis Stream per collection; a search worker
reads the entries past the last one it applied before each search (one XRANGE, nothing when idle)
and re-reads the named pages from Milvus, so an entry only says *what* changed and replaying one
twice is harmless. Each search worker records the last entry it applied, and a stream is trimmed
up to the oldest of those among the live search workers (a search worker that starts reads the
newest id before it loads the pages, so it never needs what came before).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import redis

from .. import keys

START = "0-0"  # the id before every entry


def _order(entry_id: str) -> tuple[int, int]:
    millis, _, sequence = entry_id.partition("-")
    return int(millis), int(sequence or 0)


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

    def applied(self, collection: str, worker: str, entry_id: str, live: list[str]) -> None:
        """`worker` has applied the entries up to `entry_id`: trim what every one of the `live`
        search workers has applied (the others are forgotten)."""
        key = keys.page_changes_applied(collection)
        self._client.hset(key, worker, entry_id)
        marks = {w.decode(): i.decode() for w, i in self._client.hgetall(key).items()}
        gone = [w for w in marks if w not in live and w != worker]
        if gone:
            self._client.hdel(key, *gone)
        if all(w in marks for w in live):
            oldest = min((marks[w] for w in {*live, worker}), key=_order)
            if oldest != START:
                self._client.xtrim(keys.page_changes(collection), minid=oldest, approximate=False)

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
