"""Greedy batching inside a worker process: one device thread, many waiting requests.

When the device is free the batcher takes everything pending (oldest first, so long inputs never
starve) up to a padded-token budget and a batch-size cap, sorts it by length, and runs it. Nothing
waits on a timer when the queue is empty. A take of very mixed lengths runs as a few forward
passes of similar lengths rather than one padded to the longest (a FIFO batch of sentences pads
to several times its real tokens); each pass answers its requests as soon as it is done. Text goes before images, so a burst of
pages never makes a short query wait behind it for more than the batch already running.

It knows nothing of models: `run` takes a list of prepared inputs and returns one array each, or
raises. A failed batch sends its error to every request in it; `OutOfMemory` splits the batch
and retries the halves, so a request that fits alone never fails for its neighbours.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from ..backends.base import OutOfMemory, Prepared

log = logging.getLogger(__name__)


@dataclass
class BatcherStats:
    batches: int = 0
    items: int = 0
    oom_splits: int = 0
    failed_batches: int = 0


@dataclass
class _Pending:
    item: Prepared
    future: Future = field(default_factory=Future)


# A pass may carry this much padding over its real tokens before the rest of the take is split off,
# and is never split below MIN_PASS inputs (small passes waste the device more than padding does).
MAX_PADDING = 0.5
MIN_PASS = 8


def forward_passes(batch: list[_Pending]) -> list[list[_Pending]]:
    """Split a batch sorted by cost into passes whose padded cost stays near their real cost."""
    passes: list[list[_Pending]] = []
    current: list[_Pending] = []
    real = 0
    for pending in batch:
        cost = pending.item.cost
        if len(current) >= MIN_PASS and cost * (len(current) + 1) > (1 + MAX_PADDING) * (real + cost):
            passes.append(current)
            current, real = [], 0
        current.append(pending)
        real += cost
    return [*passes, current] if current else passes


RunBatch = Callable[[Sequence[Prepared]], list[np.ndarray]]


class Batcher:
    def __init__(
        self,
        run: RunBatch,
        token_budget: int,
        max_batch_size: int,
        modalities: Sequence[str] = ("text", "image"),
    ):
        self._run = run
        self._token_budget = token_budget
        self._max_batch_size = max_batch_size
        self._queues: dict[str, deque[_Pending]] = {m: deque() for m in modalities}
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="embedq-batcher", daemon=True)
        self.stats = BatcherStats()
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def submit(self, modality: str, items: Sequence[Prepared]) -> list[Future]:
        pending = [_Pending(item) for item in items]
        with self._cond:
            if not self.alive:
                raise RuntimeError(f"the batcher is not running: {self.error!r}")
            self._queues[modality].extend(pending)
            self._cond.notify()
        return [p.future for p in pending]

    def _take(self) -> list[_Pending] | None:
        """Everything pending of the first modality that has any, within budget and cap."""
        with self._cond:
            while not self._stopping and not any(self._queues.values()):
                self._cond.wait()
            if self._stopping:
                return None
            queue = next(q for q in self._queues.values() if q)
            taken: list[_Pending] = []
            longest = 0
            while queue and len(taken) < self._max_batch_size:
                longest_if_taken = max(longest, queue[0].item.cost)
                if taken and longest_if_taken * (len(taken) + 1) > self._token_budget:
                    break
                taken.append(queue.popleft())
                longest = longest_if_taken
            return taken

    def _loop(self) -> None:
        taken: list[_Pending] = []
        try:
            while (taken := self._take()) is not None:
                taken = [p for p in taken if p.future.set_running_or_notify_cancel()]
                taken.sort(key=lambda p: p.item.cost)
                for forward_pass in forward_passes(taken):
                    self._run_or_split(forward_pass)
        except BaseException as exc:  # a dead batcher must not leave requests waiting forever
            log.exception("batcher thread died")
            with self._cond:
                self.error = exc
                stranded = list(taken or [])
                for queue in self._queues.values():
                    stranded.extend(queue)
                    queue.clear()
            for p in stranded:
                if not p.future.done():
                    p.future.set_exception(exc)

    def _run_or_split(self, batch: list[_Pending]) -> None:
        if not batch:
            return
        try:
            outputs = self._run([p.item for p in batch])
        except OutOfMemory as exc:
            if len(batch) == 1:
                self.stats.failed_batches += 1
                batch[0].future.set_exception(exc)
                return
            self.stats.oom_splits += 1
            log.warning("out of memory on a batch of %d; splitting", len(batch))
            half = len(batch) // 2
            self._run_or_split(batch[:half])
            self._run_or_split(batch[half:])
            return
        except Exception as exc:
            self.stats.failed_batches += 1
            log.exception("batch of %d failed", len(batch))
            for p in batch:
                p.future.set_exception(exc)
            return
        self.stats.batches += 1
        self.stats.items += len(batch)
        for p, out in zip(batch, outputs):
            p.future.set_result(out)
