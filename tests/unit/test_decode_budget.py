"""The decode budget: a pool's processes together never hold more decoded bytes than it allows."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from dinobatch import decode_budget
from dinobatch.decode_budget import DecodeBudget
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
    spans = _run_at_once(DecodeBudget(1000), sizes)
    assert _most_held_at_once(sizes, spans) <= 1000
    assert _most_held_at_once(sizes, spans) >= 500  # not one at a time either: small ones share it
    assert max(e for _, e in spans) - min(s for s, _ in spans) < 5 * _HOLD_S  # no process starved


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
