"""Output identity: `classify` and `scan` rows of this checkout against another tree's, value by value.

    git archive afa20f1 dinobatch | (mkdir -p .base && tar -x -C .base)    # the tree before the change
    .venv/bin/python benchmarks/identity.py .base [--data ../shared/data] [--model FILE] [--out /tmp/identity]

Each tree runs, in its own interpreter (its package first on PYTHONPATH, as benchmarks/ab.py does),
`python -m dinobatch classify DATA -m MODEL --embeddings` into a fresh folder and then again into the
same folder (an incremental rerun: nothing new to infer), and `python -m dinobatch scan DATA` twice.
The baseline runs first. Every run has the same thread count (OMP_NUM_THREADS=--threads) and the
same -j, so float columns can be compared bit for bit.

Compared, for each pair of runs (baseline vs this checkout): the rows (a classify run's rows file,
which holds the current rows of its one model; the scan file), sorted by path, every column except
the EXCLUDED ones, value by value (Arrow equality; floats, also inside lists, by their bits); the row
order as written; the Parquet schema (names, types, nullability, field metadata); and the file's
key-value metadata (every key, every value except EXCLUDED_METADATA). Exits 1 on any difference.

Without --model, a randomly initialised ResNet18 (seed 0) with manifests/species.csv's labels and
a 64/56 preprocessing is written with this checkout's model-file API, and the baseline is checked
to load it; speed does not matter here, only that both trees read the same weights.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ab import REPO, SPECIES, dinobatch, tree_env  # noqa: E402  (benchmarks/ is not a package)

# Columns that differ between any two runs, whatever the code: why each is left out.
EXCLUDED = {"run_id": "names the run that wrote the row (UTC start time + random suffix): new every run"}
# mtime is kept: it is the input file's modification time, the same for both trees.
EXCLUDED_METADATA: dict[str, str] = {}  # no key holds a run id or a time today; listed here if one does
# What a run's summary says it did, compared too; its times, rates, config and error list are left out.
SUMMARY_FACTS = ("files", "counts", "duplicate_groups", "inferred", "reused")


@dataclass
class Outcome:
    """One comparison's figures: what was compared and what differed (with a first example each)."""

    name: str
    facts: dict
    rows: int = 0
    columns: int = 0
    differences: list[str] = field(default_factory=list)


def make_model(path: Path, tree: Path) -> Path:
    """A random ResNet18 over species.csv's labels, written by the model-file API of tree (this checkout)."""
    import torch

    sys.path.insert(0, str(tree))
    from dinobatch.models.file import ModelSpec, Preprocessing, build_module, save_model

    with SPECIES.open(newline="") as f:
        labels = tuple(row["label"] for row in csv.DictReader(f))
    torch.manual_seed(0)
    spec = ModelSpec(arch="resnet18", labels=labels, preprocessing=Preprocessing(resize=64, crop=56),
                     source={"kind": "benchmark", "note": "random weights, seed 0"})
    save_model(path, spec, build_module("resnet18", len(labels)).state_dict())
    return path


