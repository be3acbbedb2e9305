"""One writer per output: a second run is told who holds the lock, can wait for it, and takes over a dead one's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

from dinobatch.errors import LockedError
from dinobatch.io.lock import exclusive
from tests.helpers import REPO

# Holds the lock named in argv[1] and says so, until a line arrives on stdin.
_HOLDER = """
import sys
from dinobatch.io.lock import exclusive
with exclusive(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.readline()
"""


@pytest.fixture
def holder(tmp_path):
    """Start another process holding tmp_path/out/.lock; yields (process, lock path)."""
    lock = tmp_path / "out" / ".lock"
    child = subprocess.Popen([sys.executable, "-c", _HOLDER, str(lock)], cwd=REPO, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert child.stdout.readline().strip() == "held"
        yield child, lock
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)


def test_a_second_writer_is_told_who_holds_the_output(holder):
    child, lock = holder
    with pytest.raises(LockedError) as caught:
        with exclusive(lock):
            pytest.fail("took a lock another process holds")
    message = str(caught.value)
    assert f"{lock.parent} is in use by pid {child.pid} on " in message and "--wait" in message
    assert str(lock) in message  # the holder's command line
    with pytest.raises(LockedError, match=r"^the model file is in use by pid"):
        with exclusive(lock, what="the model file"):
            pass


def test_wait_waits_for_the_holder_to_finish_then_takes_the_lock(holder):
    child, lock = holder
    releaser = threading.Timer(0.5, lambda: (child.stdin.write("done\n"), child.stdin.flush()))
    releaser.start()
    try:
        with exclusive(lock, wait=60):
            assert child.wait(timeout=5) == 0  # it had finished: the lock was not shared
            assert str(os.getpid()) in lock.read_text()  # the file now names this process
    finally:
        releaser.cancel()
    assert lock.read_text() == ""  # released: the next run finds no holder to report


def test_a_killed_holder_leaves_no_lock_behind(holder):
    child, lock = holder
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    with exclusive(lock):  # at once, without --wait
        assert str(os.getpid()) in lock.read_text()


def test_the_same_process_cannot_take_its_own_lock_twice(tmp_path):
    lock = tmp_path / ".lock"
    with exclusive(lock):
        with pytest.raises(LockedError):
            with exclusive(lock):
                pass
    with exclusive(lock):  # and released properly after the refusal
        pass
