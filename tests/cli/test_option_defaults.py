"""Each option's default is its config field's: `--help`, a run's saved config and a library call agree."""

from __future__ import annotations

import dataclasses

import click
import pytest

from dinobatch.cli.main import cli
from dinobatch.config import ClassifyConfig, ScanConfig, TrainConfig

# sweep's grid options take comma-separated values, one TrainConfig field each
_SWEEP_GRID = {"batch_sizes": "batch_size", "lrs": "lr", "levels": "augment_level", "epoch_list": "epochs"}


def _fields(config: type) -> dict[str, object]:
    return {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}


def _options(command: str) -> dict[str, click.Option]:
    return {p.name: p for p in cli.commands[command].params if isinstance(p, click.Option)}


def _mismatches(command: str, config: type, grid: dict[str, str] | None = None) -> list[str]:
    """Options whose Click default differs from the field's default they resolve into."""
    fields, options = _fields(config), _options(command)
    ctx = click.Context(cli.commands[command])
    wrong = []
    for name, option in options.items():
        field = (grid or {}).get(name, name)
        if field not in fields:
            continue
        default = option.get_default(ctx)  # as a run without the option gets it (a flag's is False)
        if name in (grid or {}):  # "128" means [128]
            default = [type(fields[field])(x) for x in default.split(",")]
            expected = [fields[field]]
        else:
            expected = fields[field]
        if default != expected or type(default) is not type(expected):
            wrong.append(f"{command} --{name}: option {default!r}, {config.__name__}.{field} {fields[field]!r}")
    return wrong


@pytest.mark.parametrize("command, config, grid, at_least", [
    ("classify", ClassifyConfig, None, 13),
    ("scan", ScanConfig, None, 4),
    ("train", TrainConfig, None, 16),
    ("sweep", TrainConfig, _SWEEP_GRID, 13),
])
def test_every_option_default_is_its_config_field_default(command, config, grid, at_least):
    compared = [n for n in _options(command) if (grid or {}).get(n, n) in _fields(config)]
    assert len(compared) >= at_least, compared  # the options are found, so the comparison is not empty
    assert _mismatches(command, config, grid) == []


def test_a_default_changed_on_one_side_is_caught(monkeypatch):
    """The check above fails when only the option's default changes (the config keeps its own)."""
    option = _options("train")["batch_size"]
    monkeypatch.setattr(option, "default", 64)
    assert _mismatches("train", TrainConfig) == ["train --batch_size: option 64, TrainConfig.batch_size 128"]
