"""Shared by relabel_race.py and relabel_kill.py: a synthetic manifest (relabel never opens the
images, so none are made), decisions files, the code under test (this checkout, or a git ref
extracted for a baseline), and readers of what a relabel left behind."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

LABELS = ("stegosaurus", "triceratops", "velociraptor", "ankylosaurus")


def make_dataset(folder: Path, rows: int) -> Path:
    """folder/m.parquet with `rows` rows over folder/data (an empty folder: nothing reads the images)."""
    import pyarrow as pa

    from dinobatch.training.manifest import write_manifest
    from dinobatch.schema import manifest_schema

    (folder / "data").mkdir(parents=True)
    table = pa.Table.from_pylist(
        [{"path": f"{LABELS[i % len(LABELS)]}/{i:05d}.png", "label": LABELS[i % len(LABELS)], "split": "train",
          "status": "ok"} for i in range(rows)], schema=manifest_schema())
    write_manifest(table, folder / "m.parquet", folder / "data")
    return folder / "m.parquet"


def moved(i: int) -> tuple[str, str]:
    """Row i's path and the label a decision moves it to."""
    label = LABELS[i % len(LABELS)]
    return f"{label}/{i:05d}.png", LABELS[(i + 1) % len(LABELS)]


def write_decisions(path: Path, rows: range, note: str = "seen in review") -> dict[str, str]:
    """A decisions CSV relabelling `rows`; the new label of each path."""
    wanted = dict(moved(i) for i in rows)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "action", "label", "note"])
        writer.writerows([p, "relabel", label, note] for p, label in wanted.items())
    return wanted


def code_under_test(ref: str | None, scratch: Path) -> Path:
    """The folder to put on PYTHONPATH: this checkout, or `ref`'s dinobatch package extracted."""
    if ref is None:
        return REPO
    target = scratch / f"code-{ref.replace('/', '_')}"
    target.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "dinobatch"], check=True,
                             capture_output=True).stdout
    with tempfile.TemporaryFile() as fh:
        fh.write(archive)
        fh.seek(0)
        with tarfile.open(fileobj=fh) as tar:
            tar.extractall(target)
    return target


# Imports done, wait for a common moment, then run the command line: the races start together
# instead of a Python start-up apart.
_AT = ("import runpy, sys, time\n"
       "import pyarrow.parquet, dinobatch.cli, dinobatch.cli.curation, dinobatch.curation.relabel, dinobatch.training.manifest\n"
       "at = float(sys.argv.pop(1))\n"
       "time.sleep(max(0.0, at - time.time()))\n"
       "runpy.run_module('dinobatch', run_name='__main__', alter_sys=True)\n")


def relabel_command(folder: Path, decisions: str, *extra: str, at: float | None = None) -> list[str]:
    """dinobatch relabel of folder/m.parquet; with `at`, started at that time.time() exactly."""
    start = [sys.executable, "-m", "dinobatch"] if at is None else [sys.executable, "-c", _AT, repr(at)]
    return [*start, "relabel", str(folder / decisions), "--manifest", str(folder / "m.parquet"), "--user", "bench",
            "-q", *extra]


def code_env(code: Path, **extra: str) -> dict[str, str]:
    """The environment of a run of `code` (start it with cwd=code too: `python -m` looks there first)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DINOBATCH_")}
    return {**env, "PYTHONPATH": str(code), **extra}


def read_audit(folder: Path) -> list[dict[str, str]]:
    path = folder / "m.audit.csv"
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def labels_of(version: Path) -> dict[str, str]:
    import pyarrow.parquet as pq

    table = pq.read_table(version, columns=["path", "label"])
    return dict(zip(table["path"].to_pylist(), table["label"].to_pylist()))


def versions(folder: Path) -> list[Path]:
    return sorted(folder.glob("m.v*.parquet"), key=lambda p: int(p.name[3:].split(".")[0]))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def fresh_copy(template: Path, where: Path) -> Path:
    if where.exists():
        shutil.rmtree(where)
    shutil.copytree(template, where, symlinks=True)
    return where
