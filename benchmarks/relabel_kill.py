"""SIGKILL relabel at every system call by which it writes into the dataset folder, then rerun it:
the new version and its audit lines must be both or neither, and the rerun must finish the work.

    .venv/bin/python benchmarks/relabel_kill.py [--rows 2000] [--decisions 1847] [--every 1] [--baseline REF]
                                                [--fault-points]

The family starts with m.parquet, m.v2.parquet and an audit log of 100 lines; the run under test
applies --decisions decisions to m.parquet (writing m.v3.parquet). A first run under strace lists
every openat (for writing), write, pwrite64, ftruncate, fsync, fdatasync, rename, renameat2, link,
linkat, unlink and unlinkat of the dinobatch process that touches the dataset folder; then, for each
one (or every --every'th), a fresh copy is relabelled under
`strace -e inject=SYSCALL:signal=SIGKILL:when=N`, which kills the process as it enters that call.
After each kill: the state (neither; both; a version that carries lines the log lacks yet) or the
violation (a version without its audit, part of the audit, audit lines without their version); then
a rerun (plain, no strace) must exit 0 with exactly one new version, every decision in the log once
and in that version, no .tmp file left, and the earlier files untouched.

Without strace (or where ptrace is not allowed) it says so and falls back to the DINOBATCH_CRASH_AT
points of dinobatch/runtime/faults.py that relabel passes (write:N, relabel:1:published). --baseline REF
runs the same on REF's dinobatch, e.g. --baseline 34317db (the code before the fix).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from relabel_common import (code_env, code_under_test, fresh_copy, labels_of, leftovers, make_dataset, read_audit,
                            relabel_command, versions, write_decisions)

SYSCALLS = ("openat", "write", "pwrite64", "ftruncate", "fsync", "fdatasync", "rename", "renameat2", "link",
            "linkat", "unlink", "unlinkat")
FD_CALLS = {"write", "pwrite64", "ftruncate", "fsync", "fdatasync"}
FAULT_POINTS = ("write:1", "write:2", "write:3", "relabel:1:published")
_LINE = re.compile(r"^(\d+) +(\w+)\((.*)$")
_RANDOM = re.compile(r"\.[0-9a-z_]{8}\.tmp")  # mkstemp's and the staging file's random parts
_SHOWN = 64  # characters of a call's arguments compared: the file and the first bytes written


@dataclass(frozen=True)
class Call:
    syscall: str
    number: int  # its count among this process's calls of that syscall: strace's when=
    shown: str  # the call as strace showed it, random names normalised

    @property
    def name(self) -> str:
        return f"{self.syscall}#{self.number}"


@dataclass
class Tally:
    counts: collections.Counter = field(default_factory=collections.Counter)
    problems: list[str] = field(default_factory=list)
    partial: list[int] = field(default_factory=list)  # audit lines in the log after kills that broke the rule


def strace_works() -> str | None:
    """Why strace cannot be used here, or None."""
    if shutil.which("strace") is None:
        return "strace is not installed (apt-get update && apt-get install -y strace)"
    probe = subprocess.run(["strace", "-f", "-qq", "-e", "trace=none", "true"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"strace does not work here: {probe.stderr.strip()[:200]}"


def strace_command(log: Path, inject: Call | None) -> list[str]:
    # not --seccomp-bpf: strace 6.1 injects nothing with it
    cmd = ["strace", "-f", "-qq", "-y", "-e", f"trace={','.join(SYSCALLS)}", "-o", str(log)]
    if inject is not None:
        cmd += ["-e", f"inject={inject.syscall}:signal=SIGKILL:when={inject.number}"]
    return cmd


def touches(folder: str, syscall: str, args: str) -> bool:
    """Whether one strace line is a call that writes into folder."""
    if syscall in FD_CALLS:
        return re.match(rf"\d+<{re.escape(folder)}[/>]", args) is not None
    if syscall == "openat" and not re.search(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC", args):
        return False
    return f'"{folder}/' in args


def calls_in(log: Path, folder: Path) -> tuple[list[Call], int]:
    """The writing calls of the first process into folder, in order; and how many other threads made."""
    seen: collections.Counter = collections.Counter()
    calls, others, main = [], 0, None
    for line in log.read_text(errors="replace").splitlines():
        m = _LINE.match(line)
        if not m or "resumed>" in line:
            continue
        pid, syscall, args = m.groups()
        main = main or pid
        seen[(pid, syscall)] += 1
        if touches(str(folder), syscall, args):
            if pid != main:
                others += 1
                continue
            calls.append(Call(syscall, seen[(pid, syscall)], _shown(args)))
    return calls, others


def _shown(args: str) -> str:
    """A call's arguments as compared between runs: random names, numbers (pids, times), results left out."""
    args = re.sub(r"(\) += .*| <unfinished \.\.\.>)$", "", args)
    return re.sub(r"\d+", "N", _RANDOM.sub(".RAND.tmp", args))[:_SHOWN]


