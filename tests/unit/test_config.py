"""Configuration: values a run cannot use are refused up front, naming the setting; a config file's mistakes name the key.

(Keys, relative paths, unknown keys and sections of load_config_file are also tested in tests/unit/runtime/test_device.py.)
"""

from __future__ import annotations

import json
import math

import pytest

from dinobatch.config import MAX_BATCH_SIZE, ClassifyConfig, TrainConfig, load_config_file
from dinobatch.errors import EXIT_CONFIG, ConfigError


def test_the_saved_config_of_a_run_rebuilds_the_same_run():
    cfg = ClassifyConfig(folder="/photos", out="/results", model="/models/m.pt", batch_size=16, workers=2,
                         top_k=5, embeddings=True, species="/species.csv", phash_max=10, dhash_max=4, wait=30.0)
    saved = json.loads(json.dumps(cfg.to_dict()))  # as it is written beside the run's outputs
    assert ClassifyConfig(**saved) == cfg
    assert saved["folder"] == "/photos" and saved["batch_size"] == 16 and saved["wait"] == 30.0


@pytest.mark.parametrize("values, named", [
    ({"batch_size": 0}, f"batch_size must be between 1 and {MAX_BATCH_SIZE}, got 0"),
    ({"batch_size": MAX_BATCH_SIZE + 1}, f"batch_size must be between 1 and {MAX_BATCH_SIZE}"),
    ({"top_k": 0}, "top_k must be at least 1"),
    ({"workers": -1}, "workers must be 0 or more"),
    ({"phash_max": 65}, "phash_max and dhash_max must be between 0 and 64"),
    ({"dhash_max": -1}, "phash_max and dhash_max must be between 0 and 64"),
    ({"wait": -1.0}, "wait must be a finite number of seconds"),
    ({"wait": math.inf}, "wait must be a finite number of seconds"),
])
def test_values_a_run_cannot_use_are_refused_naming_the_setting(values, named):
    with pytest.raises(ConfigError, match=named) as caught:
        ClassifyConfig(folder="/photos", **values)
    assert caught.value.exit_code == EXIT_CONFIG


@pytest.mark.parametrize("precision, named", [("int8", "int8 is an int8 model file's"), ("fp8", "cannot train")])
def test_train_refuses_a_precision_it_cannot_train_in(precision, named):
    with pytest.raises(ConfigError, match=named) as caught:  # train autocast anything but fp32 and bf16 in fp16
        TrainConfig(manifest="/m.csv", out="/m.pt", precision=precision)
    assert caught.value.exit_code == EXIT_CONFIG
    assert TrainConfig(manifest="/m.csv", out="/m.pt", precision="bf16").precision == "bf16"


def test_the_limits_themselves_are_accepted():
    cfg = ClassifyConfig(folder="/photos", batch_size=MAX_BATCH_SIZE, top_k=1, workers=0, phash_max=64, dhash_max=0)
    assert (cfg.batch_size, cfg.workers, cfg.phash_max, cfg.dhash_max) == (MAX_BATCH_SIZE, 0, 64, 0)


def _load(tmp_path, text: str | bytes, allowed=("model", "batch_size", "out", "species")) -> dict:
    path = tmp_path / "dinobatch.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return load_config_file(path, "classify", set(allowed))


def test_a_key_spelled_both_ways_is_refused_naming_both(tmp_path):
    with pytest.raises(ConfigError, match=r"sets batch_size twice, as 'batch-size' and 'batch_size'"):
        _load(tmp_path, "[classify]\nbatch-size = 8\nbatch_size = 16\n")


def test_an_unknown_key_error_lists_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'modle' in \[classify\]; known: .*batch_size.*model"):
        _load(tmp_path, '[classify]\nmodle = "m.pt"\n')


def test_a_model_name_and_absolute_paths_are_kept_as_written(tmp_path):
    values = _load(tmp_path, '[classify]\nmodel = "imagenet"\nout = "/srv/results"\nspecies = "s.csv"\n')
    assert values == {"model": "imagenet", "out": "/srv/results", "species": str(tmp_path / "s.csv")}


def test_a_file_without_the_commands_table_sets_nothing(tmp_path):
    assert _load(tmp_path, "# nothing set yet\n") == {}


@pytest.mark.parametrize("text, named", [
    (b"[classify]\nmodel = \"caf\xe9.pt\"\n", "not UTF-8 text"),
    ("classify = 3\n", r"\[classify\] must be a table"),
])
def test_a_file_that_cannot_be_used_names_the_file_and_why(tmp_path, text, named):
    with pytest.raises(ConfigError, match=named) as caught:
        _load(tmp_path, text)
    assert str(tmp_path / "dinobatch.toml") in str(caught.value)


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=f"config file not found: {tmp_path / 'none.toml'}"):
        load_config_file(tmp_path / "none.toml", "classify", {"model"})
