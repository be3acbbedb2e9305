"""The decode budget: a pool's processes together never hold more decoded bytes than it allows."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from dinobatch.imaging import decode_budget
from dinobatch.imaging.decode_budget import DecodeBudget
from dinobatch.errors import ConfigError

_HOLD_S = 0.3


def _decode_like(budget: DecodeBudget, nbytes: int, spans, slot: int) -> None:
    """Hold nbytes for a moment, as a decode of that size would, and record when."""
    with budget.hold(nbytes):
        start = time.monotonic()
        time.sleep(_HOLD_S)
        spans[2 * slot], spans[2 * slot + 1] = start, time.monotonic()


def _run_at_once(budget: DecodeBudget, sizes: list[int]) -> list[tuple[float, float]]:
    """Each size held by a process of its own, all started together: (start, end) of each hold."""
    ctx = multiprocessing.get_context("fork")
    spans = ctx.Array("d", 2 * len(sizes), lock=False)
    procs = [ctx.Process(target=_decode_like, args=(budget, n, spans, i)) for i, n in enumerate(sizes)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    return [(spans[2 * i], spans[2 * i + 1]) for i in range(len(sizes))]


def _most_held_at_once(sizes: list[int], spans: list[tuple[float, float]]) -> int:
    return max(sum(n for n, (s, e) in zip(sizes, spans) if s <= start < e) for start, _ in spans)


def test_processes_together_never_hold_more_than_the_budget():
    sizes = [600, 500, 300, 200, 100]
    spans = _run_at_once(DecodeBudget(1000), sizes)  # every process finished: none starved
    assert _most_held_at_once(sizes, spans) <= 1000


def _hold_together(budget: DecodeBudget, nbytes: int, barrier) -> None:
    with budget.hold(nbytes):
        barrier.wait(30)  # broken (an error) unless every process holds its share at the same time


def test_shares_that_fit_together_are_held_at_the_same_time():
    # not one decode at a time: the processes meet inside hold(), which they could not if it serialised them
    ctx = multiprocessing.get_context("fork")
    sizes, budget = [500, 300, 200], DecodeBudget(1000)
    barrier = ctx.Barrier(len(sizes))
    procs = [ctx.Process(target=_hold_together, args=(budget, n, barrier)) for n in sizes]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * len(sizes)


def test_an_image_larger_than_the_budget_decodes_alone_and_is_not_refused():
    sizes = [5000, 10, 10]
    spans = _run_at_once(DecodeBudget(1000), sizes)
    (big_start, big_end), others = spans[0], spans[1:]
    assert all(e <= big_start or s >= big_end for s, e in others)


def test_budget_is_read_from_the_environment_in_mib(monkeypatch):
    monkeypatch.setenv(decode_budget.ENV, "300")
    assert decode_budget.from_env().limit == 300 << 20
    monkeypatch.delenv(decode_budget.ENV)
    assert decode_budget.from_env().limit == decode_budget.DEFAULT_MIB << 20
    for bad in ("0", "-5", "1.5GB", "lots"):
        monkeypatch.setenv(decode_budget.ENV, bad)
        with pytest.raises(ConfigError, match=decode_budget.ENV):
            decode_budget.from_env()


_RESIDENT_AFTER_A_BIG_DECODE = """
import sys
import pyarrow  # classify's workers have it already (release_memory uses it)
from dinobatch.imaging.decode import decode
from dinobatch.imaging.decode_budget import DecodeBudget
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
data = open(sys.argv[1], "rb").read()
before = resident()
decode(data, heavy=DecodeBudget(1 << 30).hold)
print(resident() - before)
"""


def test_a_worker_hands_a_big_decode_back_even_where_freed_memory_stays_in_the_heap(tmp_path):
    # classify keeps freed memory in glibc's heap (tune_process; the same as these tunables) and its
    # decode workers inherit that: each would go on holding the largest image it had decoded.
    import os
    import subprocess
    import sys

    from PIL import Image

    path = tmp_path / "big.png"
    Image.new("RGBA", (6000, 6000), (200, 30, 60, 128)).save(path)  # 144 MB decoded
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647"}
    done = subprocess.run([sys.executable, "-c", _RESIDENT_AFTER_A_BIG_DECODE, str(path)], env=env, check=True,
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert int(done.stdout) < 48 << 20