def injected(log: Path, syscall: str) -> str | None:
    """The call strace killed the process at (its result shows as '= ?'), as Call.shown spells it."""
    hit, entered = None, {}
    resumed = re.compile(rf"^(\d+) +<\.\.\. {syscall} resumed>")
    for line in log.read_text(errors="replace").splitlines():
        m = _LINE.match(line)
        if m and m.group(2) == syscall:
            entered[m.group(1)] = m.group(3)  # a call another thread's output interrupted shows '<unfinished ...>'
        if line.rstrip().endswith("= ?"):
            pid = m.group(1) if m and m.group(2) == syscall else (r.group(1) if (r := resumed.match(line)) else None)
            if pid in entered:
                hit = _shown(entered[pid])
    return hit


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def after_kill(folder: Path, before: int, decisions: dict[str, str], tally: Tally, what: str) -> None:
    """Classify the state a kill left: both or neither (or a version carrying its own lines), or a violation."""
    v3 = folder / "m.v3.parquet"
    new_lines = len(read_audit(folder)) - before
    carried = 0
    if v3.exists():
        from dinobatch.curation.audit import lines_of, record_of

        record = record_of(v3)
        carried = len(lines_of(record)) if record else 0
    if not v3.exists() and new_lines == 0:
        state = "neither"
    elif v3.exists() and new_lines == len(decisions):
        state = "both"
    elif v3.exists() and new_lines == 0 and carried == len(decisions):
        state = "version carrying its lines (the rerun logs them)"
    else:
        state = ("VIOLATION: audit lines without their version" if not v3.exists() else
                 "VIOLATION: version without its audit lines" if new_lines == 0 else
                 "VIOLATION: version with part of its audit lines")
        tally.partial.append(new_lines)
        tally.problems.append(f"{what}: {state} ({new_lines} of {len(decisions)} in the log)")
    tally.counts[state] += 1
    tally.counts["kills leaving .tmp files"] += bool(leftovers(folder))


def after_rerun(folder: Path, rerun: subprocess.CompletedProcess, before: int, decisions: dict[str, str],
                untouched: dict[str, str], tally: Tally, what: str) -> None:
    """Check that the rerun finished the work: one version, each decision logged once and held."""
    audit = read_audit(folder)[before:]
    made = [v.name for v in versions(folder)]
    v3 = folder / "m.v3.parquet"
    held = labels_of(v3) if v3.exists() else {}
    logged = collections.Counter(a["path"] for a in audit)
    checks = {
        "rerun exit 0": rerun.returncode == 0,
        "exactly one new version": made == ["m.v2.parquet", "m.v3.parquet"],
        "each decision logged once": logged == collections.Counter(decisions.keys()),
        "log and version agree": all(a["new_manifest"] == str(v3) and held.get(a["path"]) == a["new_label"]
                                     for a in audit),
        "every decision in the version": all(held.get(p) == label for p, label in decisions.items()),
        "no .tmp left": not leftovers(folder),
        "earlier files untouched": all(sha(folder / name) == digest for name, digest in untouched.items()),
    }
    for check, ok in checks.items():
        tally.counts[check] += ok
        if not ok:
            tally.problems.append(f"{what}: rerun fails '{check}' (exit {rerun.returncode}, versions {made}, "
                                  f"{len(audit)} new lines; {rerun.stderr.strip()[-160:]})")
    tally.counts["decisions lost"] += sum(held.get(p) != label for p, label in decisions.items())
    tally.counts["decisions logged twice"] += sum(n > 1 for n in logged.values())


def trial(template: Path, folder: Path, code: Path, kill: list[str], env: dict[str, str], decisions, before,
          untouched, tally: Tally, what: str) -> subprocess.CompletedProcess:
    """One kill and its rerun on a fresh copy; the killed run's result."""
    fresh_copy(template, folder)
    killed = subprocess.run([*kill, *relabel_command(folder, "d.csv")], env=env, cwd=code, capture_output=True,
                            text=True, timeout=300)
    after_kill(folder, before, decisions, tally, what)
    rerun = subprocess.run(relabel_command(folder, "d.csv"), env=code_env(code), cwd=code, capture_output=True,
                           text=True, timeout=300)
    after_rerun(folder, rerun, before, decisions, untouched, tally, what)
    return killed


