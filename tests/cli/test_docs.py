"""The docs and `--help` tell a user the same, true things: every option is documented in docs/commands.md with
its default, none is invented, every link leads somewhere, and the README's commands are the ones CI runs."""

from __future__ import annotations

import math
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from dinobatch.cli.main import cli
from dinobatch.curation.curate import REASONS
from dinobatch.runtime.device import CUDA_MAX_WORKERS
from tests.helpers import REPO
from tests.helpers import cli_commands as _commands

COMMANDS_MD = REPO / "docs" / "commands.md"
_OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-zA-Z])(?![\w-])")
_LONG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
_COMMAND_BEFORE = re.compile(r"`(?:dinobatch )?([a-z]+(?: [a-z]+)?) $")  # "`classify --embeddings`"
_HEADING = re.compile(r"^## `dinobatch ([a-z]+(?: [a-z]+)?)(?: [A-Z_.]+)*`", re.M)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.M | re.S)
_UNSET = getattr(click.core, "UNSET", None)  # Click 8.2+: an option without a default; before, None


def _sections(text: str) -> dict[str, str]:
    """docs/commands.md's section on each command ('model import': its text), up to the next `## ` heading."""
    heads = list(_HEADING.finditer(text))
    sections = {}
    for head in heads:
        body = text[head.end():]
        sections[head.group(1)] = re.split(r"^## ", body, maxsplit=1, flags=re.M)[0]
    return sections


def _option_rows(section: str) -> list[tuple[list[str], str]]:
    """The rows of a section's `| option | default | meaning |` table: (options named in the first cell, default)."""
    rows, in_table = [], False
    for line in section.splitlines():
        if line.startswith("| option | default |"):
            in_table = True
        elif in_table and line.startswith("| ---"):
            continue
        elif in_table and line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.append((_OPTION.findall(cells[0]), cells[1]))
        else:
            in_table = False
    return rows


def _click_options(command: click.Command, name: str) -> dict[str, click.Parameter]:
    """Every spelling of every option the command takes (with -h/--help), to its parameter."""
    params = command.get_params(click.Context(command, info_name=name))
    return {opt: p for p in params if isinstance(p, click.Option) for opt in [*p.opts, *p.secondary_opts]}


def _same_value(documented: str, default: object) -> bool:
    """Whether a documented literal default (`8`, `0.01`, `text`) is Click's default (8, 0.01, 'text')."""
    try:
        return math.isclose(float(documented), float(default))  # `0` documents 0.0; `1e-4` documents 0.0001
    except (TypeError, ValueError):
        return documented == str(default)


def _default_mismatch(param: click.Option, cell: str) -> str | None:
    """Why the default cell of a one-option row disagrees with Click's parameter, or None."""
    if (cell == "required") != bool(param.required):
        return f"documented as {cell!r}, Click has required={param.required}"
    if param.is_flag and not param.required and cell in ("on", "off"):
        on = param.default not in (None, _UNSET) and bool(param.default)
        return None if (cell == "on") == on else f"documented {cell}, Click's default {on}"
    concrete = param.default is not None and param.default is not _UNSET
    literal = re.match(r"`([^`]+)`", cell)
    if concrete and not param.is_flag and param.default != () and literal is None:
        return f"Click's default is {param.default!r}, the docs show none"
    if not concrete and literal and not param.is_flag and cell.startswith("`"):  # "auto: `x`" says computed
        return f"documented default {literal.group(1)!r}, Click has none (auto or unset)"
    if concrete and literal and not _same_value(literal.group(1), param.default):
        return f"documented default {literal.group(1)!r}, Click's default {param.default!r}"
    return None


