"""The greedy batcher on its own. The `run` functions here are stand-ins for a model: a CUDA
out-of-memory error cannot happen on a CPU machine, so `OutOfMemory` is raised by hand."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from workers.backends.base import OutOfMemory, Prepared
from workers.model.batcher import Batcher


def item(cost: int) -> Prepared:
    return Prepared(cost=cost, n_tokens=cost, payload=cost)


class Recorder:
    """Records batches; the first call blocks until released, so work piles up behind it."""

    def __init__(self, fail_when=None):
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.fail_when = fail_when

    def __call__(self, batch):
        costs = [p.payload for p in batch]
        if not self.batches:
            self.gate.wait(5)
        self.batches.append(costs)
        if self.fail_when and self.fail_when(costs):
            raise self.fail_when.error
        return [np.full(2, c, dtype=np.float32) for c in costs]


@pytest.fixture
def make():
    started = []

    def _make(run, budget=1000, cap=64, modalities=("text", "image")):
        batcher = Batcher(run, budget, cap, modalities)
        batcher.start()
        started.append(batcher)
        return batcher

    yield _make
    for batcher in started:
        batcher.stop()


def results(futures):
    return [int(f.result(timeout=5)[0]) for f in futures]


def test_runs_at_once_when_idle(make):
    run = Recorder()
    run.gate.set()
    batcher = make(run)
    started = time.perf_counter()
    assert results(batcher.submit("text", [item(3)])) == [3]
    assert time.perf_counter() - started < 0.05  # no fixed wait on an empty queue


def test_takes_everything_pending_sorted_by_length(make):
    run = Recorder()
    batcher = make(run)
    first = batcher.submit("text", [item(1)])
    time.sleep(0.05)  # the device is now busy with the first batch
    pending = [batcher.submit("text", [item(c)]) for c in (9, 2, 7, 4)]
    run.gate.set()
    assert results(first) == [1]
    assert [results(f) for f in pending] == [[9], [2], [7], [4]]
    assert run.batches == [[1], [2, 4, 7, 9]]


def test_token_budget_and_size_cap(make):
    run = Recorder()
    batcher = make(run, budget=40, cap=3)
    first = batcher.submit("text", [item(1)])
    time.sleep(0.05)
    futures = batcher.submit("text", [item(10)] * 5 + [item(30)])
    run.gate.set()
    results(first)
    assert results(futures) == [10] * 5 + [30]
    # cap 3 -> [10,10,10]; then [10,10] (+30 would need 3*30 > 40 padded tokens); then [30] alone
    assert run.batches[1:] == [[10, 10, 10], [10, 10], [30]]


def test_oversized_input_still_runs_alone(make):
    run = Recorder()
    run.gate.set()
    batcher = make(run, budget=10)
    assert results(batcher.submit("text", [item(500)])) == [500]


def test_oldest_first_so_long_inputs_do_not_starve(make):
    run = Recorder()
    batcher = make(run, budget=100, cap=64)
    first = batcher.submit("text", [item(1)])
    time.sleep(0.05)
    long_one = batcher.submit("text", [item(90)])
    shorts = batcher.submit("text", [item(5)] * 10)
    run.gate.set()
    results(first)
    assert results(long_one) == [90]
    assert results(shorts) == [5] * 10
    assert run.batches[1] == [90]  # taken first even though short ones would pack better


def test_text_goes_before_images(make):
    run = Recorder()
    batcher = make(run)
    first = batcher.submit("image", [item(1)])
    time.sleep(0.05)
    images = batcher.submit("image", [item(50)] * 3)
    text = batcher.submit("text", [item(7)])
    run.gate.set()
    results(first)
    results(images)
    results(text)
    assert run.batches[1] == [7]


def test_out_of_memory_splits_and_only_the_too_big_one_fails(make):
    def too_big(costs):
        return (len(costs) > 1 and sum(costs) > 10) or costs == [99]

    too_big.error = OutOfMemory("CUDA out of memory (simulated)")
    run = Recorder(fail_when=too_big)
    batcher = make(run)
    first = batcher.submit("text", [item(1)])
    time.sleep(0.05)
    futures = batcher.submit("text", [item(4), item(5), item(6), item(99)])
    run.gate.set()
    results(first)
    assert results(futures[:3]) == [4, 5, 6]
    with pytest.raises(OutOfMemory):
        futures[3].result(timeout=5)
    assert batcher.stats.oom_splits >= 2


def test_a_failed_batch_fails_every_request_in_it(make):
    def always(costs):
        return True

    always.error = ValueError("broken kernel")
    run = Recorder(fail_when=always)
    run.gate.set()
    batcher = make(run)
    futures = batcher.submit("text", [item(1), item(2)])
    for future in futures:
        with pytest.raises(ValueError, match="broken kernel"):
            future.result(timeout=5)
    assert batcher.alive  # the batcher itself goes on
    assert batcher.stats.failed_batches == 1


def test_a_dead_batcher_never_leaves_requests_waiting(make):
    def crash(batch):
        raise SystemExit("device thread died")

    batcher = make(crash)
    futures = batcher.submit("text", [item(1)])
    with pytest.raises(SystemExit):
        futures[0].result(timeout=5)
    time.sleep(0.05)
    assert not batcher.alive
    with pytest.raises(RuntimeError, match="not running"):
        batcher.submit("text", [item(1)])


def test_mixed_lengths_run_as_passes_of_similar_length(make):
    run = Recorder()
    batcher = make(run, budget=100_000, cap=64)
    first = batcher.submit("text", [item(1)])
    time.sleep(0.05)
    costs = [10] * 12 + [100] * 12
    futures = batcher.submit("text", [item(c) for c in costs])
    run.gate.set()
    results(first)
    assert results(futures) == costs
    assert run.batches[1:] == [[10] * 12, [100] * 12]  # not one pass padded to 100


def test_small_takes_are_not_split_for_padding(make):
    run = Recorder()
    batcher = make(run, budget=100_000, cap=64)
    first = batcher.submit("text", [item(1)])
    time.sleep(0.05)
    futures = batcher.submit("text", [item(c) for c in (5, 200, 7)])
    run.gate.set()
    results(first)
    results(futures)
    assert run.batches[1:] == [[5, 7, 200]]
