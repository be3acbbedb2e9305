"""decisions: the journal keeps every acknowledged decision; decisions.csv, its latest-wins view, is relabel's input."""

from __future__ import annotations

import csv
import threading

import pytest

from dinobatch.curation.audit import record_of
from dinobatch.curation.decisions import DECISIONS_CSV, JOURNAL, Journal, new_decision, queue_progress, read_journal
from dinobatch.curation.relabel import read_decisions, relabel
from dinobatch.errors import DataError
from dinobatch.training.manifest import load_manifest
from tests.helpers import LABELS, picture, save


def _rows(folder):
    with open(folder / DECISIONS_CSV, newline="", encoding="utf-8") as fh:
        return [(r["path"], r["action"], r["label"], r["note"], r["reviewer"]) for r in csv.DictReader(fh)]


def test_each_decision_is_in_the_journal_and_the_csv_when_record_returns(tmp_path):
    journal = Journal(tmp_path)
    journal.record(new_decision("a.png", "keep", reviewer="ann"))
    # durable = on disk, in both files, before the caller acknowledges: a fresh reader sees it
    assert [e.path for e in read_journal(tmp_path / JOURNAL)[0]] == ["a.png"]
    assert _rows(tmp_path) == [("a.png", "keep", "", "", "ann")]


def test_the_latest_decision_wins_and_undo_takes_back_only_the_last(tmp_path):
    journal = Journal(tmp_path)
    for path, action, label in [("a.png", "keep", ""), ("b.png", "remove", ""), ("a.png", "relabel", "triceratops"),
                                ("c.png", "relabel", "stegosaurus"), ("a.png", "remove", ""), ("a.png", "undo", ""),
                                ("c.png", "undo", "")]:
        journal.record(new_decision(path, action, label, reviewer="ann"))
    assert _rows(tmp_path) == [("a.png", "relabel", "triceratops", "", "ann"), ("b.png", "remove", "", "", "ann")]
    with pytest.raises(DataError, match="no decision to undo"):
        journal.record(new_decision("c.png", "undo", reviewer="ann"))
    assert Journal(tmp_path).current() == journal.current()  # a restart resumes: the journal is the state


@pytest.mark.parametrize("action, label, note, reviewer, message", [
    ("delete", "", "", "ann", "unknown action 'delete'"),
    ("relabel", "", "", "ann", "a relabel needs a label"),
    ("relabel", "=cmd|x", "", "ann", "formula"),
    ("keep", "", "a\0b", "ann", "NUL"),
    ("keep", "", "x" * 2001, "ann", "longer than 2000"),
    ("keep", "", "", "ann\x1b[2J", "control characters"),
])
def test_a_bad_decision_is_refused_with_the_reason_and_nothing_is_written(tmp_path, action, label, note, reviewer,
                                                                         message):
    journal = Journal(tmp_path)
    with pytest.raises(DataError, match=message):
        journal.record(new_decision("a.png", action, label, note, reviewer=reviewer))
    assert read_journal(tmp_path / JOURNAL) == ([], [])


def test_a_line_cut_short_by_a_kill_is_skipped_and_reported_and_the_rest_kept(tmp_path, caplog):
    journal = Journal(tmp_path)
    journal.record(new_decision("a.png", "keep", reviewer="ann"))
    journal.record(new_decision("b.png", "remove", reviewer="ann"))
    with open(tmp_path / JOURNAL, "ab") as fh:  # what a kill in the middle of os.write leaves
        fh.write(b'{"path": "c.png", "action": "rel')
    restarted = Journal(tmp_path)
    assert list(restarted.current()) == ["a.png", "b.png"] and restarted.skipped == [3]
    assert "skipped line(s) 3" in caplog.text
    restarted.record(new_decision("c.png", "keep", reviewer="bob"))  # the torn piece stays a line of its own
    events, skipped = read_journal(tmp_path / JOURNAL)
    assert [e.path for e in events] == ["a.png", "b.png", "c.png"] and skipped == [3]
    assert _rows(tmp_path)[-1] == ("c.png", "keep", "", "", "bob")


def test_a_kill_between_the_journal_and_the_csv_is_caught_up_on_restart(tmp_path):
    Journal(tmp_path).record(new_decision("a.png", "keep", reviewer="ann"))
    (tmp_path / DECISIONS_CSV).write_text("path,action,label,note,reviewer,decided_at\r\n")  # the stale view
    Journal(tmp_path)
    assert _rows(tmp_path) == [("a.png", "keep", "", "", "ann")]


