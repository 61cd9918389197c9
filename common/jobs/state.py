"""Job state in Redis: a job's counters, per-file progress, and the events it appends to its
stream (jobs.events reads them).

Counting is exactly-once: each page or chunk ("unit") is counted only the first time it is
reported, so a batch that a broker redelivers after a worker died is not counted twice. Finishing
a file, and the job once its last file finishes, happens inside one Lua script, so the final
event is written once however many workers report at the same moment.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import redis

from .. import keys
from ..errors import NotFound

Outcome = Literal["processed", "failed", "skipped"]
FINAL_EVENTS = ("completed", "failed", "cancelled")

# Returns 2 when this call finished the job, else 1 (0: every unit was counted before).
# KEYS: job, file, done-set, events. ARGV: op, now, ttl, then per op:
#   total <n>          the file has n units (a file that cannot be read has 0 and an error)
#   units <outcome> <unit ids...>
#   error <message>    the file failed as a whole
_PROGRESS = """
local op, now, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
if op == 'total' then
  redis.call('HSET', KEYS[2], 'total', ARGV[4], 'status', 'running')
  redis.call('HINCRBY', KEYS[1], 'total', tonumber(ARGV[4]))
elseif op == 'error' then
  redis.call('HSET', KEYS[2], 'error', ARGV[4])
  if not redis.call('HGET', KEYS[2], 'total') then redis.call('HSET', KEYS[2], 'total', 0) end
elseif op == 'units' then
  local new = 0
  for i = 5, #ARGV do
    if redis.call('SADD', KEYS[3], ARGV[i]) == 1 then new = new + 1 end
  end
  if new == 0 then return 0 end
  redis.call('HINCRBY', KEYS[2], ARGV[4], new)
  redis.call('HINCRBY', KEYS[1], ARGV[4], new)
end
if redis.call('HGET', KEYS[1], 'status') == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', now)
end
local f = redis.call('HMGET', KEYS[2], 'total', 'processed', 'failed', 'skipped', 'status', 'error')
local total = tonumber(f[1] or '-1')
local done = tonumber(f[2] or '0') + tonumber(f[3] or '0') + tonumber(f[4] or '0')
local finished = f[5] == 'completed' or f[5] == 'failed' or f[5] == 'cancelled'
local job = redis.call('HMGET', KEYS[1], 'total', 'processed', 'failed', 'skipped')
redis.call('XADD', KEYS[4], '*', 'event', 'progress', 'data', cjson.encode({
  status = 'running', total = tonumber(job[1]), processed = tonumber(job[2]),
  failed = tonumber(job[3]), skipped = tonumber(job[4])}))
if not finished and total >= 0 and (done >= total or f[6]) then
  local status = 'completed'
  if f[6] or tonumber(f[3] or '0') > 0 then status = 'failed'
  elseif tonumber(f[4] or '0') > 0 then status = 'cancelled' end
  redis.call('HSET', KEYS[2], 'status', status, 'finished_at', now)
  if status == 'completed' then redis.call('HINCRBY', KEYS[1], 'files_completed', 1) end
  if redis.call('HINCRBY', KEYS[1], 'files_open', -1) == 0 then
    local final = 'failed'
    if redis.call('HGET', KEYS[1], 'cancelled') == '1' then final = 'cancelled'
    elseif tonumber(redis.call('HGET', KEYS[1], 'files_completed') or '0') > 0 then final = 'completed' end
    redis.call('HSET', KEYS[1], 'status', final, 'finished_at', now)
    redis.call('XADD', KEYS[4], '*', 'event', final, 'data', cjson.encode({
      status = final, total = tonumber(job[1]), processed = tonumber(job[2]),
      failed = tonumber(job[3]), skipped = tonumber(job[4])}))
    for _, key in ipairs(KEYS) do redis.call('EXPIRE', key, ttl) end
    return 2
  end
