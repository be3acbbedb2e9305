"""relabel under cron: one writer per manifest (the classify lock), a version and its audit lines
both or neither across SIGKILL, a rerun that finishes a killed run, and a decisions CSV whose bad
values are refused (exit 10) instead of written into the manifest and audit log."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner

from dinobatch.cli.main import cli
from dinobatch.errors import EXIT_CONFIG, EXIT_DATA, EXIT_LOCKED
from dinobatch.io.lock import exclusive
from dinobatch.training.manifest import build_manifest, load_manifest, write_manifest
from tests.helpers import REPO, picture, save

LABELS = ("stegosaurus", "triceratops", "velociraptor")


@pytest.fixture
def dataset(tmp_path):
    """m.parquet over data/<label>/{a,b,c}.png: nine rows, three labels."""
    root = tmp_path / "data"
    for i, label in enumerate(LABELS):
        for j, name in enumerate("abc"):
            save(picture(10 * i + j), root / label / f"{name}.png")
    write_manifest(build_manifest(root, seed=0), tmp_path / "m.parquet", root)
    return tmp_path


def _audit(folder):
    path = folder / "m.audit.csv"
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _labels(path):
    return {r["path"]: r["label"] for r in load_manifest(path).table.to_pylist()}


def _relabel_cli(*args):
    return CliRunner().invoke(cli, ["relabel", *map(str, args)])


def test_a_held_manifest_makes_relabel_exit_9_or_wait(dataset):
    (dataset / "d.csv").write_text("path,action,label\nstegosaurus/a.png,relabel,triceratops\n")
    with exclusive(dataset / ".m.lock"):
        held = _relabel_cli(dataset / "d.csv", "--manifest", dataset / "m.parquet")
    assert held.exit_code == EXIT_LOCKED and "in use by" in held.output
    assert not (dataset / "m.v2.parquet").exists() and _audit(dataset) == []

    holding = threading.Event()

    def hold_briefly():
        with exclusive(dataset / ".m.lock"):
            holding.set()
            time.sleep(1.0)

    holder = threading.Thread(target=hold_briefly)
    holder.start()
    holding.wait(5)
    waited = _relabel_cli(dataset / "d.csv", "--manifest", dataset / "m.parquet", "--wait", 20)
    holder.join()
    assert waited.exit_code == 0, waited.output
    assert _labels(dataset / "m.v2.parquet")["stegosaurus/a.png"] == "triceratops"


def _command(folder, decisions, *extra):
    return [sys.executable, "-m", "dinobatch", "relabel", str(folder / decisions), "--manifest",
            str(folder / "m.parquet"), "--user", "t", *map(str, extra)]


def test_two_relabels_started_together_both_land_in_their_own_version(dataset):
    (dataset / "d1.csv").write_text("path,action,label\nstegosaurus/a.png,relabel,triceratops\n")
    (dataset / "d2.csv").write_text("path,action,label\nvelociraptor/b.png,relabel,stegosaurus\n")
    procs = [subprocess.Popen(_command(dataset, name, "--wait", 60), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for name in ("d1.csv", "d2.csv")]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    versions = sorted(dataset.glob("m.v*.parquet"))
    assert [v.name for v in versions] == ["m.v2.parquet", "m.v3.parquet"]
    audit = _audit(dataset)
    assert len(audit) == 2 and {a["new_manifest"] for a in audit} == {str(v) for v in versions}
    for line in audit:  # each version holds exactly the decision its audit line says it holds
        labels = _labels(line["new_manifest"])
        assert labels[line["path"]] == line["new_label"]
        other = ({"stegosaurus/a.png", "velociraptor/b.png"} - {line["path"]}).pop()
        assert labels[other] == other.split("/")[0]


def _tmp_leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("crash_at", [
    "write:1",  # the version's file complete, not yet renamed
    "relabel:1:published",  # the version published, its audit lines not yet in the log
    "write:2",  # the new audit log complete, not yet renamed over the old one
])
def test_a_killed_relabel_is_finished_by_its_rerun(dataset, crash_at):
    decisions = "".join(f"{label}/{n}.png,relabel,{LABELS[(i + 1) % 3]},moved\n"
                        for i, label in enumerate(LABELS) for n in "ab")
    (dataset / "d.csv").write_text("path,action,label,note\n" + decisions)
    killed = subprocess.run(_command(dataset, "d.csv"), cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "DINOBATCH_CRASH_AT": crash_at})
    assert killed.returncode == -9, killed.stderr
    if (dataset / "m.v2.parquet").exists():  # published: the version carries its own decisions
        assert len(_audit(dataset)) in (0, 6)
    rerun = subprocess.run(_command(dataset, "d.csv"), cwd=REPO, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.name for p in dataset.glob("m.v*.parquet")) == ["m.v2.parquet"]
    audit = _audit(dataset)
    assert sorted(a["path"] for a in audit) == sorted(line.split(",")[0] for line in decisions.splitlines())
    labels = _labels(dataset / "m.v2.parquet")
    assert all(labels[a["path"]] == a["new_label"] and a["new_manifest"] == str(dataset / "m.v2.parquet")
               for a in audit)
    assert _tmp_leftovers(dataset) == []


def test_a_full_disk_while_writing_the_audit_log_leaves_neither(dataset):
    (dataset / "d.csv").write_text("path,action,label\nstegosaurus/a.png,relabel,triceratops\n")
    failed = subprocess.run(_command(dataset, "d.csv"), cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "DINOBATCH_FAIL_AT": "write:1:audit.csv"})
    assert failed.returncode == 7 and "m.v2.parquet was removed again" in failed.stderr
    assert list(dataset.glob("m.v*.parquet")) == [] and _audit(dataset) == [] and _tmp_leftovers(dataset) == []


@pytest.mark.parametrize("row, message", [
    ("stegosaurus/a.png,relabel,tyranosaurus_rexx,", "line 2, column label: 'tyranosaurus_rexx' is not a label"),
    ("stegosaurus/a.png,relabel,\"=cmd|' /C calc'!A0\",",
     "line 2, column label: \"=cmd|' /C calc'!A0\" is not a label"),
    ("stegosaurus/a.png,relabel,..,", "line 2, column label: '..' is not a label"),
    ("stegosaurus/a.png,relabel,a/b,", "line 2, column label: 'a/b' is not a label"),
    ("stegosaurus/a.png,relabel,\"tri\nceratops\",", "line 2, column label: 'tri\\nceratops' is not a label"),
    ("stegosaurus/a.png,relabel,tri\0ceratops,", "line 2, column label: 'tri\\x00ceratops' is not a label"),
    ("stegosaurus/a.png,keep,,note,extra", "line 2: 5 fields, but the header has 4"),
    ("stegosaurus/a.png,keep,," + "x" * 140_000, "line 2: a field is longer than"),
    ("stegosaurus/a.png,keep,,nul\0", "line 2, column note: a NUL character"),
])
def test_bad_values_in_a_decisions_file_exit_10_naming_row_and_column(dataset, row, message):
    (dataset / "d.csv").write_text("path,action,label,note\n" + row + "\n")
    result = _relabel_cli(dataset / "d.csv", "--manifest", dataset / "m.parquet")
    assert result.exit_code == EXIT_DATA, result.output
    assert message in result.output
    assert sorted(p.name for p in dataset.iterdir()) == ["d.csv", "data", "m.parquet"]


def test_a_new_label_is_accepted_only_when_named_and_safe(dataset):
    (dataset / "d.csv").write_text("path,action,label\nstegosaurus/a.png,relabel,tyrannosaurus_rex\n")
    named = _relabel_cli(dataset / "d.csv", "--manifest", dataset / "m.parquet", "--new-label", "tyrannosaurus_rex")
    assert named.exit_code == 0, named.output
    assert _labels(dataset / "m.v2.parquet")["stegosaurus/a.png"] == "tyrannosaurus_rex"
    unsafe = _relabel_cli(dataset / "d.csv", "--manifest", dataset / "m.parquet", "--new-label", "=1+1")
    assert unsafe.exit_code == EXIT_CONFIG and "--new-label '=1+1'" in unsafe.output


def test_formula_cells_are_neutralised_in_the_audit_log(dataset):
    (dataset / "d.csv").write_text("path,action,label,note\n"
                                   "stegosaurus/a.png,keep,,\"=HYPERLINK(\"\"http://x\"\")\"\n"
                                   "stegosaurus/b.png,keep,,@SUM(A1)\n")
    assert _relabel_cli(dataset / "d.csv", "--manifest", dataset / "m.parquet").exit_code == 0
    notes = [a["note"] for a in _audit(dataset)]
    assert notes == ["'=HYPERLINK(\"http://x\")", "'@SUM(A1)"]


def test_an_interrupt_just_after_the_audit_log_is_written_keeps_the_version_it_names(dataset, monkeypatch):
    # cron's timeout sends SIGTERM, which the CLI raises as KeyboardInterrupt wherever the run is: here
    # as the new log's rename returns (in its fsync of the folder). The log names v2: v2 must stay.
    from dinobatch.curation import audit
    from dinobatch.curation.relabel import relabel

    written = audit.append_lines

    def then_interrupted(*args, **kwargs):
        written(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(audit, "append_lines", then_interrupted)
    (dataset / "d.csv").write_text("path,action,label\nstegosaurus/a.png,relabel,triceratops\n")
    with pytest.raises(KeyboardInterrupt):
        relabel(str(dataset / "d.csv"), str(dataset / "m.parquet"))
    assert [a["new_manifest"] for a in _audit(dataset)] == [str(dataset / "m.v2.parquet")]
    assert _labels(dataset / "m.v2.parquet")["stegosaurus/a.png"] == "triceratops"


def _odd_names(tmp_path, names):
    """m.parquet over data/stegosaurus/<each name>, names given as the file system's bytes."""
    root = tmp_path / "data"
    (root / "stegosaurus").mkdir(parents=True)
    for i, name in enumerate(names):
        save(picture(70 + i), root / "stegosaurus" / os.fsdecode(name), "PNG")
    save(picture(90), root / "triceratops" / "t.png")
    write_manifest(build_manifest(root, seed=0), tmp_path / "m.parquet", root)
    return {bytes(r["path_bytes"] or r["path"].encode()): r["path"] for r in load_manifest(tmp_path / "m.parquet").table.to_pylist()}


