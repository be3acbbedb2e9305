"""Device, precision and configuration resolution."""

from __future__ import annotations

import pytest
import torch

from dinobatch.config import ClassifyConfig, load_config_file
from dinobatch.runtime.device import resolve_runtime
from dinobatch.errors import ConfigError, DeviceError


def test_auto_on_a_cpu_machine_is_cpu_fp32():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the CPU default cannot be observed")
    rt = resolve_runtime("auto", "auto")
    assert rt.device.type == "cpu" and rt.precision == "fp32" and not rt.pin_memory


def test_cuda_asked_for_and_missing_is_an_error_not_a_fallback():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceError, match="CUDA is not available"):
        resolve_runtime("cuda", "auto")


@pytest.mark.parametrize("device", ["tpu", "gpu0", "mps"])
def test_unknown_devices_are_errors(device):
    with pytest.raises(DeviceError):
        resolve_runtime(device, "auto")


def test_bf16_on_cpu_is_honoured():
    assert resolve_runtime("cpu", "bf16").precision == "bf16"


def test_config_file_keys_and_relative_paths(tmp_path):
    cfg = tmp_path / "conf" / "dinobatch.toml"
    cfg.parent.mkdir()
    cfg.write_text('[classify]\nmodel = "models/m.pt"\nbatch-size = 8\nout = "/abs/out"\n')
    values = load_config_file(cfg, "classify", {"model", "batch_size", "out"})
    assert values == {"model": str(tmp_path / "conf" / "models" / "m.pt"), "batch_size": 8, "out": "/abs/out"}


@pytest.mark.parametrize("text, message", [
    ('[classify]\nbatchsize = 8\n', "unknown key 'batchsize'"),
    ('[clasify]\n', "unknown section"),
    ('[classify\n', "cannot read config"),
])
def test_config_file_errors(tmp_path, text, message):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config_file(cfg, "classify", {"model", "batch_size"})


def test_config_rejects_nonsense_values():
    with pytest.raises(ConfigError):
        ClassifyConfig(folder="x", batch_size=0)


def test_process_settings_tune_glibc_unless_the_operator_chose(monkeypatch):
    import platform

    import torch

    from dinobatch.runtime.memory import MALLOC_ENV, tune_process
    from dinobatch.runtime.device import resolve_runtime

    cpu = resolve_runtime("cpu", "fp32")
    monkeypatch.setenv(MALLOC_ENV, "system")
    assert tune_process(cpu)["allocator"] == "system"
    monkeypatch.delenv(MALLOC_ENV)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0")
    assert tune_process(cpu)["allocator"] == "GLIBC_TUNABLES"
    monkeypatch.delenv("GLIBC_TUNABLES")
    applied = tune_process(cpu)
    if platform.libc_ver()[0] == "glibc":
        assert applied["allocator"].startswith("glibc")
    assert applied["threads"] == torch.get_num_threads() >= 1


@pytest.mark.parametrize("cores, expected", [(1, 1), (4, 3), (16, 15), (64, 16)])
def test_cuda_decodes_with_every_spare_core_up_to_sixteen(monkeypatch, cores, expected):
    """On a GPU decoding is the limit: 15 workers ran classify 1.5x faster than the old cap of 8."""
    import dinobatch.runtime.device as device

    monkeypatch.setattr(device, "usable_cores", lambda: cores)
    assert device.default_workers("cuda", None) == expected
    assert device.default_workers("cuda", 3) == 3  # asked for: as asked
