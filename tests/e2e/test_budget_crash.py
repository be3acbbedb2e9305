"""A decode worker killed while it holds a share of the decode budget does not hang classify.

The budget is shared by a pool's workers; one killed while holding a share (a segfaulting decoder,
or the OOM killer picking the process that decodes the largest image) never gives it back, so a
worker waiting for budget waits for ever. Burst workers ignore SIGTERM (the parent decides how to
stop), so the broken pool's own terminate() could not end that worker, and Python's exit, which
joins the pool's manager thread, hung: the run printed its results and never exited.
"""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO

_SCRIPT = """
import os, signal, sys, time
import numpy as np
import torch  # as in classify: the workers inherit it, so they start at once
from dinobatch.imaging import decode_budget
from dinobatch.runtime.burst import burst_batches

HELD, WAITING = sys.argv[1] + ".held", sys.argv[1] + ".waiting"

def wait_for(path):
    while not os.path.exists(path):
        time.sleep(0.01)

class Dataset:
    # two items in two workers: 0 takes the whole budget and dies holding it; 1 then asks for some
    crop = 8
    def failed(self, index, reason):
        return {"sha256": str(index), "error": reason, "changed": ()}
    def __len__(self):
        return 2
    def cost(self, index):
        return 2 - index
    def model_input_hwc(self, image):
        return image
    def record(self, index, prepare):
        if index == 0:
            with decode_budget.hold(1 << 40):
                open(HELD, "w").close()
                wait_for(WAITING)  # the other worker has started (and ignores SIGTERM)
                os.kill(os.getpid(), signal.SIGKILL)
        open(WAITING, "w").close()
        wait_for(HELD)
        with decode_budget.hold(1000):
            return {"sha256": "1", "error": None, **prepare(np.zeros((8, 8, 3), np.uint8))}

records = [r for rs, _ in burst_batches(Dataset(), 2, 2) for r in rs]
print([bool(r["error"]) for r in records], flush=True)
"""


def test_a_worker_killed_holding_decode_budget_does_not_hang_the_run(tmp_path):
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path / "mark")], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[True, False]"  # the killed file's error; the waiting one decoded
