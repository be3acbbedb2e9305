"""How well curate finds label errors: flip a known share of labels, then compare with cleanlab.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/label_errors.py --model MODEL [FOLDER] [--flip 0.1] [--seed 0]

FOLDER (default ../shared/data/dinos, read in place) is a labelled tree FOLDER/<label>/...; MODEL is
a dinobatch model trained on those labels. The script classifies the folder once (results are
cached in --results), flips --flip of the labels at random (seeded) into a CSV manifest, runs
dinobatch's curate and cleanlab's find_label_issues on the same predicted probabilities, and prints
precision, recall and F1 of finding the flipped files, side by side.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def prf(found: set[str], truth: set[str]) -> tuple[float, float, float]:
    tp = len(found & truth)
    p = tp / len(found) if found else 0.0
    r = tp / len(truth) if truth else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", default=str(HERE.parent.parent / "shared" / "data" / "dinos"))
    ap.add_argument("--model", required=True)
    ap.add_argument("--flip", type=float, default=0.1, help="share of labels to flip")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default=None, help="classify output folder to reuse [default: a temporary one]")
    args = ap.parse_args()
    try:
        from cleanlab.filter import find_label_issues
    except ImportError:
        sys.exit("cleanlab is not installed: .venv/bin/pip install -e '.[bench]'")
    from dinobatch.jobs.classify import classify
    from dinobatch.config import ClassifyConfig
    from dinobatch.curation.curate import CurateConfig, curate
    from dinobatch.store.runs import latest_run
    from dinobatch.schema import read_metadata

    folder = Path(args.folder)
    tmp = Path(tempfile.mkdtemp(prefix="label-errors-"))
    results = Path(args.results) if args.results else tmp / "results"
    t = time.perf_counter()
    classify(ClassifyConfig(folder=str(folder), out=str(results), model=args.model))
    print(f"classified {folder} in {time.perf_counter() - t:.1f} s")
    table, _ = latest_run(results)
    labels = read_metadata(table.schema)["labels"]
    rows = [r for r in table.to_pylist() if r["status"] != "error" and "/" in r["path"]]
    rng = random.Random(args.seed)
    flipped = set(rng.sample([r["path"] for r in rows], round(args.flip * len(rows))))
    lines = ["path,label"]
    noisy = {}
    for r in rows:
        true = r["path"].split("/", 1)[0]
        noisy[r["path"]] = rng.choice([x for x in labels if x != true]) if r["path"] in flipped else true
        lines.append(f"{folder / r['path']},{noisy[r['path']]}")
    manifest = tmp / "noisy.csv"
    manifest.write_text("\n".join(lines) + "\n")
    ours = {}
    for method in ("confident_learning", "prune_by_noise_rate"):
        t = time.perf_counter()
        result = curate(CurateConfig(predictions=str(results), out=str(tmp / "queue"), manifest=str(manifest),
                                     method=method))
        ours[method] = ({q["path"] for q in result.queue if "label_error" in q["reasons"]}, time.perf_counter() - t)
    probs = np.array([r["probs"] for r in rows], dtype=np.float64)
    given = np.array([labels.index(noisy[r["path"]]) for r in rows])
    accuracy = float(np.mean(probs.argmax(1) == np.array([labels.index(r["path"].split("/", 1)[0]) for r in rows])))
    print(f"{len(rows)} images, {len(flipped)} labels flipped ({args.flip:.0%}, seed {args.seed}); "
          f"model top-1 on the true labels {accuracy:.3f}\n")
    print(f"{'method':<48} {'flagged':>7} {'precision':>9} {'recall':>6} {'F1':>6}")
    for method in ("confident_learning", "prune_by_noise_rate"):
        found, seconds = ours[method]
        p, r, f = prf(found, flipped)
        print(f"{'dinobatch curate --method ' + method:<48} {len(found):>7} {p:>9.3f} {r:>6.3f} {f:>6.3f}"
              f"   ({seconds:.1f} s, all checks)")
        mask = find_label_issues(given, probs, filter_by=method)
        found = {rows[i]["path"] for i in np.nonzero(mask)[0]}
        p, r, f = prf(found, flipped)
        print(f"{'cleanlab find_label_issues(' + method + ')':<48} {len(found):>7} {p:>9.3f} {r:>6.3f} {f:>6.3f}")


if __name__ == "__main__":
    main()
