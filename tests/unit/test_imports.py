"""What importing dinobatch costs: the torch-free packages import without torch, and no module does work on import."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

# stages: torch only inside the functions that run a model or hand bytes to the device, so that a cluster's
# CPU tasks (decode, fingerprint, group, rows) and the CLI's help import them without it
TORCH_FREE = ("dinobatch.io", "dinobatch.imaging", "dinobatch.dedupe", "dinobatch.store", "dinobatch.stages")

# Run in a fresh interpreter: a finder first on sys.meta_path makes torch and torchvision unimportable,
# then every module of the packages named in argv is imported; prints {module: error} as JSON.
_WITHOUT_TORCH = """
import importlib, importlib.abc, json, pkgutil, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ImportError(f"torch is not installed here (import of {name})")
        return None

sys.meta_path.insert(0, NoTorch())
failed = {}
for package in sys.argv[1:]:
    names = [package]
    if package != "dinobatch.cli.main":
        names += [m.name for m in pkgutil.iter_modules(importlib.import_module(package).__path__, package + ".")]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:
            failed[name] = f"{type(exc).__name__}: {exc}"
if not failed:
    from click.testing import CliRunner
    from dinobatch.cli.main import cli
    for args in (["--help"], *([name, "--help"] for name in cli.commands)):
        result = CliRunner().invoke(cli, args)
        if result.exit_code != 0 or "Usage:" not in result.output:
            failed[" ".join(args)] = repr(result.exception) or result.output
print(json.dumps(failed))
"""


def _python(code: str, *args: str, cwd=REPO, env: dict[str, str] | None = None) -> str:
    """stdout of `python -c code args...` run from cwd with the repository importable."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_torch_free_packages_and_the_help_import_without_torch():
    failed = json.loads(_python(_WITHOUT_TORCH, *TORCH_FREE, "dinobatch.cli.main"))
    assert failed == {}, "imports torch at module level (or fails without it):\n" + "\n".join(
        f"  {name}: {why}" for name, why in failed.items())


def test_a_module_that_imports_torch_is_caught(tmp_path):
    # the check above must be able to fail: a package of the same shape whose module imports torch
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "fine.py").write_text("import json\n")
    (tmp_path / "pkg" / "heavy.py").write_text("import torch\n")
    code = _WITHOUT_TORCH.replace("if not failed:", "if False:")
    failed = json.loads(_python(code, "pkg", env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}))
    assert set(failed) == {"pkg.heavy"} and "torch is not installed" in failed["pkg.heavy"]


_IMPORT_EVERYTHING = """
import importlib, json, os, pkgutil, threading
import dinobatch
names = [m.name for m in pkgutil.walk_packages(dinobatch.__path__, "dinobatch.") if m.name != "dinobatch.__main__"]
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": len(names), "threads": [t.name for t in threading.enumerate()], "cwd": os.listdir(".")}))
"""


@pytest.mark.slow
def test_importing_every_module_starts_no_thread_and_writes_no_file(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    env = {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "TORCH_HOME": str(home / "torch")}
    seen = json.loads(_python(_IMPORT_EVERYTHING, cwd=work, env=env))
    assert seen["modules"] > 40
    assert seen["threads"] == ["MainThread"]
    assert seen["cwd"] == [] and list(home.rglob("*")) == []
