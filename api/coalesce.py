"""Concurrent embedding requests for the same model and options, sent as one task.

A request whose lane (model, modality, options) has no send in flight is sent at once, alone: a
lone client waits for nothing. Requests that arrive while a send of their lane is in flight wait
for that send to finish and then go together, as one ordinary `embedq.embed` task of up to
a batch of the model's inputs. A burst of one-text requests so costs one Celery round trip, not one each,
and the worker's per-task work is shared. Each request gets its own slice of the answer: its
vectors and its inputs' token counts.

A coalesced task that fails on its inputs (a 4xx: one input too long, an answer too large) is sent
again in halves, and so on down to single requests, so only the request at fault gets the error and
one bad input among n requests costs about 2·log2(n) more tasks, not n. Any other failure (no
worker answered, the model failed) is every member's, as it would have been alone. The task is
revoked only when every member's caller has gone; its deadline is the earliest member's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from common.errors import EmbedqError, ServiceUnavailable

from .results import Gone

Inputs = list[dict[str, Any]]
# Sends one task of `inputs` and returns its answer; calls `sent()` once the message has left.
Run = Callable[[Inputs, Gone | None, float, Callable[[], None]], Awaitable[Any]]


@dataclass
class _Member:
    inputs: Inputs
    gone: Gone | None
    deadline: float  # loop time
    answer: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass
class _Lane:
    max_inputs: int
    waiting: list[_Member] = field(default_factory=list)
    pumping: bool = False


def _input_fault(exc: BaseException) -> bool:
    return isinstance(exc, EmbedqError) and 400 <= exc.status < 500 and exc.status != 429


class Coalescer:
    """Lanes of requests waiting to be sent; `split(answer, sizes)` cuts one task's answer into
    its members' answers."""

    def __init__(self, split: Callable[[Any, list[int]], list[Any]]):
        self._split = split
        self._lanes: dict[tuple, _Lane] = {}
        self._running: set[asyncio.Task] = set()  # the loop holds tasks weakly
        self.tasks = 0  # tasks sent for coalescable requests
        self.requests = 0  # the requests they carried

    async def submit(
        self, lane_key: tuple, max_inputs: int, inputs: Inputs, gone: Gone | None, timeout: float, run: Run
    ) -> Any:
        """The answer to `inputs`, sent by `run` alone or with other requests of the same lane, in
        tasks of up to `max_inputs` inputs."""
        loop = asyncio.get_running_loop()
        member = _Member(inputs, gone, loop.time() + timeout)
        lane = self._lanes.setdefault(lane_key, _Lane(max_inputs))
        lane.waiting.append(member)
        if not lane.pumping:
            lane.pumping = True
            self._start(self._pump(lane_key, lane, run))
        return await member.answer

    def _start(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def _take(self, lane: _Lane) -> list[_Member]:
        group, size = [], 0
        while lane.waiting and (not group or size + len(lane.waiting[0].inputs) <= lane.max_inputs):
            member = lane.waiting.pop(0)
            group.append(member)
            size += len(member.inputs)
        return group

    async def _pump(self, lane_key: tuple, lane: _Lane, run: Run) -> None:
        try:
            while lane.waiting:
                group = self._take(lane)
                self.requests += len(group)
                sent = asyncio.get_running_loop().create_future()
                self._start(self._send(group, run, sent))
                await sent
        finally:
            lane.pumping = False
            if not lane.waiting:
                self._lanes.pop(lane_key, None)

    async def _send(self, group: list[_Member], run: Run, sent: asyncio.Future) -> None:
        def on_sent() -> None:
            if not sent.done():
                sent.set_result(None)

        self.tasks += 1
        try:
            answer = await self._run(group, run, on_sent)
        except asyncio.CancelledError:
            _settle_all(group, ServiceUnavailable("The server is stopping; try again."))
            raise
        except Exception as exc:
            if len(group) > 1 and _input_fault(exc):
                on_sent()
                middle = len(group) // 2
                await asyncio.gather(*(self._send(half, run, sent) for half in (group[:middle], group[middle:])))
            else:
                _settle_all(group, exc)
            return
        finally:
            on_sent()
        for member, part in zip(group, self._split(answer, [len(m.inputs) for m in group])):
            _settle(member, result=part)

    async def _run(self, group: list[_Member], run: Run, on_sent: Callable[[], None]) -> Any:
        inputs = [entry for member in group for entry in member.inputs]
        gones = [member.gone for member in group]
        gone = None if None in gones else _all_gone(gones)
        timeout = min(member.deadline for member in group) - asyncio.get_running_loop().time()
        return await run(inputs, gone, timeout, on_sent)


def _all_gone(gones: list[Gone]) -> Gone:
    async def gone() -> bool:
        for one in gones:
            if not await one():
                return False
        return True

    return gone


def _settle_all(group: list[_Member], exception: BaseException) -> None:
    for member in group:
        _settle(member, exception=exception)


def _settle(member: _Member, result: Any = None, exception: BaseException | None = None) -> None:
    if member.answer.done():
        return
    if exception is not None:
        member.answer.set_exception(exception)
    else:
        member.answer.set_result(result)
