"""The CPU's features, and what --precision auto picks on a CPU with and without AMX-BF16."""

from __future__ import annotations

import pytest

from dinobatch.runtime import cpu
from dinobatch.runtime.device import resolve_runtime
from dinobatch.runtime.memory import tune_process
from tests.helpers import picture, run_classify, save

# The first "flags" lines of /proc/cpuinfo, shortened, on the two kinds of machine the issue names.
XEON_AMX = ("fpu vme sse sse2 avx avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 avx_vnni "
            "avx512_fp16")
EPYC = "fpu vme sse sse2 avx avx2 avx512f avx512_vnni avx512_bf16 avx_vnni"
ARM = "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 bf16"


def _cpuinfo(body: str) -> str:
    return f"processor\t: 0\nvendor_id\t: x\nflags\t\t: {body}\n\nprocessor\t: 1\nflags\t\t: fpu\n"


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch):
    """Point the detector at a /proc/cpuinfo of our making: cpuinfo(text) (None: no such file)."""
    def use(text: str | None) -> None:
        path = tmp_path / "cpuinfo"
        path.unlink(missing_ok=True)
        if text is not None:
            path.write_text(text)
        monkeypatch.setattr(cpu, "CPUINFO", path)
        cpu._flags.cache_clear()

    yield use
    cpu._flags.cache_clear()  # the next test reads this machine's own flags again


@pytest.mark.parametrize("text, features, amx", [
    (_cpuinfo(XEON_AMX), ["amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx_vnni"], True),
    (_cpuinfo(EPYC), ["avx512_bf16", "avx512_vnni", "avx_vnni"], False),
    ("processor\t: 0\n" + ARM + "\n", [], False),
    (None, [], False),  # no /proc/cpuinfo (macOS, Windows)
])
def test_features_come_from_the_first_processors_flags(cpuinfo, text, features, amx):
    cpuinfo(text)
    assert cpu.cpu_features() == features
    assert cpu.has_amx_bf16() is amx


def test_auto_on_an_amx_cpu_is_bf16_and_says_why(cpuinfo):
    cpuinfo(_cpuinfo(XEON_AMX))
    runtime = resolve_runtime("cpu", "auto")
    assert (runtime.precision, runtime.auto) == ("bf16", "bf16 (amx_bf16)")
    applied = tune_process(runtime)
    assert applied["precision_auto"] == "bf16 (amx_bf16)"
    assert {"amx_bf16", "amx_int8"} <= set(applied["cpu_features"])


def test_auto_without_amx_stays_fp32_even_with_avx512_bf16_and_says_why(cpuinfo):
    cpuinfo(_cpuinfo(EPYC))
    runtime = resolve_runtime("cpu", "auto")
    assert (runtime.precision, runtime.auto) == ("fp32", "fp32 (no amx_bf16)")
    applied = tune_process(runtime)
    assert applied["precision_auto"] == "fp32 (no amx_bf16)"
    assert applied["cpu_features"] == ["avx512_bf16", "avx512_vnni", "avx_vnni"]


@pytest.mark.parametrize("asked", ["fp32", "bf16"])
def test_a_precision_asked_for_is_kept_whatever_the_cpu_has(cpuinfo, asked):
    cpuinfo(_cpuinfo(XEON_AMX if asked == "fp32" else EPYC))
    runtime = resolve_runtime("cpu", asked)
    assert (runtime.precision, runtime.auto) == (asked, None)
    assert "precision_auto" not in tune_process(runtime)


@pytest.mark.slow
@pytest.mark.parametrize("flags, precision", [(XEON_AMX, "bf16"), (EPYC, "fp32")])
def test_classify_runs_and_records_what_auto_chose(cpuinfo, tmp_path, tiny_model, flags, precision):
    cpuinfo(_cpuinfo(flags))
    for i in range(3):
        save(picture(i), tmp_path / "in" / f"{i}.jpg")
    summary, rows = run_classify(tmp_path / "in", tmp_path / "out", tiny_model, precision="auto")
    assert summary.config["precision"] == precision  # the saved configuration reruns at the same precision
    assert summary.process["precision_auto"].startswith(precision + " (")
    assert [r["status"] for r in rows.values()] == ["ok"] * 3


@pytest.mark.slow
def test_an_int8_files_run_records_int8_not_what_auto_chose_for_fp32(cpuinfo, tmp_path, tiny_model):
    from dinobatch.models.quantize import quantize_file

    cpuinfo(_cpuinfo(XEON_AMX))  # auto would pick bf16 for an fp32 model here
    for i in range(3):
        save(picture(i), tmp_path / "in" / f"{i}.jpg")
    quantize_file(str(tiny_model), tmp_path / "in", tmp_path / "int8.pt", count=3)
    summary, _ = run_classify(tmp_path / "in", tmp_path / "out", tmp_path / "int8.pt", precision="auto")
    assert summary.config["precision"] == "int8"
    assert summary.process["precision_auto"] == "int8 (an int8 model file)"