def with_strace(name: str, code: Path, template: Path, scratch: Path, args, decisions, before, untouched) -> None:
    folder = scratch / "trial"
    fresh_copy(template, folder)
    log = scratch / "dry.strace"
    subprocess.run([*strace_command(log, None), *relabel_command(folder, "d.csv")], env=code_env(code), cwd=code,
                   capture_output=True, check=True, timeout=300)
    calls, others = calls_in(log, folder)
    kinds = collections.Counter(c.syscall for c in calls)
    by_kind = ", ".join(f"{k} {v}" for k, v in kinds.items())
    print(f"{name}: {len(calls)} calls write into the dataset folder ({by_kind})"
          + (f"; {others} more by other threads, not targeted" if others else ""), flush=True)
    tally, t0 = Tally(), time.monotonic()
    for call in calls[::args.every]:
        kill_log = scratch / "kill.strace"
        killed = trial(template, folder, code, strace_command(kill_log, call), code_env(code), decisions, before,
                       untouched, tally, call.name)
        hit = injected(kill_log, call.syscall)
        tally.counts["kills"] += 1
        tally.counts["killed at the intended call"] += hit == call.shown
        if hit != call.shown:
            tally.problems.append(f"{call.name}: meant {call.shown[:80]!r}, killed at {hit and hit[:80]!r} "
                                  f"(exit {killed.returncode})")
    report(name, tally, time.monotonic() - t0)


def with_fault_points(name: str, code: Path, template: Path, scratch: Path, decisions, before, untouched) -> None:
    tally, t0 = Tally(), time.monotonic()
    for point in FAULT_POINTS:
        killed = trial(template, scratch / "trial", code, [], code_env(code, DINOBATCH_CRASH_AT=point), decisions,
                       before, untouched, tally, point)
        tally.counts["kills"] += killed.returncode == -9
        tally.counts[f"points not reached ({', '.join(FAULT_POINTS)})"] += killed.returncode != -9
    report(name, tally, time.monotonic() - t0)


def report(name: str, tally: Tally, seconds: float) -> None:
    print(f"{name}: {seconds:.0f} s", flush=True)
    first = ["kills", "killed at the intended call", "neither", "both",
             "version carrying its lines (the rerun logs them)"]
    violations = sorted(k for k in tally.counts if k.startswith("VIOLATION"))
    keys = [*first, *violations, *[k for k in tally.counts if k not in first and k not in violations]]
    for key in (k for k in keys if k in tally.counts):
        print(f"  {key:<55} {tally.counts[key]}")
    if tally.partial:
        print(f"  {'audit lines in the log after those violations':<55} {min(tally.partial)} to {max(tally.partial)}")
    for problem in tally.problems[:12]:
        print(f"  ! {problem}")
    if len(tally.problems) > 12:
        print(f"  ! and {len(tally.problems) - 12} more")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--decisions", type=int, default=1847)
    parser.add_argument("--every", type=int, default=1, help="kill at every Nth writing call only")
    parser.add_argument("--baseline", default=None, help="a git ref whose dinobatch to kill as the baseline")
    parser.add_argument("--fault-points", action="store_true", help="use the DINOBATCH_CRASH_AT points, not strace")
    args = parser.parse_args()
    why_not = "--fault-points asked for" if args.fault_points else strace_works()
    print(f"strace: {'fault injection at every writing system call' if why_not is None else why_not}")
    if why_not:
        print(f"falling back to the DINOBATCH_CRASH_AT points {', '.join(FAULT_POINTS)}: far fewer moments")
    with tempfile.TemporaryDirectory(prefix="relabel-kill-") as tmp:
        scratch = Path(tmp)
        template = scratch / "template"
        make_dataset(template, args.rows)
        write_decisions(template / "d0.csv", range(args.rows - 100, args.rows), note="an earlier review")
        first = subprocess.run(relabel_command(template, "d0.csv"), env=code_env(code_under_test(None, scratch)),
                               capture_output=True, text=True)
        assert first.returncode == 0, first.stderr
        decisions = write_decisions(template / "d.csv", range(args.decisions))
        before = len(read_audit(template))
        untouched = {n: sha(template / n) for n in ("m.parquet", "m.v2.parquet", "d.csv")}
        runs = [(args.baseline, code_under_test(args.baseline, scratch))] if args.baseline else []
        runs.append(("this tree", code_under_test(None, scratch)))
        for name, code in runs:
            if why_not is None:
                with_strace(name, code, template, scratch, args, decisions, before, untouched)
            else:
                with_fault_points(name, code, template, scratch, decisions, before, untouched)


if __name__ == "__main__":
    main()