def _decide(tmp_path, *paths):
    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "action", "label"])
        writer.writerows([p, "relabel", "triceratops"] for p in paths)
    return _relabel_cli(tmp_path / "d.csv", "--manifest", tmp_path / "m.parquet")


def _relabelled(tmp_path, shown):
    """The exact names (bytes) of the rows whose label changed."""
    new = {r["path"]: r["label"] for r in load_manifest(tmp_path / "m.v2.parquet").table.to_pylist()}
    return {name for name, path in shown.items() if new[path] == "triceratops" and not path.startswith("triceratops")}


def test_a_name_ending_in_a_control_character_is_its_own_file_not_its_neighbour(tmp_path):
    # \x1f is whitespace to str.strip: read loosely, the decision would relabel a.png instead
    shown = _odd_names(tmp_path, [b"a.png", b"a.png\x1f"])
    result = _decide(tmp_path, "stegosaurus/a.png\x1f")
    assert result.exit_code == 0, result.output
    assert _relabelled(tmp_path, shown) == {b"stegosaurus/a.png\x1f"}


def test_odd_names_are_matched_by_their_exact_bytes_however_they_are_written(tmp_path):
    shown = _odd_names(tmp_path, [b"b\xff.png", b"c\x01.png", b"d\\e.png"])
    # as tables show them (\xNN a byte), as a terminal prints a control character, as the file system spells them
    result = _decide(tmp_path, "stegosaurus/b\\xff.png", "stegosaurus/c\\x01.png", "stegosaurus/d\\e.png")
    assert result.exit_code == 0, result.output
    assert _relabelled(tmp_path, shown) == {b"stegosaurus/b\xff.png", b"stegosaurus/c\x01.png", b"stegosaurus/d\\e.png"}
    audit = [a["path"] for a in _audit(tmp_path)]
    assert audit == [shown[b"stegosaurus/b\xff.png"], shown[b"stegosaurus/c\x01.png"], shown[b"stegosaurus/d\\e.png"]]


def test_a_path_that_could_name_two_files_is_refused(tmp_path):
    _odd_names(tmp_path, [b"f\x01.png", b"f\\x01.png"])  # a control character, and a backslash then 'x01'
    result = _decide(tmp_path, "stegosaurus/f\\x01.png")
    assert result.exit_code == EXIT_DATA and "could name two files" in result.output
    assert not (tmp_path / "m.v2.parquet").exists()
