"""Stage decode: a content's bytes read from any of its files, checked against its sha256, and decoded
once into facts, perceptual hashes and the model's input."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dinobatch.imaging.decode import DecodeError, decode, quiet_decoding
from dinobatch.imaging.preprocess import model_input_hwc
from dinobatch.io.walk import read_bytes, read_error
from dinobatch.models.file import Preprocessing
from dinobatch.runtime import faults
from dinobatch.runtime.dataset import Rec
from dinobatch.schema import FACT_FIELDS, Col

__all__ = ["WorkItem", "Contents", "Rec", "Gate", "CHANGED", "ABSPATHS", "CHANGED_PATHS", "DECODED_SCHEMA",
           "decode_item", "decode_batch"]

CHANGED = "file changed while dinobatch was reading it; the next run classifies it"
ABSPATHS = "abspaths"  # decode_batch's input: every file that holds the content (os.fsencode'd)
CHANGED_PATHS = Rec.CHANGED  # decode_batch's output: the files whose bytes no longer had the content's sha256
DECODED_SCHEMA = pa.schema([pa.field(Col.SHA256, pa.string()), pa.field(Col.ERROR, pa.string()),
                            pa.field(CHANGED_PATHS, pa.list_(pa.binary())), *FACT_FIELDS])

# JPEGs the device decodes (nvjpeg): 8-bit RGB or grey, not beyond this many pixels; others, and any
# the device fails on, go through the CPU path.
_DEVICE_JPEG_MODES = ("RGB", "L")
_DEVICE_JPEG_MAX_PIXELS = 50_000_000

# heavy(nbytes): a context held around a decode that allocates nbytes, handed in by the engine (the
# local one passes imaging.decode_budget.hold, a memory budget shared by its workers); None: no gate.
Gate = Callable[[int], ContextManager[Any]]


@dataclass(frozen=True)
class WorkItem:
    """One unique content to decode and infer: the files that hold it and the sha256 they must have."""

    abspaths: tuple[str, ...]
    sha256: str


class Contents(Sequence[WorkItem]):
    """The contents to decode and infer, first seen first, each with every file that holds it: WorkItems
    made on demand from arrays, so that the list of work holds no Python object per file."""

    def __init__(self, abspaths: pa.ChunkedArray, shas: pa.ChunkedArray, cached: pa.Array):
        new = np.flatnonzero(pc.and_(shas.is_valid(), pc.invert(pc.is_in(shas, value_set=cached))).to_numpy(
            zero_copy_only=False))
        new_shas = shas.take(pa.array(new, pa.int64()))
        self.shas = pc.unique(new_shas)  # in order of first appearance
        content = pc.index_in(new_shas, value_set=self.shas).to_numpy(zero_copy_only=False)
        by_content = new[np.argsort(content, kind="stable")]  # files of each content together, in walk order
        self.abspaths = abspaths.take(pa.array(by_content, pa.int64())).combine_chunks()
        self.starts = np.concatenate([[0], np.cumsum(np.bincount(content, minlength=len(self.shas)))])

    def __len__(self) -> int:
        return len(self.shas)

    def __getitem__(self, i):
        i = range(len(self))[i]  # negative indices and IndexError as a list has them
        if isinstance(i, range):
            return [self[j] for j in i]
        paths = self.abspaths[self.starts[i]:self.starts[i + 1]].to_pylist()
        return WorkItem(tuple(os.fsdecode(p) for p in paths), self.shas[i].as_py())

    def table(self) -> pa.Table:
        """decode_batch's input for every content: ABSPATHS (list of binary) and sha256."""
        offsets = pa.array(self.starts, pa.int32())
        return pa.table({ABSPATHS: pa.ListArray.from_arrays(offsets, self.abspaths), Col.SHA256: self.shas})


def _read_content(item: WorkItem) -> tuple[bytes | None, str, list[str], str | None]:
    """The bytes of the first of item's files that still has its sha256 (any copy will do) and that
    file, the files found changed on the way, and the error of the last file that could not be read."""
    changed, unread = [], None
    for path in item.abspaths:
        try:
            candidate = read_bytes(path)
        except OSError as exc:
            unread = read_error(exc)
            continue
        if hashlib.sha256(candidate).hexdigest() == item.sha256:
            return candidate, path, changed, unread
        changed.append(path)
    return None, "", changed, unread


