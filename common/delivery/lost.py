"""Finding tasks the broker lost, so their senders can send them again: one algorithm, run by the
API for its online requests and by the ingestion workers for the jobs' tasks.

Kombu's Redis transport moves a message from its queue to the `unacked` hash in two steps: a BRPOP
takes it off the list, then the worker records it as held. A worker killed between the two (or
while stopped with a BRPOP outstanding) takes the message with it, and the visibility timeout
cannot bring it back. A task that is in none of its queue's lists, not held by any worker and has
no result is such a task, and only a dying worker makes one: so a sender looks, with `find_lost`,
only at its tasks sent before the last time a worker was found dead (`worker_died_at`, written by
the heartbeats), with `sweep`, and sends the lost ones again under their ids; running a task twice
only writes the same result twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

import redis
from kombu.transport.redis import PRIORITY_STEPS, Channel

from .. import keys

UNACKED_KEY = Channel.unacked_key
SECOND_LOOK_S = 1.0  # a live worker records a task it took within milliseconds

# Messages are kombu's JSON envelopes; the task id is the `correlation_id` among the properties,
# which come last, so a small tail of each message finds it without scanning large bodies.
_MISSING = f"""
local found = {{}}
local function note(message)
    local id = string.match(string.sub(message, -2048), '"correlation_id": *"([^"]+)"')
        or string.match(message, '"correlation_id": *"([^"]+)"')
    if id then found[id] = true end
end
for i = 1, #KEYS - 1 do
    for _, message in ipairs(redis.call('LRANGE', KEYS[i], 0, -1)) do note(message) end
end
for _, message in ipairs(redis.call('HVALS', KEYS[#KEYS])) do note(message) end
local missing = {{}}
for _, id in ipairs(ARGV) do
    if not found[id] and redis.call('EXISTS', '{keys.RESULT_PREFIX}' .. id) == 0 then
        table.insert(missing, id)
    end
end
return missing
"""


def queue_lists(queue: str) -> list[str]:
    """The Redis lists kombu keeps for a queue, one per priority step."""
    return [queue if step == 0 else f"{queue}{Channel.sep}{step}" for step in PRIORITY_STEPS]


def missing_tasks(client: redis.Redis, queues: list[str], task_ids: list[str]) -> list[str]:
    """Of `task_ids` (each sent to one of `queues`), those neither queued, held by a worker nor
    answered.

    One atomic script, so a task never looks missing while it moves between those places, except
    within kombu's two-step fetch: `find_lost` looks twice.
    """
    script = client.register_script(_MISSING)
    lists = [key for queue in queues for key in queue_lists(queue)]
    return [task_id.decode() for task_id in script(keys=[*lists, UNACKED_KEY], args=task_ids)]


def find_lost(client: redis.Redis, queues: list[str], task_ids: list[str]) -> list[str]:
    """Of `task_ids`, those missing (see `missing_tasks`) at two looks `SECOND_LOOK_S` apart."""
    missing = missing_tasks(client, queues, task_ids) if task_ids else []
    if not missing:
        return []
    time.sleep(SECOND_LOOK_S)
    return missing_tasks(client, queues, missing)


def worker_died_at(client: redis.Redis) -> float:
    """When a worker was last found dead (0 if never): tasks sent since cannot have been lost."""
    return float(client.get(keys.WORKER_DIED_AT) or 0)


def sweep(
    client: redis.Redis, tracked: Mapping[str, float], queues_of: Callable[[str], Iterable[str]]
) -> tuple[list[str], list[str], float]:
    """Of the `tracked` tasks (task id -> when it was last known in flight), look for those last
    known in flight before a worker was found dead, in the queues `queues_of(task_id)` names.
    Returns (the lost ones, the ones seen in flight, when they were looked at): the caller sends
    the lost ones again and marks both as known at that time, so each is looked at once per death."""
    died_at = worker_died_at(client)
    suspects = [task_id for task_id, known_at in tracked.items() if known_at < died_at]
    if not suspects:
        return [], [], 0.0
    looked_at = time.time()
    queues = sorted({queue for task_id in suspects for queue in queues_of(task_id)})
    lost = set(find_lost(client, queues, suspects))
    return [t for t in suspects if t in lost], [t for t in suspects if t not in lost], looked_at