def _problems(doc: str) -> list[str]:
    """Every disagreement between docs/commands.md (as text) and Click's commands, one line each."""
    problems, sections, names = [], _sections(doc), dict(_commands(cli))
    problems += [f"commands.md has no section for dinobatch {n}" for n in names if n not in sections]
    problems += [f"commands.md documents dinobatch {n}, which does not exist" for n in sections if n not in names]
    for name in names.keys() & sections.keys():
        known = _click_options(names[name], name)
        rows = _option_rows(sections[name])
        documented = {opt for opts, _ in rows for opt in opts}
        problems += [f"{name} {o}: documented, but the command has no such option" for o in documented - known.keys()]
        problems += [f"{name} {o}: not in its table in commands.md" for o in known.keys() - documented
                     if o not in ("-h", "--help")]
        for opts, cell in rows:
            params = {id(known[o]): known[o] for o in opts if o in known}
            if len(params) == 1 and cell:  # one option per row: its default must be Click's
                why = _default_mismatch(next(iter(params.values())), cell)
                problems += [f"{name} {opts[-1]}: {why}"] if why else []
        problems += _prose_problems(name, sections[name], known, names)
    return problems


def _prose_problems(name: str, body: str, known: dict, names: dict[str, click.Command]) -> list[str]:
    """Long options named anywhere in a command's section that neither it nor the command named before them has."""
    problems = []
    for match in _LONG.finditer(body):
        before = _COMMAND_BEFORE.search(body[max(0, match.start() - 40):match.start()])
        if before and before.group(1) in names and before.group(1) != name:  # "`classify --embeddings`"
            other = _click_options(names[before.group(1)], before.group(1))
            if match.group() not in other:
                problems.append(f"{name}'s section names {before.group(1)} {match.group()}, which does not exist")
        elif match.group() not in known:
            problems.append(f"{name}'s section names {match.group()}, which {name} does not have")
    return problems


def test_commands_md_documents_every_option_of_every_command_and_no_other():
    assert _problems(COMMANDS_MD.read_text()) == []


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d.replace("| `--dhash-max N` | `3` | ... and dHash", "| `--dhash-maxi N` | `3` | ... and dHash"),
     ["classify --dhash-maxi: documented, but the command has no such option",
      "classify --dhash-max: not in its table in commands.md",
      "classify's section names --dhash-maxi, which classify does not have"]),
    (lambda d: d.replace("| `--force` | off | recompute every prediction instead of reusing earlier ones |\n", ""),
     ["classify --force: not in its table in commands.md"]),
    (lambda d: d.replace("| `--embeddings` | off | also store", "| `--embeddings` | on | also store"),
     ["classify --embeddings: documented on, Click's default False"]),
    (lambda d: d.replace("| `-k, --top-k K` | `3` | labels kept", "| `-k, --top-k K` | `5` | labels kept"),
     ["classify --top-k: documented default '5', Click's default 3"]),
    (lambda d: d.replace("| `--manifest FILE` | required | the manifest to change |",
                         "| `--manifest FILE` | none | the manifest to change |"),
     ["relabel --manifest: documented as 'none', Click has required=True"]),
    (lambda d: d.replace("## `dinobatch export PREDICTIONS`", "## `dinobatch exports PREDICTIONS`"),
     ["commands.md has no section for dinobatch export", "commands.md documents dinobatch exports, which does not exist"]),
    (lambda d: d.replace("One augment at a time per OUT", "With `--force`, one augment at a time per OUT"),
     ["augment's section names --force, which augment does not have"]),
])
def test_the_docs_check_fails_when_commands_md_drifts(edit, expected):
    doc = COMMANDS_MD.read_text()
    drifted = edit(doc)
    assert drifted != doc, "the edit no longer matches commands.md: update this test's example"
    assert _problems(drifted) == expected


def test_every_command_takes_config():
    for name, command in _commands(cli):
        assert "--config" in _click_options(command, name), f"dinobatch {name} has no --config, as the docs say"


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for a markdown file's headings (lower case, punctuation dropped, spaces to hyphens)."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", _FENCE.sub("", path.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n, candidate = 0, slug
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


def _doc_files() -> list[Path]:
    return [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]