def check_loads(tree: Path, model: Path) -> None:
    """The baseline must read the model file as this checkout wrote it, or nothing below means anything."""
    code = ("import sys\ntry:\n    from dinobatch.models.file import load_model\nexcept ImportError:\n"
            "    from dinobatch.model import load_model\nm = load_model(sys.argv[1])\n"
            "print(m.spec.arch, len(m.spec.labels), m.spec.preprocessing.resize, m.spec.preprocessing.crop)")
    done = subprocess.run([sys.executable, "-c", code, str(model)], env=tree_env(tree, 1),
                          cwd=tempfile.gettempdir(), capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{tree} cannot load {model}:\n{done.stderr[-3000:]}")
    print(f"model {model}: {done.stdout.strip()} (loaded by {tree})")


@dataclass(frozen=True)
class Run:
    """One command's output: its Parquet file and its summary's facts (SUMMARY_FACTS only)."""

    rows: Path
    facts: dict


def run(tree: Path, args: list[str], rows: Path | None, *, threads: int) -> tuple[Run, float]:
    """One `dinobatch ARGS` by tree; rows None: the one rows file it added to its -o folder. Wall seconds too."""
    out = Path(args[args.index("-o") + 1])
    before = set(out.glob("[!._]*.parquet")) if rows is None else set()
    fd, name = tempfile.mkstemp(prefix="identity-summary-", suffix=".json")
    os.close(fd)
    summary = Path(name)
    wall = dinobatch(tree, [*args, "--summary-json", str(summary)], threads)
    facts = {k: v for k, v in json.loads(summary.read_text()).items() if k in SUMMARY_FACTS}
    summary.unlink()
    if rows is None:
        new = sorted(set(out.glob("[!._]*.parquet")) - before)
        if len(new) != 1:
            sys.exit(f"expected one new rows file in {out}, found {[q.name for q in new]}")
        rows = new[0]
    return Run(rows, facts), wall


def runs_of(tree: Path, out: Path, *, data: Path, model: Path, classify_extra: list[str], scan_extra: list[str],
            threads: int) -> tuple[list[Run], float, float]:
    """classify fresh, classify rerun (nothing new), scan, scan again (it keeps no cache): runs, seconds of each."""
    args = ["classify", str(data), "-o", str(out / "classify"), "-m", str(model), "--species", str(SPECIES), "-q",
            *classify_extra]
    fresh, w1 = run(tree, args, None, threads=threads)
    rerun, w2 = run(tree, args, None, threads=threads)
    scans = [run(tree, ["scan", str(data), "-o", str(out / f"scan-{i}.parquet"), "-q", *scan_extra],
                 out / f"scan-{i}.parquet", threads=threads) for i in (1, 2)]
    return [fresh, rerun, *(r for r, _ in scans)], w1 + w2, sum(w for _, w in scans)


def upgrade_rerun(tree: Path, baseline_out: Path, out: Path, *, data: Path, model: Path, extra: list[str],
                  threads: int) -> Run:
    """tree reruns classify on a copy of the baseline's results folder: as a nightly job after an upgrade."""
    shutil.copytree(baseline_out / "classify", out / "classify")
    args = ["classify", str(data), "-o", str(out / "classify"), "-m", str(model), "--species", str(SPECIES), "-q",
            *extra]
    return run(tree, args, None, threads=threads)[0]


def _bits(a: pa.Array) -> pa.Array:
    """A float array as same-width integers (nulls as 0), so -0.0 != 0.0 and NaN == NaN by bits."""
    width = {16: pa.int16(), 32: pa.int32(), 64: pa.int64()}[a.type.bit_width]
    return a.view(width).fill_null(0)


def same(a: pa.Array, b: pa.Array) -> bool:
    """Equal type, nulls and values; floats (also inside lists) compared bit for bit."""
    if a.type != b.type or len(a) != len(b):
        return False
    if pa.types.is_list(a.type) or pa.types.is_large_list(a.type) or pa.types.is_fixed_size_list(a.type):
        return (pc.list_value_length(a).equals(pc.list_value_length(b))
                and same(pc.list_flatten(a), pc.list_flatten(b)))
    if pa.types.is_floating(a.type):
        return a.is_null().equals(b.is_null()) and _bits(a).equals(_bits(b))
    return a.equals(b)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def first_difference(a: pa.Array, b: pa.Array, where: list[str]) -> str:
    """The first row (and list element) where two same-type, same-length columns differ: 'where: old -> new'."""
    for i in range(len(a)):
        if same(a.slice(i, 1), b.slice(i, 1)):
            continue
        old, new = a[i].as_py(), b[i].as_py()
        if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
            k = next((k for k, (x, y) in enumerate(zip(old, new)) if repr(x) != repr(y)), 0)
            return f"{where[i]}[{k}]: {_short(old[k])} -> {_short(new[k])}"
        return f"{where[i]}: {_short(old)} -> {_short(new)}"
    return "?"


def schema_differences(old: pa.Schema, new: pa.Schema) -> list[str]:
    """Fields added, removed, moved, retyped, made (non-)nullable or given other field metadata."""
    out = [f"column {n} only in the baseline" for n in old.names if n not in new.names]
    out += [f"column {n} only in this tree" for n in new.names if n not in old.names]
    common = [n for n in old.names if n in new.names]
    if common != [n for n in new.names if n in old.names]:
        out.append("column order: " + ", ".join(old.names) + " -> " + ", ".join(new.names))
    for n in common:
        f, g = old.field(n), new.field(n)
        if not f.equals(g, check_metadata=True):
            out.append(f"field {n}: {f.type}{'' if f.nullable else ' not null'} {f.metadata or ''} -> "
                       f"{g.type}{'' if g.nullable else ' not null'} {g.metadata or ''}".rstrip())
    return out


def compare_schema(old: pa.Schema, new: pa.Schema, outcome: Outcome) -> None:
    """Names, types, nullability and field metadata in order; then file metadata but EXCLUDED_METADATA."""
    outcome.differences += ["schema: " + d for d in schema_differences(old, new)]
    om = {k.decode(): v.decode() for k, v in (old.metadata or {}).items()}
    nm = {k.decode(): v.decode() for k, v in (new.metadata or {}).items()}
    for key in sorted(om.keys() | nm.keys()):
        if key in EXCLUDED_METADATA and key in om and key in nm:
            continue
        if om.get(key) != nm.get(key):
            outcome.differences.append(f"metadata {key}: {_short(om.get(key))} -> {_short(nm.get(key))}")


def compare(name: str, old_run: Run, new_run: Run) -> Outcome:
    """Every difference between two runs: summary facts, rows, schema and metadata but the EXCLUDED ones."""
    outcome = Outcome(name, facts=new_run.facts)
    for key in sorted(old_run.facts.keys() | new_run.facts.keys()):
        if old_run.facts.get(key) != new_run.facts.get(key):
            outcome.differences.append(f"summary {key}: {_short(old_run.facts.get(key))} -> "
                                       f"{_short(new_run.facts.get(key))}")
    old, new = pq.read_table(old_run.rows), pq.read_table(new_run.rows)
    outcome.rows = new.num_rows
    compare_schema(old.schema, new.schema, outcome)
    if old.num_rows != new.num_rows:
        outcome.differences.append(f"rows: {old.num_rows} -> {new.num_rows}")
        return outcome
    if not old.column("path").equals(new.column("path")):
        outcome.differences.append("row order: " + first_difference(
            old.column("path").combine_chunks(), new.column("path").combine_chunks(),
            [f"row {i}" for i in range(new.num_rows)]))
    old, new = old.sort_by("path"), new.sort_by("path")
    paths = new.column("path").to_pylist()
    for column in old.column_names:
        if column in EXCLUDED or column not in new.column_names:
            continue  # a column only one side has is a schema difference, counted above
        outcome.columns += 1
        a, b = old.column(column).combine_chunks(), new.column(column).combine_chunks()
        if a.type != b.type:
            continue  # a schema difference, counted above
        if not same(a, b):
            outcome.differences.append(f"column {column}: {first_difference(a, b, paths)}")
    return outcome


def report(outcomes: list[Outcome]) -> bool:
    """Print the table and every difference; True when nothing differed."""
    print(f"\n{'comparison (baseline vs this)':<36} {'files':>5} {'rows':>5} {'columns':>7} {'inferred':>8} "
          f"{'differ':>6}  result")
    for o in outcomes:
        inferred = o.facts.get("inferred", "-")
        print(f"{o.name:<36} {o.facts.get('files', '?'):>5} {o.rows:>5} {o.columns:>7} {inferred:>8} "
              f"{len(o.differences):>6}  {'FAIL' if o.differences else 'PASS'}")
    for o in outcomes:
        for d in o.differences:
            print(f"  {o.name}: {d}")
    print("not compared: " + "; ".join(f"column {k} ({v})" for k, v in EXCLUDED.items())
          + "; summaries but " + ", ".join(SUMMARY_FACTS) + " (times, rates, config, error list). "
          "Compared although time-like: mtime (the input file's, not the run's)")
    return not any(o.differences for o in outcomes)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("baseline", type=Path, help="a folder holding the baseline's dinobatch/ package (e.g. .base)")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="folder to classify and scan")
    ap.add_argument("--model", type=Path, default=None, help="model file [default: a random ResNet18, seed 0]")
    ap.add_argument("--out", type=Path, default=None, help="working folder under /tmp [default: a fresh one]")
    ap.add_argument("--this", type=Path, default=REPO,
                    help="the tree to check against the baseline [default: this checkout]")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every run [default: 2]")
    ap.add_argument("-j", "--workers", type=int, default=None, help="-j of every run [default: not passed]")
    ap.add_argument("--no-embeddings", action="store_true", help="classify without --embeddings")
    return ap.parse_args()