def test_two_writers_keep_every_decision_and_the_later_one_wins_per_file(tmp_path):
    # two servers on one folder (two Journals) and several threads each, as two tabs and a burst of keys
    tabs = [Journal(tmp_path), Journal(tmp_path)]

    def review(tab, who):
        for i in range(20):
            tabs[tab].record(new_decision(f"{i}.png", "keep" if tab == 0 else "remove", reviewer=who))

    threads = [threading.Thread(target=review, args=(t, f"tab{t}-{k}")) for t in (0, 1) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events, skipped = read_journal(tmp_path / JOURNAL)
    assert len(events) == 80 and skipped == []
    last = {e.path: e for e in events}  # the later event, as the journal orders them
    assert {r[0]: r[1] for r in _rows(tmp_path)} == {p: e.action for p, e in last.items()}
    assert tabs[0].record(new_decision("0.png", "keep", reviewer="x"))["0.png"].reviewer == "x"
    tabs[1].record(new_decision("1.png", "keep", reviewer="y"))
    assert tabs[1].current()["0.png"].reviewer == "x"  # a writer catches up on the other's lines first


def test_formula_text_is_spreadsheet_safe_and_relabel_reads_it_back(tmp_path):
    root = tmp_path / "data"
    lines = ["path,label,split"]
    for i, name in enumerate(["=a.png", "b.png", "c.png"]):
        save(picture(i), root / name)
        lines.append(f"{name},{LABELS[i]},train")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    journal = Journal(tmp_path / "q")
    journal.record(new_decision("=a.png", "relabel", LABELS[1], "-looks horned", reviewer="@ann"))
    journal.record(new_decision("b.png", "remove", "", 'a "blurry", cut\nphoto', reviewer="bob"))
    text = (tmp_path / "q" / DECISIONS_CSV).read_bytes().decode("utf-8")
    assert text.startswith("path,action,label,note,reviewer,decided_at\r\n'=a.png,relabel,")  # no cell runs
    assert ",'-looks horned,'@ann," in text and ',"a ""blurry"", cut\nphoto",bob,' in text
    assert [(d["path"], d["reviewer"]) for d in read_decisions(tmp_path / "q" / DECISIONS_CSV)] == [
        ("'=a.png", "@ann"), ("b.png", "bob")]
    done = relabel(str(tmp_path / "q" / DECISIONS_CSV), str(root / "labels.csv"), user="lead")
    labels = {r["path"]: (r["label"], r["status"]) for r in load_manifest(done.target).table.to_pylist()}
    assert labels["=a.png"][0] == LABELS[1] and labels["b.png"][1] == "removed"
    when = journal.current()["=a.png"].decided_at
    assert record_of(done.target)["changes"][0][-1] == f"-looks horned (decided by @ann at {when})"


def test_relabel_still_takes_a_file_without_the_reviewer_columns(tmp_path):
    (tmp_path / "d.csv").write_text("path,action,label\na.png,keep,\n")
    assert read_decisions(tmp_path / "d.csv")[0]["reviewer"] == ""


def test_progress_counts_items_with_a_decision_on_any_of_their_files():
    items = [{"path": "a.png", "members": [{"path": "a.png"}]},
             {"path": "b.png", "members": [{"path": "b.png"}, {"path": "b2.png"}]}, {"path": "c.png"}]
    assert queue_progress({"b2.png": 1}, items) == {"reviewed": 1, "total": 3}
    assert queue_progress({"a.png": 1, "b.png": 1, "c.png": 1}, items) == {"reviewed": 3, "total": 3}


def test_a_decision_journalled_when_the_csv_cannot_be_rewritten_is_acknowledged_and_caught_up(tmp_path, monkeypatch,
                                                                                            caplog):
    """The journal is the record: once a decision is in it, the reviewer is told it is saved (never "not
    saved" for a decision that Apply would then apply), and decisions.csv catches up before Apply reads it."""
    journal = Journal(tmp_path)
    journal.record(new_decision("a.png", "keep", reviewer="ann"))
    write = Journal._write_csv

    def full_disk(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Journal, "_write_csv", full_disk)
    current = journal.record(new_decision("b.png", "remove", reviewer="ann"))  # no exception: acknowledged
    assert set(current) == {"a.png", "b.png"}
    assert "could not be rewritten" in caplog.text
    assert _rows(tmp_path) == [("a.png", "keep", "", "", "ann")]  # stale until the next write
    monkeypatch.setattr(Journal, "_write_csv", write)
    with journal.held():  # what Apply does before relabel reads the CSV
        assert _rows(tmp_path) == [("a.png", "keep", "", "", "ann"), ("b.png", "remove", "", "", "ann")]


def test_curate_refuses_to_write_a_new_queue_over_an_earlier_reviews_decisions(tmp_path):
    """A second curate into the review's folder would show the old decisions as done on the new queue, and
    Apply would apply them to whatever manifest the new queue names: refused, the decisions untouched."""
    from click.testing import CliRunner

    from dinobatch.cli.main import cli
    from dinobatch.errors import EXIT_CONFIG

    out, results = tmp_path / "review", tmp_path / "results"
    results.mkdir()
    Journal(out).record(new_decision("a.png", "remove", reviewer="ann"))
    before = (out / JOURNAL).read_bytes(), (out / DECISIONS_CSV).read_bytes()
    result = CliRunner().invoke(cli, ["curate", str(results), "-o", str(out)])
    assert result.exit_code == EXIT_CONFIG, result.output
    assert "decisions of an earlier review" in result.output
    assert ((out / JOURNAL).read_bytes(), (out / DECISIONS_CSV).read_bytes()) == before