def _broken_links(path: Path) -> list[str]:
    """The relative links of a markdown file that lead to no file, or to no heading of the file they name."""
    broken = []
    for target in _LINK.findall(_FENCE.sub("", path.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{path.name}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{path.name}: {target} (no such heading)")
    return broken


def test_every_relative_link_in_the_docs_resolves():
    assert [p.name for p in _doc_files() if p.exists()] == [p.name for p in _doc_files()]
    assert [b for p in _doc_files() for b in _broken_links(p)] == []


def test_the_link_check_finds_a_broken_link(tmp_path):
    (tmp_path / "a.md").write_text("# Top `x`\n\n[ok](#top-x) [ok](b.md#so-on) [bad](b.md#nope) [bad](c.md)\n"
                                   "```sh\n# not a heading\n[not a link](d.md)\n```\n")
    (tmp_path / "b.md").write_text("## So, on\n")
    assert _broken_links(tmp_path / "a.md") == ["a.md: b.md#nope (no such heading)", "a.md: c.md (no such file)"]


def test_user_docs_name_no_development_path():
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        assert "shared/data" not in path.read_text(), f"{path.name} names the development data folder"


def test_readme_quick_start_runs_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    first_block = re.search(r"```sh\n(.*?)```", readme, re.S).group(1)
    commands = [line for line in first_block.splitlines() if line and not line.startswith("#")]
    ci_command = (REPO / ".ci" / "run").read_text().rstrip("\n").splitlines()[-1]
    assert len(commands) == 2, "the quick start is two commands: the main job and the tests"
    assert commands[0].endswith(".venv/bin/dinobatch classify inbox/")
    assert commands[1] == ci_command, "the README's test command must be exactly what .ci/run runs"


def test_every_option_of_every_command_has_help():
    for name, command in _commands(cli):
        ctx = click.Context(command, info_name=name, show_default=False)
        for param in command.params:
            if isinstance(param, click.Option):
                record = param.get_help_record(ctx)
                assert record and record[1].strip(), f"dinobatch {name} {param.opts[-1]} has no help text"


def test_curate_fail_on_help_names_every_reason():
    out = CliRunner().invoke(cli, ["curate", "--help"], terminal_width=2000).output
    fail_on = next(line for line in out.splitlines() if "--fail-on" in line)
    for reason in REASONS:
        assert reason in fail_on, f"curate --fail-on help does not name {reason}"


def test_classify_workers_help_states_the_real_default():
    out = CliRunner().invoke(cli, ["classify", "--help"], terminal_width=2000).output
    workers = next(line for line in out.splitlines() if "--workers" in line)
    assert "half the cores" not in workers
    assert "one process per usable core" in workers and f"at most {CUDA_MAX_WORKERS}" in workers


def _exit_code_problems(output_md: str) -> list[str]:
    """Where docs/output.md's exit-code table and dinobatch.errors disagree, both ways."""
    import dinobatch.errors as errors

    table = output_md.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = [int(m) for m in re.findall(r"^\| (\d+) \|", table, re.M)]
    codes = {getattr(errors, name): name for name in errors.__all__ if name.startswith("EXIT_")}
    raised = {cls.__name__: cls.exit_code for cls in vars(errors).values()
              if isinstance(cls, type) and issubclass(cls, errors.DinobatchError)}
    problems = [f"{code} ({name}) is not in the table" for code, name in codes.items() if code not in documented]
    problems += [f"{code} is documented but errors.py has no EXIT_ for it" for code in documented if code not in codes]
    problems += [f"{code} is documented twice" for code in set(documented) if documented.count(code) > 1]
    problems += [f"{cls} exits {code}, undocumented" for cls, code in raised.items() if code not in documented]
    return problems


def test_output_md_exit_codes_are_errors_py_exit_codes():
    text = (REPO / "docs" / "output.md").read_text(encoding="utf-8")
    assert _exit_code_problems(text) == []
    row_9 = next(line for line in text.splitlines() if line.startswith("| 9 |"))
    assert _exit_code_problems(text.replace(row_9 + "\n", "")) == [  # a code dropped from the table
        "9 (EXIT_LOCKED) is not in the table", "LockedError exits 9, undocumented"]
    assert _exit_code_problems(text.replace("| 130 |", "| 131 |")) == [  # a code errors.py does not have
        "130 (EXIT_INTERRUPTED) is not in the table", "131 is documented but errors.py has no EXIT_ for it"]
