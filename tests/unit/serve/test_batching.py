"""serve.batching: concurrent submissions share forward passes, each caller gets its own answer,
and a failing batch answers its callers with the error while the batcher keeps serving."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dinobatch.serve.batching import BatcherClosed, MicroBatcher


class _Model:
    """Doubles its inputs and records each batch it was given; fails on a batch holding 'boom'."""

    def __init__(self, delay: float = 0.0):
        self.batches: list[list] = []
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, items):
        with self.lock:
            self.batches.append(list(items))
        time.sleep(self.delay)
        if "boom" in items:
            raise ValueError("the model failed on this batch")
        return [x * 2 for x in items]


def _submit_all(batcher: MicroBatcher, items, threads: int):
    """Each item submitted from its own thread at (nearly) the same moment; the answers in item order."""
    start = threading.Barrier(threads)

    def one(x):
        start.wait()
        return batcher.submit(x).result(timeout=10)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, items))


def test_concurrent_submissions_share_forward_passes_and_each_caller_gets_its_own_answer():
    model = _Model(delay=0.02)
    batcher = MicroBatcher(model, max_batch=8, max_wait_ms=50)
    try:
        answers = _submit_all(batcher, list(range(32)), threads=32)
    finally:
        batcher.close()
    assert answers == [x * 2 for x in range(32)]
    assert len(model.batches) < 32 and max(len(b) for b in model.batches) > 1
    assert all(len(b) <= 8 for b in model.batches)
    assert sorted(x for b in model.batches for x in b) == list(range(32))  # each input ran exactly once


def test_without_waiting_or_with_batch_size_one_every_request_has_its_own_pass():
    model = _Model()
    batcher = MicroBatcher(model, max_batch=1, max_wait_ms=0)
    try:
        assert _submit_all(batcher, list(range(8)), threads=8) == [x * 2 for x in range(8)]
    finally:
        batcher.close()
    assert len(model.batches) == 8


def test_a_failing_batch_answers_its_callers_with_the_error_and_the_batcher_keeps_serving():
    model = _Model()
    batcher = MicroBatcher(model, max_batch=4, max_wait_ms=200)
    try:
        failing = [batcher.submit("boom"), batcher.submit(3)]  # queued together: one batch
        for f in failing:
            with pytest.raises(ValueError, match="the model failed"):
                f.result(timeout=10)
        assert batcher.submit(5).result(timeout=10) == 10
    finally:
        batcher.close()
    assert model.batches[0] == ["boom", 3]


def test_a_batch_function_giving_the_wrong_number_of_outputs_is_an_error_not_a_wrong_answer():
    batcher = MicroBatcher(lambda items: [0], max_batch=4, max_wait_ms=200)
    try:
        futures = [batcher.submit(1), batcher.submit(2)]
        for f in futures:
            with pytest.raises(RuntimeError, match="1 outputs for 2 inputs"):
                f.result(timeout=10)
    finally:
        batcher.close()


def test_a_closed_batcher_refuses_new_work_with_a_clear_error():
    batcher = MicroBatcher(_Model(), max_batch=4, max_wait_ms=1)
    batcher.close()
    with pytest.raises(BatcherClosed):
        batcher.submit(1).result(timeout=1)


def test_a_lone_request_is_not_held_back_waiting_for_others():
    model = _Model()
    batcher = MicroBatcher(model, max_batch=8, max_wait_ms=1000)  # would hold it a second, were anyone coming
    try:
        assert batcher.submit(3).result(timeout=0.5) == 6
    finally:
        batcher.close()


def test_a_batch_waits_for_a_caller_still_preparing_its_input():
    model = _Model()
    batcher = MicroBatcher(model, max_batch=8, max_wait_ms=5000)
    try:
        with batcher.expecting():  # a second caller is decoding its upload
            first = batcher.submit(1)
            time.sleep(0.1)
            second = batcher.submit(2)
        assert (first.result(timeout=10), second.result(timeout=10)) == (2, 4)
    finally:
        batcher.close()
    assert model.batches == [[1, 2]]
