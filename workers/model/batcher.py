"""Greedy batching inside a worker process: one device thread, many waiting requests.

When the device is free the batcher takes everything pending (oldest first, so long inputs never
starve) up to a padded-token budget and a batch-size cap, sorts it by length, and runs it. Nothing
waits on a timer when the queue is empty. A take of very mixed lengths runs as a few forward
passes of similar lengths rather than one padded to the longest (a FIFO batch of sentences pads
to several times its real tokens); each pass answers its requests as soon as it is done. Text goes before images, so a burst of
pages never makes a short query wait behind it for more than the batch already running.

It knows nothing of models: `run` takes a list of prepared inputs and returns one array each (or
the exception of an input that failed on its own), or raises. A failed batch sends its error to
every request in it; `OutOfMemory` splits the batch and retries the halves, so a request that fits
alone never fails for its neighbours.

A backend that waits on servers rather than on a device (an upstream) asks for several takes in
flight: each then runs on a thread of its own, and the batcher takes again as soon as one of those
is free, so what arrives meanwhile makes the next batch instead of waiting for the one in flight.

Each submission says where it came from (`Origin`): an input whose deadline has passed, or whose
origin `dropped` names (a caller that has gone), is answered `Dropped` without being computed; an
origin marked `alone` (a suspect that may have killed a worker before) has each of its inputs run
in a pass of its own, inside its `guard`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
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
    dropped: int = 0


class Dropped(Exception):
    """An input not computed because nobody waits for its answer any more."""


@dataclass(frozen=True)
class Origin:
    """Where submitted inputs came from (one task)."""

    tag: str = ""  # what `dropped` is asked about (a task id)
    deadline: float = math.inf  # unix time after which nobody wants the answer
    alone: bool = False  # run each input in a pass of its own
    guard: Callable[[], AbstractContextManager] = contextlib.nullcontext  # wraps those passes


@dataclass
class _Pending:
    item: Prepared
    origin: Origin
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


RunBatch = Callable[[Sequence[Prepared]], list[np.ndarray | Exception]]
SLOT_WAIT_S = 0.5  # how often a batcher waiting for a free take looks whether it is stopping


class Batcher:
    def __init__(
        self,
        run: RunBatch,
        token_budget: int,
        max_batch_size: int,
        modalities: Sequence[str] = ("text", "image"),
        dropped: Callable[[str], bool] = lambda tag: False,
        counted: Callable[[str, int], None] = lambda modality, n: None,
        in_flight: int = 1,
    ):
        """`counted(modality, n)` hears of every batch of `n` inputs computed, before their callers do;
        `in_flight`: takes run at once (more than 1: each on a thread of its own)."""
        self._run = run
        self._dropped = dropped
        self._counted = counted
        self._token_budget = token_budget
        self._max_batch_size = max_batch_size
        self._queues: dict[str, deque[_Pending]] = {m: deque() for m in modalities}
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="embedq-batcher", daemon=True)
        self._slots = threading.BoundedSemaphore(in_flight)
        self._passes = ThreadPoolExecutor(in_flight, thread_name_prefix="embedq-pass") if in_flight > 1 else None
        self._stats_lock = threading.Lock()
        self.stats = BatcherStats()
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=10)
        if self._passes is not None:
            self._passes.shutdown(wait=False)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def submit(self, modality: str, items: Sequence[Prepared], origin: Origin = Origin()) -> list[Future]:
        pending = [_Pending(item, origin) for item in items]
        with self._cond:
            if not self.alive:
                raise RuntimeError(f"the batcher is not running: {self.error!r}")
            self._queues[modality].extend(pending)
            self._cond.notify()
        return [p.future for p in pending]

    def _take(self) -> tuple[str, list[_Pending]] | None:
        """Everything pending of the first modality that has any, within budget and cap, up to
        the first input that runs alone (or that input by itself)."""
        with self._cond:
            while not self._stopping and not any(self._queues.values()):
                self._cond.wait()
            if self._stopping:
                return None
            modality, queue = next((m, q) for m, q in self._queues.items() if q)
            if queue[0].origin.alone:
                return modality, [queue.popleft()]
            taken: list[_Pending] = []
            longest = 0
            while queue and len(taken) < self._max_batch_size and not queue[0].origin.alone:
                longest_if_taken = max(longest, queue[0].item.cost)
                if taken and longest_if_taken * (len(taken) + 1) > self._token_budget:
                    break
                taken.append(queue.popleft())
                longest = longest_if_taken
            return modality, taken

    def _wanted(self, pending: _Pending, now: float) -> bool:
        """False (and the input answered `Dropped`) when nobody waits for it any more."""
        if now <= pending.origin.deadline and not self._dropped(pending.origin.tag):
            return pending.future.set_running_or_notify_cancel()
        if pending.future.set_running_or_notify_cancel():
            pending.future.set_exception(Dropped("its caller has gone or its deadline has passed"))
        self._count("dropped")
        return False

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            setattr(self.stats, name, getattr(self.stats, name) + n)

    def _free_slot(self) -> bool:
        """Wait for a take to be free to run; False when the batcher is stopping."""
        while not self._slots.acquire(timeout=SLOT_WAIT_S):
            if self._stopping:
                return False
        return True

    def _loop(self) -> None:
        taken: list[_Pending] = []
        try:
            while self._free_slot() and (took := self._take()) is not None:
                modality, taken = took
                now = time.time()
                taken = [p for p in taken if self._wanted(p, now)]
                taken.sort(key=lambda p: p.item.cost)
                if self._passes is None:
                    self._run_take(modality, taken)
                    self._slots.release()
                else:
                    self._passes.submit(self._run_take_in_flight, modality, taken)
                    taken = []
        except BaseException as exc:  # a dead batcher must not leave requests waiting forever
            self._die(exc, taken)

    def _run_take(self, modality: str, taken: list[_Pending]) -> None:
        for forward_pass in forward_passes(taken):
            if forward_pass[0].origin.alone:
                with forward_pass[0].origin.guard():
                    self._run_or_split(modality, forward_pass)
            else:
                self._run_or_split(modality, forward_pass)

    def _run_take_in_flight(self, modality: str, taken: list[_Pending]) -> None:
        try:
            self._run_take(modality, taken)
        except BaseException as exc:
            self._die(exc, taken)
        finally:
            self._slots.release()

    def _die(self, exc: BaseException, taken: list[_Pending]) -> None:
        """Fail what was taken and everything pending with `exc`; the batcher is not alive after."""
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

    def _run_or_split(self, modality: str, batch: list[_Pending]) -> None:
        if not batch:
            return
        try:
            outputs = self._run([p.item for p in batch])
        except OutOfMemory as exc:
            if len(batch) == 1:
                self._count("failed_batches")
                batch[0].future.set_exception(exc)
                return
            self._count("oom_splits")
            log.warning("out of memory on a batch of %d; splitting", len(batch))
            half = len(batch) // 2
            self._run_or_split(modality, batch[:half])
            self._run_or_split(modality, batch[half:])
            return
        except Exception as exc:
            self._count("failed_batches")
            log.exception("batch of %d failed", len(batch))
            for p in batch:
                p.future.set_exception(exc)
            return
        computed = sum(not isinstance(out, Exception) for out in outputs)
        self._count("batches")
        self._count("items", computed)
        self._counted(modality, computed)
        for p, out in zip(batch, outputs):
            if isinstance(out, Exception):
                p.future.set_exception(out)
            else:
                p.future.set_result(out)