end
for _, key in ipairs(KEYS) do redis.call('EXPIRE', key, ttl) end
return 1
"""


@dataclass
class UploadedFile:
    filename: str
    content_type: str | None
    data: bytes
    metadata: dict[str, Any]
    doc_id: str


class JobStore:
    """Job state on a synchronous Redis client (the API calls it from a thread)."""

    def __init__(self, client: redis.Redis, ttl_s: int):
        self._client = client
        self._ttl = ttl_s
        self._progress = client.register_script(_PROGRESS)

    def create(self, collection: str, model: str, files: list[UploadedFile]) -> str:
        job_id = uuid.uuid4().hex
        now = time.time()
        with self._client.pipeline() as pipe:
            pipe.hset(
                keys.job(job_id),
                mapping={
                    "id": job_id,
                    "collection": collection,
                    "model": model,
                    "status": "queued",
                    "created_at": now,
                    "files": len(files),
                    "files_open": len(files),
                    "files_completed": 0,
                    "total": 0,
                    "processed": 0,
                    "failed": 0,
                    "skipped": 0,
                    "cancelled": 0,
                },
            )
            for index, file in enumerate(files):
                pipe.hset(
                    keys.job_file(job_id, index),
                    mapping={
                        "filename": file.filename,
                        "doc_id": file.doc_id,
                        "status": "queued",
                        "processed": 0,
                        "failed": 0,
                        "skipped": 0,
                        "metadata": json.dumps(file.metadata),
                    },
                )
                pipe.set(keys.upload(job_id, index), file.data, ex=self._ttl)
            pipe.xadd(
                keys.job_events(job_id),
                {
                    "event": "progress",
                    "data": json.dumps({"status": "queued", "total": 0, "processed": 0, "failed": 0, "skipped": 0}),
                },
            )
            for key in [
                keys.job(job_id),
                keys.job_events(job_id),
                *(keys.job_file(job_id, i) for i in range(len(files))),
            ]:
                pipe.expire(key, self._ttl)
            pipe.execute()
        return job_id

    def _run(self, job_id: str, index: int, op: str, *args: Any) -> bool:
        """True when this report finished the whole job."""
        return (
            self._progress(
                keys=[
                    keys.job(job_id),
                    keys.job_file(job_id, index),
                    keys.job_units_done(job_id),
                    keys.job_events(job_id),
                ],
                args=[op, time.time(), self._ttl, *args],
            )
            == 2
        )

    def set_total(self, job_id: str, index: int, total: int) -> None:
        self._run(job_id, index, "total", total)

    def record(self, job_id: str, index: int, outcome: Outcome, units: list[str], error: str | None = None) -> bool:
        """Count `units` (once each, however often reported); True when that finished the job."""
        if error:
            self._client.hset(keys.job_file(job_id, index), "error", error)
        return self._run(job_id, index, "units", outcome, *units)

    def fail_file(self, job_id: str, index: int, error: str) -> None:
        self._run(job_id, index, "error", error)

    def upload(self, job_id: str, index: int) -> bytes | None:
        return self._client.get(keys.upload(job_id, index))

    def drop_upload(self, job_id: str, index: int) -> None:
        self._client.delete(keys.upload(job_id, index))

    def file_info(self, job_id: str, index: int) -> dict[str, Any]:
        raw = {k.decode(): v.decode() for k, v in self._client.hgetall(keys.job_file(job_id, index)).items()}
        raw["metadata"] = json.loads(raw.get("metadata", "{}"))
        return raw

    def set_kind(self, job_id: str, index: int, kind: str) -> None:
        self._client.hset(keys.job_file(job_id, index), "kind", kind)

    def is_cancelled(self, job_id: str) -> bool:
        """True once cancelled, and for a job that expired: its remaining work is skipped."""
        return self._client.hget(keys.job(job_id), "cancelled") in (b"1", None)

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Pending pages and chunks are skipped; the job says `cancelled` at once and its final
        event follows when the work in flight has drained. A finished job stays as it was."""
        job = self.get(job_id)
        if job["status"] in ("queued", "running"):
            self._client.hset(keys.job(job_id), mapping={"cancelled": 1, "status": "cancelled"})
            job["status"] = "cancelled"
        return job

    def get(self, job_id: str) -> dict[str, Any]:
        job = {k.decode(): v.decode() for k, v in self._client.hgetall(keys.job(job_id)).items()}
        if not job:
            raise NotFound(f"No job '{job_id}'.", "job_id")
        files = []
        for index in range(int(job["files"])):
            info = self.file_info(job_id, index)
            files.append(
                {
                    "index": index,
                    "filename": info.get("filename"),
                    "doc_id": info.get("doc_id"),
                    "kind": info.get("kind"),
                    "status": info.get("status"),
                    "total": _int(info.get("total")),
                    "processed": _int(info.get("processed")),
                    "failed": _int(info.get("failed")),
                    "skipped": _int(info.get("skipped")),
                    "error": info.get("error"),
                }
            )
        return {
            "id": job_id,
            "object": "job",
            "collection": job["collection"],
            "model": job["model"],
            "status": job["status"],
            "total": int(job["total"]),
            "processed": int(job["processed"]),
            "failed": int(job["failed"]),
            "skipped": int(job["skipped"]),
            "files": files,
            "created_at": _float(job.get("created_at")),
            "started_at": _float(job.get("started_at")),
            "finished_at": _float(job.get("finished_at")),
        }


def _int(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None
