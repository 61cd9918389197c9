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
from ..store.blobs import BlobStore, upload_key

Outcome = Literal["processed", "failed", "skipped"]
FINAL_EVENTS = ("completed", "failed", "cancelled")
# Events: `progress` (counts), `waiting` (with why: no live worker takes the job's work), and one
# final event of FINAL_EVENTS.

# Returns 2 when this call finished the job, else 1 (0: nothing counted: every unit was counted
# before, or the file had ended). KEYS: job, file, done-set, events. ARGV: op, now, ttl, then:
#   total <n>                    the file has n units; a second report of its total changes nothing
#   units <outcome> <error> <unit ids>   count these units (each once, ever), unless the file has
#                                ended; a non-empty error is kept on the file
#   fail <message> <unit ids>    the file failed with `message`; count these units (those never
#                                sent) as failed; a file with no total yet gets 0
#   abandon <message>            fail every unit of the file not yet counted (nobody will count them)
# A file ends once all its units are counted, and the job once its last file has ended: whatever is
# delivered twice, each ended file's processed + failed + skipped is its total, and the job's the sum.
_PROGRESS = """
local op, now, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local function ended(status) return status == 'completed' or status == 'failed' or status == 'cancelled' end
local function count(outcome, first)
  local new = 0
  for i = first, #ARGV do
    if redis.call('SADD', KEYS[3], ARGV[i]) == 1 then new = new + 1 end
  end
  if new > 0 then
    redis.call('HINCRBY', KEYS[2], outcome, new)
    redis.call('HINCRBY', KEYS[1], outcome, new)
  end
  return new
end
if ended(redis.call('HGET', KEYS[2], 'status')) then return 0 end
if op == 'total' then
  if redis.call('HSETNX', KEYS[2], 'total', ARGV[4]) == 0 then return 1 end
  redis.call('HSET', KEYS[2], 'status', 'running')
  redis.call('HINCRBY', KEYS[1], 'total', tonumber(ARGV[4]))
elseif op == 'fail' then
  redis.call('HSET', KEYS[2], 'error', ARGV[4])
  redis.call('HSETNX', KEYS[2], 'total', 0)
  count('failed', 5)
elseif op == 'abandon' then
  redis.call('HSET', KEYS[2], 'error', ARGV[4])
  redis.call('HSETNX', KEYS[2], 'total', 0)
  local f = redis.call('HMGET', KEYS[2], 'total', 'processed', 'failed', 'skipped')
  local rest = tonumber(f[1]) - tonumber(f[2] or '0') - tonumber(f[3] or '0') - tonumber(f[4] or '0')
  if rest > 0 then
    redis.call('HINCRBY', KEYS[2], 'failed', rest)
    redis.call('HINCRBY', KEYS[1], 'failed', rest)
  end
elseif op == 'units' then
  -- A report of units counted already (a batch delivered twice) changes nothing, its error included:
  -- the second run of a batch the first has stored may find its page images gone.
  if count(ARGV[4], 6) == 0 then return 0 end
  if ARGV[5] ~= '' then redis.call('HSET', KEYS[2], 'error', ARGV[5]) end
end
if redis.call('HGET', KEYS[1], 'status') == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', now)
end
local f = redis.call('HMGET', KEYS[2], 'total', 'processed', 'failed', 'skipped', 'error')
local total = tonumber(f[1] or '-1')
local done = tonumber(f[2] or '0') + tonumber(f[3] or '0') + tonumber(f[4] or '0')
local job = redis.call('HMGET', KEYS[1], 'total', 'processed', 'failed', 'skipped')
redis.call('XADD', KEYS[4], '*', 'event', 'progress', 'data', cjson.encode({
  status = 'running', total = tonumber(job[1]), processed = tonumber(job[2]),
  failed = tonumber(job[3]), skipped = tonumber(job[4])}))
if total >= 0 and done >= total then
  local status = 'completed'
  if f[5] or tonumber(f[3] or '0') > 0 then status = 'failed'
  elseif tonumber(f[4] or '0') > 0 then status = 'cancelled' end
  redis.call('HSET', KEYS[2], 'status', status, 'finished_at', now)
  if status == 'completed' then redis.call('HINCRBY', KEYS[1], 'files_completed', 1) end
  if redis.call('HINCRBY', KEYS[1], 'files_open', -1) == 0 then
    local final = 'failed'
    if redis.call('HGET', KEYS[1], 'cancelled') == '1' then final = 'cancelled'
    elseif tonumber(redis.call('HGET', KEYS[1], 'files_completed') or '0') > 0 then final = 'completed' end
    redis.call('HSET', KEYS[1], 'status', final, 'finished_at', now)
    redis.call('HDEL', KEYS[1], 'waiting', 'waiting_since')
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

# Cancels a job that has not ended: its status says so at once; its final event comes when the work
# in flight has drained. KEYS: job.
_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' or status == 'running' then
  redis.call('HSET', KEYS[1], 'cancelled', 1, 'status', 'cancelled')
end
"""