def main() -> None:
    args = parse()
    base, this, data = args.baseline.resolve(), args.this.resolve(), args.data.resolve()
    if not (base / "dinobatch" / "__init__.py").is_file():
        sys.exit(f"{base} holds no dinobatch/ package")
    out = args.out or Path(tempfile.mkdtemp(prefix="dinobatch-identity-"))
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} is not empty: give a fresh --out")
    out.mkdir(parents=True, exist_ok=True)
    model = args.model.resolve() if args.model else make_model(out / "model.pt", this)
    check_loads(base, model)
    jobs = [] if args.workers is None else ["-j", str(args.workers)]
    classify_extra = jobs + ([] if args.no_embeddings else ["--embeddings"])
    runs = {}
    for name, tree in (("baseline", base), ("this", this)):
        runs[name], c_wall, s_wall = runs_of(tree, out / name, data=data, model=model, classify_extra=classify_extra,
                                             scan_extra=jobs, threads=args.threads)
        print(f"{name:<8} classify + rerun {c_wall:5.1f} s, scan x2 {s_wall:5.1f} s", flush=True)
    upgraded = upgrade_rerun(this, out / "baseline", out / "upgrade", data=data, model=model, extra=classify_extra,
                             threads=args.threads)
    names = ("classify", "classify rerun", "scan", "scan rerun")
    outcomes = [compare(n, old, new) for n, old, new in zip(names, runs["baseline"], runs["this"])]
    outcomes.append(compare("classify rerun on baseline's results", runs["baseline"][1], upgraded))
    ok = report(outcomes)
    print(f"outputs kept in {out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
