"""A decoder crash while a big file or decode holds scan's one-at-a-time gate does not hang the run.

The gate is a lock shared by the pool's workers; a worker killed while holding it (SIGKILL here,
a segfaulting decoder or the OOM killer in life) never releases it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow.parquet as pq

from dinobatch.engines.local_scan import HEAVY_BYTES
from dinobatch.runtime import faults
from tests.helpers import REPO, picture, save


def test_scan_finishes_after_a_worker_dies_holding_the_heavy_gate(tmp_path):
    root = tmp_path / "inbox"
    for i in range(4):
        save(picture(i), root / f"photo{i}.png")
    (root / "poison.png").write_bytes(b"\0" * (HEAVY_BYTES + 1))  # read under the gate
    env = {**os.environ, faults.ENV: "decode:1:poison"}
    out = tmp_path / "scan.parquet"
    done = subprocess.run([sys.executable, "-m", "dinobatch", "scan", str(root), "-o", str(out), "-j", "2", "-q"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rows = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    assert "decoder crashed" in rows["poison.png"]["error"]
    assert all(rows[f"photo{i}.png"]["status"] == "ok" for i in range(4))