# Says why a job waits (`reason`; '' when it no longer does), with a `waiting` event when that
# changes; returns how many seconds it has been waiting (0: it is not, or it has ended).
# KEYS: job, events. ARGV: reason, now.
_WAITING = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' and status ~= 'cancelled' then return 0 end
if redis.call('HGET', KEYS[1], 'finished_at') then return 0 end
local reason, now = ARGV[1], tonumber(ARGV[2])
local current = redis.call('HGET', KEYS[1], 'waiting')
local job = redis.call('HMGET', KEYS[1], 'total', 'processed', 'failed', 'skipped')
local function event(name, why)
  redis.call('XADD', KEYS[2], '*', 'event', name, 'data', cjson.encode({
    status = status, waiting = why, total = tonumber(job[1]), processed = tonumber(job[2]),
    failed = tonumber(job[3]), skipped = tonumber(job[4])}))
end
if reason == '' then
  if current then
    redis.call('HDEL', KEYS[1], 'waiting', 'waiting_since')
    event('progress', cjson.null)
  end
  return 0
end
if current ~= reason then
  redis.call('HSET', KEYS[1], 'waiting', reason)
  redis.call('HSETNX', KEYS[1], 'waiting_since', ARGV[2])
  event('waiting', reason)
end
return math.floor(now - tonumber(redis.call('HGET', KEYS[1], 'waiting_since')))
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

    def __init__(self, client: redis.Redis, ttl_s: int, blobs: BlobStore):
        """`blobs` holds the uploads until their files are ingested (Redis holds only state)."""
        self._client = client
        self.blobs = blobs
        self._ttl = ttl_s
        self._progress = client.register_script(_PROGRESS)
        self._cancel = client.register_script(_CANCEL)
        self._waiting = client.register_script(_WAITING)

    def create(self, collection: str, model: str, files: list[UploadedFile], tenant: str = "") -> str:
        job_id = uuid.uuid4().hex
        now = time.time()
        for index, file in enumerate(files):
            self.blobs.put(upload_key(job_id, index), file.data)
        with self._client.pipeline() as pipe:
            pipe.hset(
                keys.job(job_id),
                mapping={
                    "id": job_id,
                    "collection": collection,
                    "model": model,
                    "tenant": tenant,
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
        """The file has `total` units; its first report counts, a redelivered one changes nothing."""
        self._run(job_id, index, "total", total)

    def record(self, job_id: str, index: int, outcome: Outcome, units: list[str], error: str | None = None) -> bool:
        """Count `units` (once each, however often reported); True when that finished the job."""
        return self._run(job_id, index, "units", outcome, error or "", *units)

    def fail_file(self, job_id: str, index: int, error: str, unsent: list[str] = ()) -> bool:
        """The file failed with `error`: its units never sent (`unsent`) count as failed, and it
        ends once the batches already sent have reported. True when that finished the job."""
        return self._run(job_id, index, "fail", error, *unsent)

    def abandon(self, job_id: str, index: int, error: str) -> bool:
        """End the file now, failing every unit not yet counted; reports that come later are not
        counted. True when that finished the job."""
        return self._run(job_id, index, "abandon", error)

    def waiting(self, job_id: str, reason: str | None) -> int:
        """Say why the job waits (None: it does not); returns for how many seconds it has waited."""
        return int(self._waiting(keys=[keys.job(job_id), keys.job_events(job_id)], args=[reason or "", time.time()]))

    def abandon_job(self, job_id: str, error: str) -> None:
        """End every file of the job that has not ended, failing its uncounted units."""
        files = int(self._client.hget(keys.job(job_id), "files") or 0)
        for index in range(files):
            self.abandon(job_id, index, error)

    def upload(self, job_id: str, index: int) -> bytes | None:
        return self.blobs.get(upload_key(job_id, index))

    def drop_upload(self, job_id: str, index: int) -> None:
        self.blobs.delete(upload_key(job_id, index))

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
        event follows when the work in flight has drained. A job that has ended stays as it was."""
        self.get(job_id)  # NotFound for an unknown job
        self._cancel(keys=[keys.job(job_id)])
        return self.get(job_id)

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
            "tenant": job.get("tenant", ""),
            "status": job["status"],
            "total": int(job["total"]),
            "processed": int(job["processed"]),
            "failed": int(job["failed"]),
            "skipped": int(job["skipped"]),
            "files": files,
            "waiting": job.get("waiting"),
            "created_at": _float(job.get("created_at")),
            "started_at": _float(job.get("started_at")),
            "finished_at": _float(job.get("finished_at")),
        }


def _int(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None
