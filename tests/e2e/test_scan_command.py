"""dinobatch scan end to end: one row per file, duplicates grouped, input untouched, no torch, bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from dinobatch.cli.main import cli
from dinobatch.errors import EXIT_INPUT
from dinobatch.io.walk import display_path
from dinobatch.schema import read_metadata, scan_schema
from tests.helpers import REPO, jpeg_bytes, picture, save, tree_digest


def scan(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["scan", *map(str, args)], catch_exceptions=False)
    return result.exit_code, result.output


def rows_of(path: Path) -> dict[str, dict]:
    return {r["path"]: r for r in pq.read_table(path).to_pylist()}


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "photos"
    save(picture(1), root / "a.jpg", quality=92)
    (root / "copy_of_a.jpg").write_bytes((root / "a.jpg").read_bytes())
    save(picture(7, (640, 480)), root / "big.png")
    save(picture(7, (640, 480)).resize((320, 240), Image.LANCZOS), root / "sub" / "small_copy.jpg", quality=90)
    for i, ext in enumerate(("png", "webp", "gif", "bmp", "tiff"), start=2):
        save(picture(i), root / "sub" / f"other{i}.{ext}")
    save(picture(11).convert("CMYK"), root / "cmyk.jpg", quality=92)
    exif = Image.Exif()
    exif[0x0112] = 6
    save(picture(13, (200, 100)), root / "rotated.jpg", quality=92, exif=exif.tobytes())
    (root / "truncated.jpg").write_bytes(jpeg_bytes(picture(8))[:700])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image\n")
    os.mkfifo(root / "pipe.jpg")
    save(picture(9), root / ".hidden.jpg")
    save(picture(14), root / os.fsdecode(b"caf\xe9.png"))  # a name that is not UTF-8
    return root


def test_scan_groups_copies_and_reports_every_file_once(folder, tmp_path):
    before = tree_digest(folder)
    out = tmp_path / "out" / "scan.parquet"
    code, output = scan(folder, "-o", out, "--workers", "2", "--summary-json", tmp_path / "s.json")
    assert code == 0, output
    table = pq.read_table(out)
    assert table.schema.remove_metadata() == scan_schema()
    rows = {r["path"]: r for r in table.to_pylist()}
    found = {display_path(str(p.relative_to(folder))) for p in folder.rglob("*")
             if not p.is_dir() and not p.name.startswith(".")}
    assert table.num_rows == len(rows) == len(found) and set(rows) == found
    assert (rows["copy_of_a.jpg"]["duplicate_of"], rows["copy_of_a.jpg"]["duplicate_kind"]) == ("a.jpg", "exact")
    near = rows["sub/small_copy.jpg"]
    assert (near["duplicate_of"], near["duplicate_kind"]) == ("big.png", "near")
    assert rows["a.jpg"]["status"] == rows["big.png"]["status"] == "ok"
    assert rows["a.jpg"]["duplicate_group"] == rows["copy_of_a.jpg"]["duplicate_group"] is not None
    assert "truncated" in rows["truncated.jpg"]["error"]
    assert "empty file" in rows["empty.png"]["error"]
    assert "not an image" in rows["notes.txt"]["error"]
    assert "FIFO" in rows["pipe.jpg"]["error"]
    bad = {"truncated.jpg", "empty.png", "notes.txt", "pipe.jpg"}
    assert {p for p, r in rows.items() if r["status"] == "error"} == bad
    assert all(rows[p]["phash"] is None and rows[p]["sha256"] is None for p in ("empty.png", "pipe.jpg"))
    assert all(len(r["phash"]) == len(r["dhash"]) == 16 and r["width"] for p, r in rows.items() if p not in bad)
    assert (rows["rotated.jpg"]["width"], rows["rotated.jpg"]["height"]) == (100, 200)
    assert rows["cmyk.jpg"]["mode"] == "CMYK"
    assert rows["caf\\xe9.png"]["path_bytes"] == b"caf\xe9.png" and rows["a.jpg"]["path_bytes"] is None
    meta = read_metadata(table.schema)
    assert meta["kind"] == "scan" and meta["folder"] == str(folder) and meta["dhash_max"] == "3"
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["counts"] == {"ok": 10, "duplicate": 2, "error": 4} and summary["duplicate_groups"] == 2
    assert tree_digest(folder) == before


def test_digests_and_hashes_with_zero_bytes_are_written_whole(tmp_path):
    """sha256 digests ending in zero bytes and hashes starting with zero digits keep every digit
    (scan holds digests and hashes as fixed-width bytes and numbers, and writes hex at the end)."""
    import hashlib
    import io

    root = tmp_path / "zeros"
    buf = io.BytesIO()
    picture(3).save(buf, "PNG")
    png = buf.getvalue()
    data = next(png + k.to_bytes(4, "big") for k in range(1 << 22)
                if hashlib.sha256(png + k.to_bytes(4, "big")).digest()[-2:] == b"\0\0")  # bytes after IEND: ignored
    (root / "sub").mkdir(parents=True)
    (root / "zero_tail.png").write_bytes(data)
    (root / "sub" / "same.png").write_bytes(data)
    save(Image.new("L", (64, 64), 0), root / "black.png")  # flat: pHash and dHash all zeros
    assert scan(root, "-o", tmp_path / "z.parquet", "-j", "2", "-q")[0] == 0
    rows = rows_of(tmp_path / "z.parquet")
    digest = hashlib.sha256(data).hexdigest()
    assert digest.endswith("0000") and rows["zero_tail.png"]["sha256"] == rows["sub/same.png"]["sha256"] == digest
    assert (rows["zero_tail.png"]["duplicate_of"], rows["zero_tail.png"]["duplicate_kind"]) == ("sub/same.png", "exact")
    assert rows["black.png"]["phash"] == rows["black.png"]["dhash"] == "0" * 16


def test_in_process_and_pool_give_the_same_rows(folder, tmp_path):
    assert scan(folder, "-o", tmp_path / "pool.parquet", "-j", "2", "-q")[0] == 0
    assert scan(folder, "-o", tmp_path / "inline.parquet", "-j", "0", "-q")[0] == 0
    pool, inline = rows_of(tmp_path / "pool.parquet"), rows_of(tmp_path / "inline.parquet")
    assert pool == inline


def test_limits_flags_and_an_output_inside_the_folder(folder):
    from PIL import ImageEnhance

    save(picture(12, (640, 480)), folder / "dino.png")
    brighter = ImageEnhance.Brightness(picture(12, (640, 480))).enhance(1.15).resize((320, 240), Image.LANCZOS)
    save(brighter, folder / "dino_brighter.jpg", quality=92)  # a few bits from dino.png
    out = folder / "scan.parquet"
    assert scan(folder, "-o", out, "-q")[0] == 0
    assert rows_of(out)["dino_brighter.jpg"]["duplicate_of"] == "dino.png"
    assert scan(folder, "-o", out, "--dhash-max", "0", "--phash-max", "0", "-q")[0] == 0
    rows = rows_of(out)
    assert "scan.parquet" not in rows  # the first run's output is not listed as an input file
    assert rows["dino_brighter.jpg"]["duplicate_of"] is None  # no longer within the limits
    assert rows["copy_of_a.jpg"]["duplicate_of"] == "a.jpg"  # exact copies always are
    odd = folder / "sub" / "sc\\an \\x41.parquet"  # shown escaped in `path`: matched all the same
    assert scan(folder, "-o", odd, "-q")[0] == scan(folder, "-o", odd, "-q")[0] == 0
    assert set(rows_of(odd)) == set(rows) | {"scan.parquet"}


def test_missing_folder_is_an_input_error(tmp_path):
    code, output = scan(tmp_path / "nope", "-o", tmp_path / "x.parquet")
    assert code == EXIT_INPUT and "not found" in output
    assert not (tmp_path / "x.parquet").exists()


def test_summary_line_is_one_json_log_record_with_log_format_json(folder, tmp_path):
    result = CliRunner().invoke(cli, ["scan", str(folder), "-o", str(tmp_path / "s.parquet"), "--log-format", "json"],
                                catch_exceptions=False)
    assert result.exit_code == 0
    records = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    last = records[-1]["message"]
    assert "16 files: 10 ok, 2 duplicate, 4 error (2 duplicate groups)" in last and "images/s" in last
    assert "16 files: 10 ok" in result.stdout  # the human summary is on stdout, as classify's


_MEASURE = """import json, resource, sys
from dinobatch.cli import cli
try:
    cli.main(sys.argv[1:], prog_name="dinobatch")
