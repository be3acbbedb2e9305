"""--config FILE for every command: each reads its own TOML table into Click's defaults, so flags still win."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dinobatch.cli.main import cli
from dinobatch.config import CONFIG_ENV
from dinobatch.errors import EXIT_CONFIG
from tests.helpers import picture, save


def invoke(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


@pytest.fixture
def folder(tmp_path):
    for i in range(2):
        save(picture(i), tmp_path / "in" / f"{i}.png")
    return tmp_path / "in"


def _conf(tmp_path, text: str):
    conf = tmp_path / "conf" / "dinobatch.toml"
    conf.parent.mkdir(exist_ok=True)
    conf.write_text(text)
    return conf


def _scan_limits(path) -> tuple[str, str]:
    meta = pq.read_schema(path).metadata
    return meta[b"dinobatch.phash_max"].decode(), meta[b"dinobatch.dhash_max"].decode()


def test_scan_reads_its_table_and_a_flag_beats_the_file(tmp_path, folder):
    conf = _conf(tmp_path, '[scan]\nphash_max = 2\ndhash-max = 1\nworkers = 0\n[classify]\ntop-k = 2\n')
    result = invoke("scan", folder, "--config", conf, "-o", tmp_path / "a.parquet", "-q")
    assert result.exit_code == 0, result.output
    assert _scan_limits(tmp_path / "a.parquet") == ("2", "1")
    result = invoke("scan", folder, "--config", conf, "-o", tmp_path / "b.parquet", "-q", "--phash-max", "5")
    assert result.exit_code == 0, result.output
    assert _scan_limits(tmp_path / "b.parquet") == ("5", "1")


def test_scan_output_relative_to_the_file_and_config_from_the_environment(tmp_path, folder, monkeypatch):
    conf = _conf(tmp_path, '[scan]\noutput = "inventory.parquet"\nworkers = 0\n')
    monkeypatch.chdir(tmp_path)
    result = invoke("scan", folder, "-q", env={CONFIG_ENV: str(conf)})
    assert result.exit_code == 0, result.output
    assert (conf.parent / "inventory.parquet").is_file() and not (tmp_path / "scan.parquet").exists()


def test_train_reads_its_table_and_a_flag_beats_the_file(tmp_path):
    manifest = tmp_path / "m.parquet"
    manifest.write_bytes(b"not read by --print-config")
    conf = _conf(tmp_path, '[train]\nepochs = 3\nlr = 0.05\npretrained = "start.pt"\nfreeze-backbone = true\n')
    result = invoke("train", manifest, "-o", tmp_path / "m.pt", "--config", conf, "--epochs", "5", "--print-config")
    assert result.exit_code == 0, result.output
    cfg = json.loads(result.output)
    assert (cfg["epochs"], cfg["lr"], cfg["freeze_backbone"]) == (5, 0.05, True)
    assert cfg["pretrained"] == str(conf.parent / "start.pt")  # relative to the file, as classify's model


def test_a_model_name_in_the_file_is_not_made_a_path(tmp_path):
    manifest = tmp_path / "m.parquet"
    manifest.write_bytes(b"")
    for name in ("none", "imagenet", "imagenet:IMAGENET1K_V1"):
        conf = _conf(tmp_path, f'[train]\npretrained = "{name}"\n')
        result = invoke("train", manifest, "-o", tmp_path / "m.pt", "--config", conf, "--print-config")
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["pretrained"] == name


def test_an_unknown_key_names_the_file_table_and_key(tmp_path, folder):
    conf = _conf(tmp_path, "[scan]\nphash = 2\n")
    result = invoke("scan", folder, "--config", conf, "-o", tmp_path / "s.parquet")
    assert result.exit_code == EXIT_CONFIG, result.output
    assert f"{conf}: unknown key 'phash' in [scan]" in result.output and "phash_max" in result.output
    assert not (tmp_path / "s.parquet").exists()


def test_a_value_of_the_wrong_type_names_the_file_table_and_key(tmp_path, folder):
    conf = _conf(tmp_path, '[scan]\nphash-max = "2"\n')
    result = invoke("scan", folder, "--config", conf, "-o", tmp_path / "s.parquet")
    assert result.exit_code == EXIT_CONFIG, result.output
    assert f"{conf}: [scan] phash_max = '2': expected an integer, got a string" in result.output
    conf = _conf(tmp_path, "[scan]\nphash-max = 65\n")
    result = invoke("scan", folder, "--config", conf, "-o", tmp_path / "s.parquet")
    assert result.exit_code == EXIT_CONFIG and "0<=x<=64" in result.output


def test_a_subcommand_of_model_reads_its_dotted_table(tmp_path):
    conf = _conf(tmp_path, '[model.import]\narch = "resnet18"\nshape = 3\n')
    (tmp_path / "sd.pt").write_bytes(b"")
    result = invoke("model", "import", tmp_path / "sd.pt", "--config", conf)
    assert result.exit_code == EXIT_CONFIG, result.output
    assert "unknown key 'shape' in [model.import]" in result.output


def test_an_unknown_table_is_an_error_and_another_commands_table_is_not(tmp_path, folder):
    conf = _conf(tmp_path, "[scna]\nworkers = 0\n")
    result = invoke("scan", folder, "--config", conf, "-o", tmp_path / "s.parquet")
    assert result.exit_code == EXIT_CONFIG and "unknown section(s) scna" in result.output
    conf = _conf(tmp_path, "[model.imprt]\narch = 'resnet18'\n")
    result = invoke("scan", folder, "--config", conf, "-o", tmp_path / "s.parquet")
    assert result.exit_code == EXIT_CONFIG and "unknown section(s) model.imprt" in result.output
    conf = _conf(tmp_path, "[curate]\nhtml = true\n[model.info]\njson = true\n")
    result = invoke("scan", folder, "--config", conf, "-o", tmp_path / "s.parquet", "-j", "0", "-q")
    assert result.exit_code == 0, result.output


def test_a_repeatable_option_takes_an_array(tmp_path):
    conf = _conf(tmp_path, '[curate]\nfail-on = "any=10%"\n')
    result = invoke("curate", tmp_path, "-o", tmp_path / "q", "--config", conf)
    assert result.exit_code == EXIT_CONFIG, result.output
    assert "[curate] fail_on = 'any=10%': expected an array, got a string" in result.output
