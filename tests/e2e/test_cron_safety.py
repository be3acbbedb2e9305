"""Cron safety: killed runs lose and double nothing, runs exclude each other, full disks, odd names,
bounded memory, and logs and summaries that monitoring can read."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dinobatch.errors import EXIT_LOCKED, EXIT_OUTPUT
from dinobatch.io.lock import exclusive
from dinobatch.store.runs import current_rows
from tests.helpers import REPO, SHARED_DATA, picture, save, tree_digest

COMPARED = ("path", "sha256", "status", "error", "label", "probs", "duplicate_of", "duplicate_kind", "width", "phash")


def run_cli(*args, crash_at: str | None = None, env_extra=None, preexec=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "DINOBATCH_CRASH_AT"}
    env["PYTHONPATH"] = str(REPO)
    if crash_at:
        env["DINOBATCH_CRASH_AT"] = crash_at
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "dinobatch", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, preexec_fn=preexec)


def current(out) -> dict[str, dict]:
    return {r["path"]: {k: r[k] for k in COMPARED} for r in current_rows(out).to_pylist()}


def _make_folder(root: Path) -> Path:
    for i in range(9):
        save(picture(i), root / f"{i}.png")
    (root / "copy.png").write_bytes((root / "0.png").read_bytes())
    (root / "bad.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)
    return root


@pytest.fixture
def folder(tmp_path):
    return _make_folder(tmp_path / "inbox")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model):
    """One uninterrupted run that every crash test compares with."""
    base = tmp_path_factory.mktemp("crash")
    folder = _make_folder(base / "inbox")
    out = base / "reference"
    assert run_cli(*classify_args(folder, out, tiny_model)).returncode == 0
    return folder, out


def classify_args(folder, out, model):
    return ["classify", folder, "-o", out, "-m", model, "-j", "0", "-b", "2", "-q"]


@pytest.mark.parametrize("point", ["fingerprint:4", "batch:2", "write:3", "rows:1", "before-rows-rename",
                                   "after-rows-rename"])
def test_a_run_killed_anywhere_then_resumed_equals_an_uninterrupted_run(tmp_path, reference, tiny_model, point):
    from dinobatch.store.runs import latest_run

    folder, ref_out = reference
    parts = len(list((ref_out / "_cache").rglob("part-*.parquet")))
    if point == "before-rows-rename":  # the rows file is the commit after every cache part
        point = f"write:{parts + 1}"
    elif point == "after-rows-rename":  # renamed; killed before the first summary is
        point = f"write:{parts + 2}"
    out = tmp_path / "out"
    killed = run_cli(*classify_args(folder, out, tiny_model), crash_at=point)
    assert killed.returncode == -signal.SIGKILL
    if point == f"write:{parts + 2}":  # a complete rows file and no summary: every view agrees on it
        table, summary = latest_run(out)
        assert {r["path"] for r in table.to_pylist()} == set(current(out)) == set(current(ref_out))
        assert summary["config"]["folder"] == str(folder)
    resumed = run_cli(*classify_args(folder, out, tiny_model), "--json")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert current(out) == current(ref_out)
    assert len(pq.read_table(summary["rows_file"])) == 11  # one row per file: none lost, none doubled
    if point == "batch:2":
        assert summary["reused"] == 4  # two committed batches of two were not inferred again


def test_leftover_temporary_files_are_never_read_as_results(tmp_path, folder, tiny_model):
    out = tmp_path / "out"
    run_cli(*classify_args(folder, out, tiny_model), crash_at="rows:1")
    assert list(out.glob(".*.tmp"))  # the half-written rows file is hidden...
    assert not list(out.glob("*.parquet"))  # ...and no visible rows file exists
    assert run_cli(*classify_args(folder, out, tiny_model)).returncode == 0
    assert len(pq.read_table(out)) == 11  # pyarrow's dataset reading skips the hidden leftovers


def test_a_second_run_on_the_same_out_exits_9_naming_the_holder(tmp_path, folder, tiny_model):
    out = tmp_path / "out"
    with exclusive(out / ".lock"):
        busy = run_cli(*classify_args(folder, out, tiny_model), "--wait", "1")
    assert busy.returncode == EXIT_LOCKED
    assert f"pid {os.getpid()}" in busy.stderr and "in use by" in busy.stderr
    assert not list(out.glob("*.parquet"))


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, folder, tiny_model):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1])\n"
                               "from dinobatch.io.lock import exclusive\nwith exclusive(sys.argv[2]):\n"
                               "    print('held', flush=True); time.sleep(60)", str(REPO), str(out / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    assert json.loads((out / ".lock").read_text())["pid"] == holder.pid  # left behind
    after = run_cli("classify", folder, "-o", out, "-m", tiny_model, "-j", "0")
    assert after.returncode == 0 and "taking over the lock" in after.stderr


def test_runs_on_different_outs_do_not_interfere(tmp_path, folder, tiny_model):
    env = {k: v for k, v in os.environ.items()}
    env["PYTHONPATH"] = str(REPO)
    procs = [subprocess.Popen([sys.executable, "-m", "dinobatch", *map(str, classify_args(folder, tmp_path / f"o{i}",
                                                                                          tiny_model))], env=env)
             for i in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert current(tmp_path / "o0") == current(tmp_path / "o1")


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_a_write_that_fails_is_exit_7_and_earlier_results_survive(tmp_path, folder, tiny_model):
    out = tmp_path / "out"
    assert run_cli(*classify_args(folder, out, tiny_model)).returncode == 0
    before = current(out)
    save(picture(50), folder / "new.png")
    full = run_cli(*classify_args(folder, out, tiny_model), "--force", preexec=_limit_file_size)
    assert full.returncode == EXIT_OUTPUT and "cannot write" in full.stderr
    assert current(out) == before
    again = run_cli(*classify_args(folder, out, tiny_model))
    assert again.returncode == 0 and "new.png" in current(out)


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip()}); "
                    f"the RLIMIT_FSIZE test covers failed writes")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_is_a_clear_error_and_a_rerun_after_freeing_space_completes(tmp_path, folder, tiny_model, small_disk):
    out = small_disk / "results"
    assert run_cli(*classify_args(folder, out, tiny_model)).returncode == 0
    before = current(out)
    filler = small_disk / "filler"
    try:  # take what is left
        with open(filler, "wb") as fh:
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
    except OSError:
        pass
    for i in range(3):
        save(picture(60 + i), folder / f"more{i}.png")
    full = run_cli(*classify_args(folder, out, tiny_model))
    assert full.returncode == EXIT_OUTPUT and "No space left on device" in full.stderr
    assert current(out) == before
    filler.unlink()
    again = run_cli(*classify_args(folder, out, tiny_model))
    assert again.returncode == 0 and {"more0.png", "more1.png", "more2.png"} <= set(current(out))


def test_names_that_are_not_utf8_keep_their_bytes_and_export_finds_them(tmp_path, tiny_model):
    root = tmp_path / "inbox"
    root.mkdir()
    raw = b"dino-\xff\xfe.png"
    with open(os.fsencode(str(root)) + b"/" + raw, "wb") as fh:
        picture(3).save(fh, "PNG")
    assert run_cli(*classify_args(root, tmp_path / "out", tiny_model)).returncode == 0
    (row,) = current_rows(tmp_path / "out").to_pylist()
    assert row["path"] == "dino-\\xff\\xfe.png" and row["path_bytes"] == raw and row["status"] == "ok"
    assert run_cli("results", tmp_path / "out", "-o", tmp_path / "cur.jsonl", "-q").returncode == 0
    import base64

    assert base64.b64decode(json.loads((tmp_path / "cur.jsonl").read_text())["path_bytes"]) == raw
    assert run_cli("export", tmp_path / "out", "--to", tmp_path / "sorted", "--min-confidence", "0").returncode == 0
    copied = [p for p in (tmp_path / "sorted").rglob("*") if p.is_file()]
    assert [os.fsencode(p.name) for p in copied] == [raw]


def test_a_file_that_vanishes_mid_run_is_a_row_with_a_reason(tmp_path, folder, tiny_model):
    from dinobatch.jobs.classify import classify
    from dinobatch.config import ClassifyConfig

    def remove_after_hashing(stage, done, total):
        if stage == "fingerprint" and done == total:
            (folder / "3.png").unlink()

    summary = classify(ClassifyConfig(folder=str(folder), out=str(tmp_path / "out"), model=str(tiny_model),
                                      workers=0), remove_after_hashing)
    rows = {r["path"]: r for r in pq.read_table(summary.rows_file).to_pylist()}
    assert rows["3.png"]["status"] == "error" and "No such file" in rows["3.png"]["error"]


@pytest.mark.skipif(not (SHARED_DATA / "weird").is_dir(), reason="../shared/data/weird is not present")
def test_peak_memory_stays_bounded_on_the_awkward_files(tmp_path, tiny_model):
    # a fresh wrapper process, so that its children's peak is this run's (and its workers') alone
    code = ("import resource, subprocess, sys\n"
            "done = subprocess.run([sys.executable, '-m', 'dinobatch', *sys.argv[1:]])\n"
            "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, "classify", str(SHARED_DATA / "weird"), "-o",
                          str(tmp_path / "out"), "-m", str(tiny_model), "-q", "-j", "1"], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    returncode, peak_kib = map(int, out.stdout.split())
    assert returncode == 0
    assert peak_kib / 1024 < 1500, f"peak RSS {peak_kib / 1024:.0f} MiB (torch alone is about 400)"


def test_curate_leaves_the_input_tree_byte_identical(tmp_path, folder, tiny_model):
    before = tree_digest(folder)
    assert run_cli(*classify_args(folder, tmp_path / "out", tiny_model), "--embeddings").returncode == 0
    assert run_cli("curate", tmp_path / "out", "-o", tmp_path / "q", "--html", "-q").returncode == 0
    assert tree_digest(folder) == before


def _two_class_manifest(tmp_path: Path, seed: int) -> Path:
    """tmp_path/m.parquet over two labels of six small generated pictures each."""
    from dinobatch.training.manifest import build_manifest, write_manifest

    data = tmp_path / "data"
    for k, label in enumerate(("a", "b")):
        for i in range(6):
            save(picture(seed * (k + 1) + i, (64, 48)), data / label / f"{i}.png")
    return write_manifest(build_manifest(data, fractions=(0.5, 0.25, 0.25)), tmp_path / "m.parquet", data)


def test_training_killed_after_an_epoch_resumes_to_the_same_model(tmp_path):
    import torch

    from dinobatch.models.file import load_model

    _two_class_manifest(tmp_path, seed=20)
    args = ["train", tmp_path / "m.parquet", "--arch", "resnet18", "--pretrained", "none", "--epochs", "2",
            "--final-epochs", "1", "--image-size", "32", "-b", "4", "-j", "0", "--augment-level", "2", "-q"]
    assert run_cli(*args, "-o", tmp_path / "whole.pt").returncode == 0
    killed = run_cli(*args, "-o", tmp_path / "parts.pt", crash_at="epoch:2")
    assert killed.returncode == -signal.SIGKILL and not (tmp_path / "parts.pt").exists()
    assert run_cli(*args, "-o", tmp_path / "parts.pt", "--resume").returncode == 0
    a, b = load_model(tmp_path / "whole.pt").module.state_dict(), load_model(tmp_path / "parts.pt").module.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_json_logs_and_summary_file_for_monitoring(tmp_path, folder, tiny_model):
    done = run_cli("classify", folder, "-o", tmp_path / "out", "-m", tiny_model, "-j", "0", "--log-format", "json",
                   "--summary-json", tmp_path / "status" / "last.json")
    assert done.returncode == 0
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    assert lines and all({"time", "level", "message"} <= set(x) for x in lines)
    summary = json.loads((tmp_path / "status" / "last.json").read_text())
    assert summary["counts"] == {"ok": 9, "duplicate": 1, "error": 1} and summary["files"] == 11


def test_a_sweep_killed_mid_trial_resumes_without_redoing_finished_trials(tmp_path):
    _two_class_manifest(tmp_path, seed=30)
    args = ["sweep", tmp_path / "m.parquet", "-o", tmp_path / "sweep", "--lr", "0.05,0.01", "--augment-level", "0",
            "--epochs", "2", "--final-epochs", "0", "--arch", "resnet18", "--pretrained", "none", "--image-size", "32",
            "--batch-size", "4", "-j", "0", "-q"]
    killed = run_cli(*args, crash_at="epoch:3")  # trial 1 has finished, trial 2 is one epoch in
    assert killed.returncode == -signal.SIGKILL
    first = pq.read_table(tmp_path / "sweep" / "trials.parquet").to_pylist()
    assert [r["status"] for r in first] == ["ok"]
    assert run_cli(*args).returncode == 0
    rows = pq.read_table(tmp_path / "sweep" / "trials.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert rows[0]["trial"] == first[0]["trial"] and rows[0]["seconds"] == first[0]["seconds"]  # not redone


def test_a_forked_child_of_a_killed_run_does_not_keep_the_output_locked(tmp_path):
    lock = tmp_path / "out" / ".lock"
    code = ("import os, signal, sys, time\nsys.path.insert(0, sys.argv[1])\nfrom dinobatch.io.lock import exclusive\n"
            "with exclusive(sys.argv[2]):\n    pid = os.fork()\n    if pid == 0:\n        time.sleep(30)\n"
            "        os._exit(0)\n    print(pid, flush=True)\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    parent = subprocess.Popen([sys.executable, "-c", code, str(REPO), str(lock)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.wait()
    try:
        os.kill(child, 0)  # the child (think: a DataLoader worker) is still alive...
        with exclusive(lock):  # ...and the lock is free all the same
            pass
    finally:
        os.kill(child, signal.SIGKILL)


def test_an_out_folder_inside_the_input_is_not_scanned_and_leftovers_are_removed(tmp_path, folder, tiny_model):
    out = folder / "results"
    assert run_cli(*classify_args(folder, out, tiny_model)).returncode == 0
    (out / ".stale.parquet.abc.tmp").write_bytes(b"half a file")
    again = run_cli(*classify_args(folder, out, tiny_model), "--json")
    summary = json.loads(again.stdout)
    assert summary["files"] == 11 and not (out / ".stale.parquet.abc.tmp").exists()


def test_each_run_is_newer_than_the_last_and_every_view_agrees(tmp_path, folder, tiny_model):
    from dinobatch.store.runs import latest_run

    out = tmp_path / "out"
    assert run_cli(*classify_args(folder, out, tiny_model)).returncode == 0
    first = latest_run(out)[1]["run_id"]
    save(picture(70), folder / "later.png")
    assert run_cli(*classify_args(folder, out, tiny_model)).returncode == 0
    table, summary = latest_run(out)
    assert summary["run_id"] > first and "later.png" in set(current(out)) == set(table["path"].to_pylist())
