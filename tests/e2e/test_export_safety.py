"""export from cron: a destination inside the classified folder is refused (it compounded on every
cycle), and a link in the inbox to a file outside it is not copied unless asked."""

from __future__ import annotations

import os

from click.testing import CliRunner

from dinobatch.jobs.classify import classify
from dinobatch.cli.main import cli
from dinobatch.config import ClassifyConfig
from dinobatch.errors import EXIT_CONFIG
from tests.helpers import picture, save, tree_digest


def _classified(tmp_path, tiny_model, folder):
    classify(ClassifyConfig(folder=str(folder), out=str(tmp_path / "res"), model=str(tiny_model), workers=0))
    return tmp_path / "res"


def _export(*args, min_confidence: float = 0):
    return CliRunner().invoke(cli, ["export", *map(str, args), "--min-confidence", str(min_confidence)])


def _inbox(folder, n: int = 3):
    for i in range(n):
        save(picture(i), folder / f"{i}.png")
    return folder


def test_export_into_the_classified_folder_is_refused_before_copying(tmp_path, tiny_model):
    inbox = _inbox(tmp_path / "inbox")
    results = _classified(tmp_path, tiny_model, inbox)
    before = tree_digest(inbox)
    os.symlink(inbox, tmp_path / "alias")
    for inside in (inbox / "sorted", inbox, tmp_path / "alias" / "sorted"):
        refused = _export(results, "--to", inside)
        assert refused.exit_code == EXIT_CONFIG, refused.output
        assert "inside the classified folder" in refused.output
    assert tree_digest(inbox) == before and not (inbox / "sorted").exists()
    assert _export(results, "--to", tmp_path / "sorted").exit_code == 0  # beside it is fine
    assert len([p for p in (tmp_path / "sorted").rglob("*") if p.is_file()]) == 3


def test_a_link_to_a_file_outside_the_inbox_is_not_exported_unless_asked(tmp_path, tiny_model):
    inbox = tmp_path / "inbox"
    save(picture(1), inbox / "mine.png")
    save(picture(2), tmp_path / "private" / "secret.png")
    os.symlink(tmp_path / "private" / "secret.png", inbox / "outside.png")
    os.symlink(inbox / "mine.png", inbox / "inside.png")
    results = _classified(tmp_path, tiny_model, inbox)

    plain = _export(results, "--to", tmp_path / "a")
    assert plain.exit_code == 0 and "_outside: 1" in plain.output
    copied = sorted(p.name for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert copied == ["inside.png", "mine.png"]  # a link within the inbox is copied as its file

    asked = _export(results, "--to", tmp_path / "b", "--copy-outside-links")
    assert asked.exit_code == 0 and "_outside" not in asked.output
    secret = next((tmp_path / "b").rglob("outside.png"))
    assert not secret.is_symlink() and secret.read_bytes() == (tmp_path / "private" / "secret.png").read_bytes()


def test_export_beside_a_folder_named_like_a_bucket_is_refused_before_copying(tmp_path, tiny_model):
    # TO/_review/... is the classified folder itself when that folder is TO/_review (sorting the review
    # pile of an earlier export, say): the copies would land in it and compound on every cycle
    inbox = _inbox(tmp_path / "_review")
    results = _classified(tmp_path, tiny_model, inbox)
    before = tree_digest(inbox)
    refused = _export(results, "--to", tmp_path, min_confidence=1)
    assert refused.exit_code == EXIT_CONFIG, refused.output
    assert "inside the classified folder" in refused.output
    assert tree_digest(inbox) == before
