"""Start two and three relabels of one manifest at the same moment; count decisions lost.

    .venv/bin/python benchmarks/relabel_race.py [--trials 20] [--rows 2000] [--per-run 50] [--baseline REF]

Each trial copies a fresh manifest (--rows rows) and starts K relabels together (imports done, each
waits for the same instant, then runs the command line), each moving its own
--per-run rows to another label. A decision is lost when its run exited 0 but the version its audit
lines name does not hold it (or no audit line names it); the audit disagrees with a version when a
line's new label is not what that version holds. Runs are tried with --wait 0 (the second exits 9,
writing nothing) and with --wait 120 (they queue). --baseline REF runs the same trials, in the same
process, on REF's dinobatch (without --wait, which it may not have), e.g. --baseline 34317db.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

START_S = 4.0  # from launch to the common start: the imports of three runs fit well within it

from relabel_common import (code_env, code_under_test, fresh_copy, labels_of, make_dataset, read_audit,
                            relabel_command, write_decisions)


def trial(template: Path, folder: Path, code: Path, runs: int, per_run: int, wait: list[str]) -> dict[str, int]:
    """One race of `runs` relabels; its counts."""
    fresh_copy(template, folder)
    wanted = [write_decisions(folder / f"d{j}.csv", range(j * per_run, (j + 1) * per_run)) for j in range(runs)]
    at = time.time() + START_S
    procs = [subprocess.Popen(relabel_command(folder, f"d{j}.csv", *wait, at=at), env=code_env(code), cwd=code,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for j in range(runs)]
    codes = [p.wait(timeout=300) for p in procs]
    for p in procs:
        p.stderr.close()
    audit = read_audit(folder)
    held: dict[str, dict[str, str]] = {}

    def holding(version: str) -> dict[str, str]:
        if version not in held:
            held[version] = labels_of(Path(version)) if Path(version).exists() else {}
        return held[version]

    counts = {"exit 0": codes.count(0), "exit 9": codes.count(9), "other exit": sum(c not in (0, 9) for c in codes),
              "lost": 0, "disagree": sum(holding(a["new_manifest"]).get(a["path"]) != a["new_label"] for a in audit),
              "written by a refused run": 0}
    for code, decisions in zip(codes, wanted):
        lines = {a["path"]: a for a in audit if a["path"] in decisions}
        if code == 0:
            counts["lost"] += sum(p not in lines or holding(lines[p]["new_manifest"]).get(p) != label
                                  for p, label in decisions.items())
        else:
            counts["written by a refused run"] += len(lines)
    return counts


def measure(name: str, code: Path, template: Path, scratch: Path, args, wait_modes) -> None:
    for runs in (2, 3):
        for label, wait in wait_modes:
            total: dict[str, int] = {}
            trials_losing = 0
            t0 = time.monotonic()
            for t in range(args.trials):
                counts = trial(template, scratch / "trial", code, runs, args.per_run, wait)
                trials_losing += counts["lost"] > 0 or counts["disagree"] > 0
                for k, v in counts.items():
                    total[k] = total.get(k, 0) + v
            print(f"{name:<10} {runs} at once  {label:<10} {args.trials:>3} trials: "
                  f"runs exit 0 {total['exit 0']:>3}, exit 9 {total['exit 9']:>3}, other {total['other exit']}; "
                  f"trials losing a decision {trials_losing:>2}/{args.trials}; decisions lost {total['lost']:>4} "
                  f"of {args.trials * runs * args.per_run}; audit lines a version contradicts {total['disagree']:>4}; "
                  f"lines by refused runs {total['written by a refused run']}  ({time.monotonic() - t0:.0f} s)",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--per-run", type=int, default=50)
    parser.add_argument("--baseline", default=None, help="a git ref whose dinobatch to race as the baseline")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="relabel-race-") as tmp:
        scratch = Path(tmp)
        template = scratch / "template"
        make_dataset(template, args.rows)
        if args.baseline:
            measure(args.baseline[:10], code_under_test(args.baseline, scratch), template, scratch,
                    args, [("no wait", [])])
        code = code_under_test(None, scratch)
        measure("this tree", code, template, scratch, args, [("--wait 0", []), ("--wait 120", ["--wait", "120"])])


if __name__ == "__main__":
    main()
