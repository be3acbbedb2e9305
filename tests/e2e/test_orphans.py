"""No worker outlives its run: whatever kills classify or scan (SIGKILL too), every process it forked
dies with it within moments, so the caller's stdout and stderr pipes close and cron (or any
supervisor reading them) is not left waiting on orphans that hold them open.

Each run starts in a session of its own (start_new_session), so that every process it forked, even
one re-parented to init, can be found by its session id and killed in the teardown.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dinobatch.runtime.device import usable_cores
from dinobatch.runtime.faults import ENV
from tests.helpers import REPO, picture, save

GRACE_S = 2.0  # how long after the parent's death its workers and its pipes may take to go


def session_members(sid: int) -> list[tuple[int, str]]:
    """(pid, state) of every live process whose session is sid; zombies hold nothing and are left out."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append((int(entry), fields[0]))
    return members


def kill_session(sid: int) -> None:
    """SIGKILL whatever is left of a run: its process group and anything else in its session."""
    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid, _ in session_members(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def eof_within(proc: subprocess.Popen, seconds: float) -> bool:
    """Whether both of proc's pipes reach end-of-file within `seconds` (the output is read and dropped)."""
    pipes = [proc.stdout, proc.stderr]
    for pipe in pipes:
        os.set_blocking(pipe.fileno(), False)
    deadline = time.monotonic() + seconds
    while pipes:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        readable, _, _ = select.select(pipes, [], [], left)
        for pipe in readable:
            if not os.read(pipe.fileno(), 65536):
                pipes.remove(pipe)
    return True


@pytest.fixture
def killed_run():
    """Start a command in a session of its own; the teardown kills whatever of it is still alive."""
    started: list[subprocess.Popen] = []

    def start(argv: list[str], crash_at: str | None = None) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k != ENV}
        env["PYTHONPATH"] = str(REPO)
        if crash_at:
            env[ENV] = crash_at
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                start_new_session=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        kill_session(proc.pid)
        proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            pipe.close()


def assert_nothing_left(proc: subprocess.Popen) -> None:
    """proc died by SIGKILL; within GRACE_S none of its processes is alive and its pipes are closed."""
    assert proc.wait(timeout=120) == -signal.SIGKILL, proc.stderr.read().decode(errors="replace")
    t0 = time.monotonic()
    closed = eof_within(proc, GRACE_S)
    left = session_members(proc.pid)
    while left and time.monotonic() - t0 < GRACE_S:
        time.sleep(0.05)
        left = session_members(proc.pid)
    assert not left, f"processes of the killed run still alive after {GRACE_S} s: {left}"
    assert closed, f"the killed run's stdout/stderr still open after {GRACE_S} s"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Enough files that every command forks its workers and is still busy when it is killed."""
    root = tmp_path_factory.mktemp("orphans") / "inbox"
    for i in range(24):
        save(picture(i), root / f"{i:02d}.jpg", quality=90)
    return root


def dinobatch(*args) -> list[str]:
    return [sys.executable, "-m", "dinobatch", *map(str, args)]


@pytest.mark.skipif(usable_cores() < 2, reason="the burst pool (the CPU default) needs two usable cores")
def test_classify_killed_during_inference_leaves_no_burst_worker(photos, tiny_model, tmp_path, killed_run):
    proc = killed_run(dinobatch("classify", photos, "-o", tmp_path / "out", "-m", tiny_model, "-b", "4", "-q"),
                      crash_at="batch:1")
    assert_nothing_left(proc)


def test_classify_j2_killed_during_inference_leaves_no_dataloader_worker(photos, tiny_model, tmp_path,
                                                                           killed_run):
    proc = killed_run(dinobatch("classify", photos, "-o", tmp_path / "out", "-m", tiny_model, "-b", "4",
                                "-j", "2", "-q"), crash_at="batch:1")
    assert_nothing_left(proc)


def test_scan_killed_while_hashing_leaves_no_hashing_worker(photos, tmp_path, killed_run):
    proc = killed_run(dinobatch("scan", photos, "-o", tmp_path / "scan.parquet", "-j", "2", "-q"),
                      crash_at="fingerprint:3")
    assert_nothing_left(proc)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_a_decoder_isolated_in_its_own_process_dies_with_its_parent(killed_run):
    """run_isolated, where a crashing decoder's suspects go: its process must not outlive the run."""
    proc = killed_run(python("""
        import os, signal, time
        from dinobatch.runtime.workers import run_isolated

        def decode_slowly(_):
            os.kill(os.getppid(), signal.SIGKILL)  # the run is killed while this file is decoded
            time.sleep(60)

        run_isolated(decode_slowly, None)
    """))
    assert_nothing_left(proc)


def test_a_pool_forked_from_a_thread_outlives_the_thread_but_not_the_process(killed_run):
    """Linux's death signal follows the thread that forked, not the process: a pool started by a
    thread that has since ended must keep working, and its workers must still die with the process."""
    proc = killed_run(python("""
        import os, signal, sys, threading, time
        from dinobatch.runtime.workers import fork_pool

        pools = []
        def start():
            pools.append(fork_pool(2))
            pools[0].submit(os.getpid).result()  # the workers are forked here, by this thread
        thread = threading.Thread(target=start)
        thread.start()
        thread.join()
        time.sleep(0.5)
        pools[0].submit(os.getpid).result(timeout=10)  # BrokenProcessPool if its workers died with the thread
        print("pool alive after its thread ended", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """))
    assert proc.stdout.readline() == b"pool alive after its thread ended\n"
    assert_nothing_left(proc)


def test_train_killed_while_its_loader_runs_leaves_no_worker(tmp_path, killed_run):
    """train's DataLoader workers went only when torch's watchdog noticed, 5 s or more later."""
    for label in ("a", "b"):
        for i in range(16):
            save(picture(i + (100 if label == "b" else 0)), tmp_path / "data" / label / f"{i:02d}.png")
    manifest = tmp_path / "m.parquet"
    made = subprocess.run(dinobatch("manifest", tmp_path / "data", "-o", manifest, "-q"), capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert made.returncode == 0, made.stderr.decode(errors="replace")
    proc = killed_run(dinobatch("train", manifest, "-o", tmp_path / "m.pt", "--arch", "resnet18", "--pretrained",
                                "none", "--epochs", "500", "--image-size", "32", "-b", "4", "-j", "2", "-q"))
    deadline = time.monotonic() + 90
    while len(session_members(proc.pid)) < 3:  # the run and its two loader workers
        assert proc.poll() is None and time.monotonic() < deadline, "train never started its loader workers"
        time.sleep(0.05)
    time.sleep(1.5)  # past the workers' start-up: waiting on their index queues, as for most of a run
    # the loaders' workers end with each loader (between the epoch's training and validation a
    # quarter of the time on 2 cores): kill the run at a moment when it has them, not at a fixed one
    while len(session_members(proc.pid)) < 3:
        assert proc.poll() is None and time.monotonic() < deadline + 60, "train's loader workers never came back"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert_nothing_left(proc)
