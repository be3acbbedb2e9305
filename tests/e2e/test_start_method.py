"""classify -j and train -j work whatever multiprocessing's default start method is.

Their DataLoader workers must be forked: each installs a decode budget made of fork-context locks
and dies with the run through die_with_parent, which takes a parent other than the run for a sign
that the run is gone. The default is fork on Linux only up to Python 3.13 (forkserver from 3.14,
spawn on macOS): there the budget could not be handed over (a traceback) and every worker of a
forkserver exited at once (the run failed).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq

from tests.helpers import REPO, picture, save

_UNDER_FORKSERVER = textwrap.dedent("""
    import multiprocessing, sys
    multiprocessing.set_start_method("forkserver")
    from dinobatch.cli import cli
    cli(sys.argv[1:])
""")


def _dinobatch(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _UNDER_FORKSERVER, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_classify_and_train_with_loader_workers_under_a_forkserver_default(tmp_path, tiny_model):
    for label in ("a", "b"):
        for i in range(6):
            save(picture(i + (100 if label == "b" else 0)), tmp_path / "data" / label / f"{i}.png")
    classified = _dinobatch("classify", tmp_path / "data", "-o", tmp_path / "out", "-m", tiny_model, "-j", "2",
                            "-b", "2", "-q", "--json")
    assert classified.returncode == 0, classified.stderr
    rows = pq.read_table(json.loads(classified.stdout)["rows_file"]).to_pylist()
    assert len(rows) == 12 and {r["status"] for r in rows} == {"ok"}
    made = _dinobatch("manifest", tmp_path / "data", "-o", tmp_path / "m.parquet", "-q")
    assert made.returncode == 0, made.stderr
    trained = _dinobatch("train", tmp_path / "m.parquet", "-o", tmp_path / "m.pt", "--arch", "resnet18", "--pretrained",
                         "none", "--epochs", "1", "--image-size", "32", "-b", "4", "-j", "2", "-q")
    assert trained.returncode == 0, trained.stderr
    assert (tmp_path / "m.pt").is_file()
