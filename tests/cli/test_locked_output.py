"""A run on an output another run holds exits 9 at once: before the model is resolved and loaded and
before torch is imported (seconds on a cold start), and still holds the lock for its whole run."""

from __future__ import annotations

import subprocess
import sys

from dinobatch.errors import EXIT_LOCKED
from dinobatch.io.lock import exclusive
from dinobatch.store.results import ResultsDir
from tests.helpers import REPO, picture, save

_RUN = ("import sys\nfrom dinobatch.cli import main\nsys.argv = ['dinobatch', 'classify'] + sys.argv[1:]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', code)")


def test_a_locked_output_is_refused_before_the_model_and_torch_are_loaded(tmp_path):
    save(picture(0), tmp_path / "in" / "a.png")
    out = ResultsDir(tmp_path / "out")
    out.ensure()
    with exclusive(out.path / ".lock"):
        # a model that does not exist: before, the run failed on it (exit 4) after importing torch
        run = subprocess.run([sys.executable, "-c", _RUN, str(tmp_path / "in"), "-o", str(out.path),
                              "-m", str(tmp_path / "no-such-model.pt")],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.stdout.split() == ["NO-TORCH", str(EXIT_LOCKED)], run.stdout + run.stderr
    assert "in use by" in run.stderr
    assert not list(out.path.glob("*.parquet"))