def decode_item(item: WorkItem, prep: Preprocessing, prepare: Callable[[Any], dict[str, Any]], *,
                jpeg_to_device: bool = False, heavy: Gate | None = None) -> dict[str, Any]:
    """One content decoded: its record (keys: Rec; sha256, error, changed, facts), with what
    prepare(picture) returns where the CPU prepares the model input (a tensor, or where the pixels
    were put). heavy: the engine's memory gate around the decode (see Gate).

    With jpeg_to_device, a plain JPEG's bytes and orientation travel instead (the device decodes
    them); facts and hashes still come from this CPU decode, so they do not depend on the device."""
    data, path, changed, unread = _read_content(item)
    record: dict[str, Any] = {Rec.SHA256: item.sha256, Rec.ERROR: None, Rec.CHANGED: tuple(changed)}
    if data is None:
        record[Rec.ERROR] = unread or CHANGED
        return record
    try:
        faults.point("decode", path)
        dec = decode(data, min_side=prep.resize, heavy=heavy)
        if (jpeg_to_device and dec.format == "JPEG" and dec.mode in _DEVICE_JPEG_MODES
                and dec.width * dec.height <= _DEVICE_JPEG_MAX_PIXELS):
            import torch

            record[Rec.JPEG] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            record[Rec.ORIENTATION] = dec.orientation
        else:
            record.update(prepare(dec.image))
    except Exception as exc:  # e.g. MemoryError on a hostile file: this file's row, not the run's end
        record[Rec.ERROR] = decode_error(exc)
        return record
    record[Rec.FACTS] = facts(dec)
    return record


def decode_error(exc: Exception) -> str:
    """Why a content could not be decoded or prepared for the model, as its row (and serve's 400) says."""
    if isinstance(exc, DecodeError):
        return str(exc)
    return f"cannot prepare image for the model: {type(exc).__name__}: {exc}"


def facts(dec: Any) -> dict[str, Any]:
    """A decoded image's facts and hashes, as a row has them (imaging.decode's result)."""
    return {Col.FORMAT: dec.format, Col.WIDTH: dec.width, Col.HEIGHT: dec.height, Col.MODE: dec.mode,
            Col.PHASH: dec.phash, Col.DHASH: dec.dhash}


def decode_batch(batch: pa.Table | pa.RecordBatch, prep: Preprocessing, *,
                 heavy: Gate | None = None) -> tuple[pa.Table, np.ndarray]:
    """decode_item over a batch of contents (columns ABSPATHS, sha256): a DECODED_SCHEMA table, and the
    model inputs as uint8 NHWC pixels (zeros where the row has an error), as a cluster map would call it.
    stages.infer.cache_rows turns the table and its predictions into what the job commits."""
    shas = batch.column(Col.SHA256).to_pylist()
    pixels = np.zeros((len(shas), prep.crop, prep.crop, 3), np.uint8)
    records = []
    with quiet_decoding():  # once per batch, not per file
        for row, (paths, sha) in enumerate(zip(batch.column(ABSPATHS).to_pylist(), shas)):
            def into_row(image, row=row) -> dict[str, Any]:
                pixels[row] = model_input_hwc(image, prep)
                return {}

            item = WorkItem(tuple(os.fsdecode(p) for p in paths), sha)
            records.append(decode_item(item, prep, into_row, heavy=heavy))
    facts = [r.get(Rec.FACTS) or {} for r in records]
    columns = {Col.SHA256: shas, Col.ERROR: [r[Rec.ERROR] for r in records],
               CHANGED_PATHS: [[os.fsencode(p) for p in r[Rec.CHANGED]] for r in records],
               **{f.name: [f_.get(f.name) for f_ in facts] for f in FACT_FIELDS}}
    return pa.table(columns, schema=DECODED_SCHEMA), pixels
