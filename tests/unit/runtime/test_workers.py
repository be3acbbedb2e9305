"""The one crash-isolating pool: a worker's death costs only the item that killed it, no process is left."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import time
from pathlib import Path

import pytest

from dinobatch.runtime.workers import Crashed, IsolatingPool, run_isolated

POISON = 7
_token = None  # per worker process: what its pool's initializer was given


def _remember(token=None) -> None:
    global _token
    _token = token


def _square_unless_poison(chunk: list[int]) -> list[tuple[int, object]]:
    """(item, item squared, the worker's token); the poison item segfaults its process, as a C decoder can."""
    out = []
    for item in chunk:
        if item == POISON:
            faulthandler.disable()  # pytest's, inherited: its traceback of the crash is only noise here
            os.kill(os.getpid(), signal.SIGSEGV)
        out.append((item * item, _token))
    return out


def _sleep(chunk: list[int]) -> list[int]:
    time.sleep(60)
    return chunk


@pytest.fixture(autouse=True)
def _children_before():
    """The children this process had before the test (the suite's shared Ray cluster, say): the
    test's own pools are judged by the children it added."""
    _BEFORE[:] = _all_live_children()
    yield


_BEFORE: list[int] = []


def live_children() -> list[int]:
    """Live children this test started."""
    return [pid for pid in _all_live_children() if pid not in _BEFORE]


def _all_live_children() -> list[int]:
    """Processes whose parent is this one and that are not zombies (a zombie holds nothing)."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid ...
        if int(fields[1]) == me and fields[0] != "Z":
            found.append(int(entry))
    return found


def assert_no_children_within(seconds: float = 2.0) -> None:
    deadline = time.monotonic() + seconds
    while live_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not live_children(), f"worker processes still alive: {live_children()}"


CHUNKS = [list(range(lo, lo + 3)) for lo in range(0, 15, 3)]  # the poison is in the middle of chunk 2


@pytest.mark.parametrize("ordered", [False, True])
def test_a_segfault_costs_only_its_item_and_leaves_no_process(ordered):
    with IsolatingPool(2, task="testing") as pool:
        got = list(pool.map(_square_unless_poison, CHUNKS, ordered=ordered))
    assert sorted(chunk for chunk, _ in got) == CHUNKS  # each chunk once
    if ordered:
        assert [chunk for chunk, _ in got] == CHUNKS
    results = {item: result for chunk, rs in got for item, result in zip(chunk, rs)}
    crashed = results.pop(POISON)
    assert isinstance(crashed, Crashed) and "SIGSEGV" in crashed.reason and "crashed" in crashed.reason
    assert {item: square for item, (square, _) in results.items()} == {i: i * i for i in range(15) if i != POISON}
    assert_no_children_within()


def test_suspects_are_redone_alone_and_the_rest_goes_to_a_fresh_pool():
    """Each pool's workers get initargs() afresh (a lock or budget the dead worker held is not
    reused); an item redone alone gets initializer() and shares nothing with any pool."""
    tokens = iter(range(100))
    with IsolatingPool(2, _remember, lambda: (next(tokens),)) as pool:
        got = list(pool.map(_square_unless_poison, CHUNKS, in_flight=1))  # one chunk at a time: one suspect
    results = {item: result for chunk, rs in got for item, result in zip(chunk, rs)}
    assert isinstance(results.pop(POISON), Crashed)
    assert {item: token for item, (_, token) in results.items()} == {
        **{i: 0 for i in range(6)}, 6: None, 8: None, **{i: 1 for i in range(9, 15)}}
    assert_no_children_within()


def test_without_a_crash_every_chunk_comes_back_from_one_pool():
    tokens = iter(range(100))
    with IsolatingPool(2, _remember, lambda: (next(tokens),)) as pool:
        got = list(pool.map(_square_unless_poison, [[1, 2], [3], [4, 5]], ordered=True))
    assert got == [([1, 2], [(1, 0), (4, 0)]), ([3], [(9, 0)]), ([4, 5], [(16, 0), (25, 0)])]
    assert_no_children_within()


def test_leaving_on_an_interrupt_kills_busy_workers_at_once():
    """Ctrl-C (or cron's SIGTERM, which the CLI raises as KeyboardInterrupt) while chunks run."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 1.0)  # while map() waits on two workers sleeping for a minute
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            with IsolatingPool(2) as pool:
                list(pool.map(_sleep, [[1], [2]]))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert_no_children_within()
    assert time.monotonic() - t0 < 30  # the sleeping chunks were not waited for


def test_every_forked_process_leaves_sigint_and_sigterm_to_its_parent():
    """Ctrl-C and cron's timeout signal the whole process group: a worker they killed would look
    like a decoder crash; the parent decides how to stop."""
    ok, handlers = run_isolated(lambda _: (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)), None)
    assert ok and handlers == (signal.SIG_IGN, signal.SIG_IGN)


def test_the_crash_warnings_name_what_the_pool_was_doing(caplog):
    # log monitors grep "a hashing process died" (scan) and "a decoding process died" (classify)
    with caplog.at_level(logging.WARNING, logger="dinobatch.runtime.workers"):
        with IsolatingPool(2, task="hashing") as pool:
            list(pool.map(_square_unless_poison, CHUNKS))
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("a hashing process died; hashing the ") and m.endswith(" again, one process each")
               for m in messages), messages
    assert any(m.startswith("a hashing process died (exit code ") for m in messages), messages  # the poison alone
    assert not any("decoding" in m for m in messages), messages
