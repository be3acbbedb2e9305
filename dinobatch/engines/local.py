"""The local engine: the stages scheduled on this machine. Fingerprint in this process; decode in a
burst pool between forward passes on CPU, in DataLoader workers beside the model on CUDA (a worker's
death costs only its file); the model in this process; progress reported as batches finish."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import pyarrow as pa

from dinobatch.engines import Progress
from dinobatch.imaging import decode_budget
from dinobatch.imaging.decode import decode
from dinobatch.imaging.preprocess import device_model_input, model_input, model_input_hwc, orient_tensor
from dinobatch.models.file import LoadedModel, Preprocessing
from dinobatch.runtime.dataset import Rec
from dinobatch.runtime.device import Runtime, default_workers, usable_cores
from dinobatch.schema import Col
from dinobatch.stages.decode import WorkItem, decode_item
from dinobatch.stages.fingerprint import fingerprint, with_known_shas
from dinobatch.stages.infer import ContentResult, InferredBatch, Predictor, content_results, inferred_batch

__all__ = ["LocalEngine", "Progress", "ImageDataset", "decode_workers", "decoded_batches", "device_batch", "predict"]

log = logging.getLogger(__name__)

# Files fingerprinted between two progress reports: small enough for a bar that moves on slow disks,
# large enough that a batch's Arrow overhead is nothing beside reading its files.
_FINGERPRINT_BATCH = 512


@dataclass(frozen=True)
class LocalEngine:
    """Runs classify's fingerprint and decode+infer stages on this machine, reporting progress
    (an engines.Engine)."""

    runtime: Runtime
    workers: int | None = None  # decode processes as asked (-j); None: decode_workers decides
    progress: Progress | None = None

    def fingerprint(self, files: pa.Table, index: pa.Table) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
        """sha256 and error of each walked file (aligned with files), hashed in this process."""
        columns = with_known_shas(files, index)
        shas, errors, done = [], [], 0
        for batch in columns.to_batches(max_chunksize=_FINGERPRINT_BATCH):
            part = fingerprint(batch)
            shas.extend(part[Col.SHA256].chunks)
            errors.extend(part[Col.ERROR].chunks)
            done += batch.num_rows
            if self.progress:
                self.progress("fingerprint", done, files.num_rows)
        return pa.chunked_array(shas, pa.string()), pa.chunked_array(errors, pa.string())

    def infer(self, items: Sequence[WorkItem], predictor: Predictor, *,
              jpeg_on_device: bool = False) -> Iterator[InferredBatch]:
        """One InferredBatch per batch, in input order (failed contents too); progress is reported
        once the caller has taken (and committed) each batch."""
        done = 0
        for results in infer(items, predictor, workers=self.workers, jpeg_on_device=jpeg_on_device):
            yield inferred_batch(results)
            done += len(results)
            if self.progress:
                self.progress("infer", done, len(items))

    def resolved(self) -> dict[str, Any]:
        """The -j the run amounts to, for its saved configuration (workers None: a burst pool of every core)."""
        return {"workers": decode_workers(self.runtime, self.workers)}


class ImageDataset:
    """Map-style dataset over the decode stage (a runtime.dataset.DecodeDataset): item i is decoded
    once into facts, hashes and model input (decode_item), by whichever process the engine chose,
    within the decode memory budget that process holds (imaging.decode_budget); with jpeg_to_device
    a plain JPEG's model input is left to the device (its bytes travel instead of pixels)."""

    def __init__(self, items: Sequence[WorkItem], prep: Preprocessing, jpeg_to_device: bool = False):
        self.items = items  # a Sequence: classify passes a lazy one (no object per file held)
        self.prep = prep
        self.jpeg_to_device = jpeg_to_device

    @property
    def crop(self) -> int:
        """The model input's side (pixels)."""
        return self.prep.crop

    def __len__(self) -> int:
        return len(self.items)

    def window(self, lo: int, hi: int) -> "ImageDataset":
        """Items lo..hi-1 as a dataset of their own (the items are not copied)."""
        return ImageDataset(_Window(self.items, lo, hi), self.prep, self.jpeg_to_device)

    def cost(self, index: int) -> int:
        """The bytes of item index's first file: what its decoding time follows (0 if unknown)."""
        try:
            return os.stat(self.items[index].abspaths[0]).st_size
        except (OSError, IndexError):
            return 0

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Item index decoded, its model input a CPU tensor (uint8 CHW) under Rec.TENSOR: a DataLoader's item."""
        return self.record(index, lambda image: {Rec.TENSOR: model_input(image, self.prep)})

    def model_input_hwc(self, image):
        """A decoded picture as the model's input, uint8 crop x crop x 3 (numpy): what a burst worker
        writes into its shared slot, the same pixels as __getitem__'s tensor."""
        return model_input_hwc(image, self.prep)

    def record(self, index: int, prepare: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        """Item index decoded (decode_item), prepare(picture) telling where its model input went."""
        return decode_item(self.items[index], self.prep, prepare, jpeg_to_device=self.jpeg_to_device,
                           heavy=decode_budget.hold)

    def failed(self, index: int, reason: str) -> dict[str, Any]:
        """Item index's record when its decoder crashed the process (again, decoded alone)."""
        return {Rec.SHA256: self.items[index].sha256, Rec.ERROR: reason, Rec.CHANGED: ()}


class _Window(Sequence):
    """items[lo:hi] of a sequence that may be lazy (classify's builds a WorkItem per access)."""

    def __init__(self, items: Sequence[WorkItem], lo: int, hi: int):
        self.items, self.lo, self.hi = items, lo, min(hi, len(items))

    def __len__(self) -> int:
        return max(0, self.hi - self.lo)

    def __getitem__(self, i: int) -> WorkItem:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.items[self.lo + i]


def decode_workers(runtime: Runtime, requested: int | None) -> int | None:
    """Which processes decode: None for a burst pool of every core (CPU, nothing asked, more than one
    core), else that many DataLoader workers beside the model (0: in this process)."""
    if requested is None and not runtime.is_cuda and usable_cores() > 1:
        return None
    return default_workers(runtime.device.type, requested)


def decoded_batches(dataset: ImageDataset, runtime: Runtime, batch_size: int, workers: int | None) -> Iterator:
    """(records, uint8 batch or None) per batch, decoded by the processes decode_workers picks."""
    from torch.utils.data import DataLoader

    from dinobatch.runtime.burst import burst_batches
    from dinobatch.runtime.loader import collate, loader_batches

    workers = decode_workers(runtime, workers)
    if workers is None:
        return burst_batches(dataset, batch_size, usable_cores())
    if workers == 0:
        return iter(DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate,
                               pin_memory=runtime.pin_memory))  # decoding in this process: nothing to recover
    return loader_batches(dataset, batch_size, workers, runtime.pin_memory)


