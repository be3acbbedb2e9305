"""Batches in, predictions out: decode in workers, run the model, post-process."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from dinobatch.imaging import decode_budget
from dinobatch.imaging.decode import DecodeError, decode
from dinobatch.imaging.preprocess import device_model_input, model_input, model_input_hwc, orient_tensor
from dinobatch.io.walk import read_bytes, read_error
from dinobatch.models.file import LoadedModel, Preprocessing
from dinobatch.models.forward import compiled, postprocess, forward_with_features
from dinobatch.runtime import faults
from dinobatch.runtime.loader import decoded_batches
from dinobatch.runtime.memory import fit_batch_size
from dinobatch.schema import Col

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkItem:
    """One unique content to decode and infer: the files that hold it and the sha256 they must have."""

    abspaths: tuple[str, ...]
    sha256: str


@dataclass
class ContentResult:
    """Facts, hashes and prediction for one content, or the reason it failed."""

    sha256: str
    error: str | None = None
    facts: dict[str, Any] | None = None  # format, width, height, mode, phash, dhash
    prediction: dict[str, Any] | None = None  # label, confidence, probs, margin, entropy, embedding
    changed: tuple[str, ...] = ()  # files whose bytes no longer match sha256 (changed during the run)


# JPEGs the device decodes (nvjpeg): 8-bit RGB or grey, not beyond this many pixels; others, and any
# the device fails on, go through the CPU path.
_DEVICE_JPEG_MODES = ("RGB", "L")


_DEVICE_JPEG_MAX_PIXELS = 50_000_000


class ImageDataset:
    """Map-style dataset: item i is decoded once into facts, hashes and model input.

    With jpeg_to_device, a plain JPEG's model input is left to the device (its bytes travel
    instead of pixels); facts and hashes still come from the CPU decode, so they are the same
    whichever device ran."""

    def __init__(self, items: Sequence[WorkItem], prep: Preprocessing, jpeg_to_device: bool = False):
        self.items = items  # a Sequence: classify passes a lazy one (no object per file held)
        self.prep = prep
        self.jpeg_to_device = jpeg_to_device

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
        return self.record(index, lambda image: {"tensor": model_input(image, self.prep)})

    def model_input_hwc(self, image):
        return model_input_hwc(image, self.prep)

    def record(self, index: int, prepare: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        """Item index decoded: its record, with what prepare(picture) returns where the CPU
        prepares the model input (a tensor, or where the pixels were put)."""
        item = self.items[index]
        data, changed, unread = None, [], None
        for path in item.abspaths:  # any copy with the right bytes will do
            try:
                candidate = read_bytes(path)
            except OSError as exc:
                unread = read_error(exc)
                continue
            if hashlib.sha256(candidate).hexdigest() == item.sha256:
                data = candidate
                break
            changed.append(path)
        record: dict[str, Any] = {"sha256": item.sha256, "error": None, "changed": tuple(changed)}
        if data is None:
            record["error"] = unread or "file changed while dinobatch was reading it; the next run classifies it"
            return record
        try:
            faults.point("decode", path)
            dec = decode(data, min_side=self.prep.resize, heavy=decode_budget.hold)
            if (self.jpeg_to_device and dec.format == "JPEG" and dec.mode in _DEVICE_JPEG_MODES
                    and dec.width * dec.height <= _DEVICE_JPEG_MAX_PIXELS):
                import torch

                record["jpeg"] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                record["orientation"] = dec.orientation
            else:
                record.update(prepare(dec.image))
        except DecodeError as exc:
            record["error"] = str(exc)
            return record
        except Exception as exc:  # e.g. MemoryError on a hostile file: this file's row, not the run's end
            record["error"] = f"cannot prepare image for the model: {type(exc).__name__}: {exc}"
            return record
        record["facts"] = {Col.FORMAT: dec.format, Col.WIDTH: dec.width, Col.HEIGHT: dec.height,
                           Col.MODE: dec.mode, Col.PHASH: dec.phash, Col.DHASH: dec.dhash}
        return record


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


def _decode_jpegs_on_device(records: list[dict[str, Any]], runtime, prep: Preprocessing) -> None:
    """Decode the records' JPEG bytes on the device in one call (per image where the batch fails);
    a JPEG the device cannot decode is prepared on the CPU instead, like any other format."""
    from torchvision.io import ImageReadMode, decode_jpeg

    todo = [r for r in records if r.get("error") is None and "jpeg" in r]
    if not todo:
        return
    try:
        images = decode_jpeg([r["jpeg"] for r in todo], mode=ImageReadMode.RGB, device=runtime.device)
    except RuntimeError:
        images = []
        for r in todo:
            try:
                images.append(decode_jpeg(r["jpeg"], mode=ImageReadMode.RGB, device=runtime.device))
            except RuntimeError:
                images.append(None)
    for r, image in zip(todo, images):
        jpeg, orientation = r.pop("jpeg"), r.pop("orientation")
        if image is None:
            log.debug("device JPEG decode failed for %s; using the CPU path", r["sha256"])
            cpu = decode(jpeg.numpy().tobytes(), min_side=prep.resize).image
            r["device_tensor"] = model_input(cpu, prep).to(runtime.device)
        else:
            r["device_tensor"] = device_model_input(orient_tensor(image, orientation), prep)


def device_batch(records: list[dict[str, Any]], batch, runtime, prep: Preprocessing):
    """The batch on the device, uint8 NCHW in record order: CPU-prepared rows copied (non-blocking
    from pinned memory), device-decoded JPEGs put in their places."""
    import torch

    _decode_jpegs_on_device(records, runtime, prep)
    ok = [r for r in records if r.get("error") is None]
    if not ok:
        return None
    if batch is not None and all("device_tensor" not in r for r in ok):
        return runtime.to_device(batch)
    cpu = iter(runtime.to_device(batch)) if batch is not None else iter(())
    rows = [r.pop("device_tensor") if "device_tensor" in r else next(cpu) for r in ok]
    return torch.stack(rows).contiguous(memory_format=torch.channels_last)


def predict(model: LoadedModel, runtime, items: Sequence[WorkItem], *, batch_size: int | None, workers: int | None,
            embeddings: bool, compile: bool = False, jpeg_on_device: bool = False) -> Iterator[list[ContentResult]]:
    """Yield one list of ContentResult per batch, in input order; failed items are results too.

    batch_size None: 32 on CPU, the largest that fits on CUDA. workers None: on CPU, a burst pool
    of every core between forward passes; on CUDA, DataLoader workers decoding ahead. compile:
    torch.compile the model (batches padded to one shape: one compile). jpeg_on_device: nvjpeg."""
    import torch

    if not items:
        return
    spec = model.spec
    module = runtime.prepare(model.module)
    if batch_size is None:
        batch_size = fit_batch_size(module, runtime, spec.preprocessing.crop) if runtime.is_cuda else 32
        log.info("batch size %d", batch_size)
    forward = compiled(module, batch_size) if compile else (lambda x: forward_with_features(module, x))
    mean = torch.tensor(spec.preprocessing.mean, device=runtime.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.preprocessing.std, device=runtime.device).view(1, 3, 1, 1) * 255
    dataset = ImageDataset(items, spec.preprocessing, jpeg_to_device=jpeg_on_device)
    for records, batch in decoded_batches(dataset, runtime, batch_size, workers):
        preds: list[dict[str, Any] | str] = []
        x = device_batch(records, batch, runtime, spec.preprocessing)
        if x is not None:
            with runtime.autocast():
                logits, features = forward(x.to(torch.float32, copy=True).sub_(mean).div_(std))
            preds = postprocess(logits, features, spec.labels, spec.temperature, embeddings)
        it = iter(preds)
        results = []
        for r in records:
            pred = next(it) if r["error"] is None else None
            error = pred if isinstance(pred, str) else r["error"]
            results.append(ContentResult(r["sha256"], error, r.get("facts") if error is None else None,
                                         None if error else pred, r["changed"]))
        yield results