except SystemExit as exc:
    rc = exc.code
print(json.dumps({"rc": rc, "torch": "torch" in sys.modules, "scipy": "scipy" in sys.modules,
                  "pandas": "pandas" in sys.modules,
                  "self_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "child_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""
# Linux carries a process's peak RSS across exec, so a child forked from this (big) test process
# would report this process's peak: a small wrapper in between starts the measured run afresh.
_WRAPPER = "import subprocess, sys; sys.exit(subprocess.run([sys.executable, '-c', *sys.argv[1:]]).returncode)"


def _run_in_subprocess(args: list[str]) -> dict:
    """Run the CLI in a fresh interpreter; report its exit code, torch, and peak RSS of it and its workers."""
    out = subprocess.run([sys.executable, "-c", _WRAPPER, _MEASURE, *args], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_scan_never_imports_torch_scipy_nor_pandas(folder, tmp_path):
    # workers are forked: what the main process has not imported (checked here with -j 0) they import
    # themselves; scipy would cost each of them 0.2-0.5 s, torch far more. pyarrow imports pandas
    # (0.5 s) for some conversions where it is installed (the bench extra brings it).
    for workers in ("2", "0"):
        got = _run_in_subprocess(["scan", str(folder), "-o", str(tmp_path / "s.parquet"), "-j", workers, "-q"])
        assert got["rc"] == 0 and got["torch"] is False and got["scipy"] is False and got["pandas"] is False


def test_peak_memory_stays_under_1_gb_with_very_large_images(tmp_path):
    root = tmp_path / "large"
    save(picture(1, (8000, 6000)), root / "huge.jpg", quality=90)  # 48 megapixels
    rgba = picture(2, (8000, 6000)).convert("RGBA")  # 192 MB decoded, reduced in bands
    save(rgba, root / "huge.png", compress_level=1)
    save(rgba.convert("P", palette=Image.ADAPTIVE), root / "huge_palette.png", compress_level=1)
    del rgba
    for i in range(6):
        save(picture(i + 10), root / f"small{i}.jpg")
    got = _run_in_subprocess(["scan", str(root), "-o", str(tmp_path / "s.parquet"), "-j", "2", "-q"])
    assert got["rc"] == 0
    rows = rows_of(tmp_path / "s.parquet")
    assert all(r["status"] != "error" for r in rows.values()) and rows["huge.png"]["width"] == 8000
    # an upper bound: the main process's peak plus each worker at the largest worker's peak
    bound_mib = (got["self_kib"] + 2 * got["child_kib"]) / 1024
    assert bound_mib < 1024, f"main {got['self_kib'] // 1024} MiB, largest worker {got['child_kib'] // 1024} MiB"