def _decode_jpegs_on_device(records: list[dict[str, Any]], runtime: Runtime, prep: Preprocessing) -> None:
    """Decode the records' JPEG bytes on the device in one call (per image where the batch fails);
    a JPEG the device cannot decode is prepared on the CPU instead, like any other format."""
    from torchvision.io import ImageReadMode, decode_jpeg

    todo = [r for r in records if r.get(Rec.ERROR) is None and Rec.JPEG in r]
    if not todo:
        return
    try:
        images = decode_jpeg([r[Rec.JPEG] for r in todo], mode=ImageReadMode.RGB, device=runtime.device)
    except RuntimeError:
        images = []
        for r in todo:
            try:
                images.append(decode_jpeg(r[Rec.JPEG], mode=ImageReadMode.RGB, device=runtime.device))
            except RuntimeError:
                images.append(None)
    for r, image in zip(todo, images):
        jpeg, orientation = r.pop(Rec.JPEG), r.pop(Rec.ORIENTATION)
        if image is None:
            log.debug("device JPEG decode failed for %s; using the CPU path", r[Rec.SHA256])
            cpu = decode(jpeg.numpy().tobytes(), min_side=prep.resize).image
            r[Rec.DEVICE_TENSOR] = model_input(cpu, prep).to(runtime.device)
        else:
            r[Rec.DEVICE_TENSOR] = device_model_input(orient_tensor(image, orientation), prep)


def device_batch(records: list[dict[str, Any]], batch, runtime: Runtime, prep: Preprocessing):
    """The batch on the device, uint8 NCHW in record order: CPU-prepared rows copied (non-blocking
    from pinned memory), device-decoded JPEGs put in their places."""
    import torch

    _decode_jpegs_on_device(records, runtime, prep)
    ok = [r for r in records if r.get(Rec.ERROR) is None]
    if not ok:
        return None
    if batch is not None and all(Rec.DEVICE_TENSOR not in r for r in ok):
        return runtime.to_device(batch)
    cpu = iter(runtime.to_device(batch)) if batch is not None else iter(())
    rows = [r.pop(Rec.DEVICE_TENSOR) if Rec.DEVICE_TENSOR in r else next(cpu) for r in ok]
    return torch.stack(rows).contiguous(memory_format=torch.channels_last)


def infer(items: Sequence[WorkItem], predictor: Predictor, *, workers: int | None,
          jpeg_on_device: bool = False) -> Iterator[list[ContentResult]]:
    """Decode (decoded_batches) and infer (predictor) items: one list of ContentResult per batch, in order."""
    if not items:
        return
    prep = predictor.preprocessing
    dataset = ImageDataset(items, prep, jpeg_to_device=jpeg_on_device)
    for records, batch in decoded_batches(dataset, predictor.runtime, predictor.batch_size, workers):
        x = device_batch(records, batch, predictor.runtime, prep)
        yield content_results(records, predictor(x) if x is not None else [])


def predict(model: LoadedModel, runtime: Runtime, items: Sequence[WorkItem], *, batch_size: int | None,
            workers: int | None, embeddings: bool, compile: bool = False,
            jpeg_on_device: bool = False) -> Iterator[list[ContentResult]]:
    """Yield one list of ContentResult per batch, in input order; failed items are results too.

    batch_size None: runtime.device.default_batch_size. workers: see decode_workers. compile:
    torch.compile the model (batches padded to one shape: one compile). jpeg_on_device: nvjpeg."""
    if not items:
        return
    predictor = Predictor(model, runtime, batch_size=batch_size, embeddings=embeddings, compile=compile)
    yield from infer(items, predictor, workers=workers, jpeg_on_device=jpeg_on_device)
