"""Batches in, predictions out: decode in DataLoader workers, run the model, post-process."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from . import decode_budget, faults
from .burst import BURST_IMAGES, burst_batches
from .decode import DecodeError, decode
from .model import LoadedModel, Preprocessing
from .scan import read_bytes, read_error
from .schema import Col
from .workers import loader_context, loader_worker_init, this_process

__all__ = ["WorkItem", "ContentResult", "ImageDataset", "predict", "model_input", "forward_with_features",
           "orient_tensor", "device_model_input", "fit_batch_size", "model_input_hwc"]

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


def model_input(image, prep: Preprocessing):
    """Resize the shorter side and centre-crop in one resampling step; uint8 CHW (normalised on device)."""
    import torchvision.transforms.functional as F

    return F.pil_to_tensor(_resized_crop(image, prep))


def model_input_hwc(image, prep: Preprocessing):
    """model_input's pixels as a numpy HWC array (channels-last, as burst decoding hands them over)."""
    import numpy as np

    return np.asarray(_resized_crop(image, prep))


def _resized_crop(image, prep: Preprocessing):
    """The centre crop of the picture resized on its shorter side, in one resampling step.

    Resampling only the source box that lands in the crop gives torchvision's resize-then-crop
    (within one grey level) without ever materialising the resized image, so a 300000x1 strip
    costs a crop's worth of memory, not gigabytes.
    """
    from PIL import Image

    w, h = image.size
    if w <= h:
        nw, nh = prep.resize, int(prep.resize * h / w)
    else:
        nw, nh = int(prep.resize * w / h), prep.resize
    c = prep.crop
    left, top = int(round((nw - c) / 2.0)), int(round((nh - c) / 2.0))
    sx, sy = w / nw, h / nh
    box = (left * sx, top * sy, (left + c) * sx, (top + c) * sy)
    resample = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
    return image.resize((c, c), resample[prep.interpolation], box=box)


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


def collate(records: list[dict[str, Any]]):
    """Stack the CPU-prepared tensors of decoded items; keep every record (failed ones too) in order.

    Records whose JPEG bytes go to the device keep them; device_batch puts everything together."""
    import torch

    tensors = [r.pop("tensor") for r in records if r.get("error") is None and "tensor" in r]
    batch = torch.stack(tensors) if tensors else None
    return records, batch


_EXIF_ORIENT = {  # EXIF orientation -> the same transform as PIL's exif_transpose, on a CHW tensor
    2: lambda x: x.flip(2), 3: lambda x: x.flip(1).flip(2), 4: lambda x: x.flip(1),
    5: lambda x: x.transpose(1, 2), 6: lambda x: x.transpose(1, 2).flip(2),
    7: lambda x: x.transpose(1, 2).flip(1).flip(2), 8: lambda x: x.transpose(1, 2).flip(1),
}


def orient_tensor(x, orientation: int):
    """Apply an EXIF orientation to a CHW image tensor (what ImageOps.exif_transpose does to a picture)."""
    transform = _EXIF_ORIENT.get(orientation)
    return transform(x) if transform else x


def device_model_input(image, prep: Preprocessing):
    """Resize the shorter side (antialiased) and centre-crop a CHW uint8 tensor where it lies."""
    import torchvision.transforms.v2.functional as F
    from torchvision.transforms import InterpolationMode

    mode = {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR,
            "bicubic": InterpolationMode.BICUBIC}[prep.interpolation]
    return F.center_crop(F.resize(image, [prep.resize], interpolation=mode, antialias=True), [prep.crop])


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


def forward_with_features(module, x):
    """Logits and the penultimate (pooled) features of a torchvision ResNet in one pass."""
    import torch

    x = module.maxpool(module.relu(module.bn1(module.conv1(x))))
    x = module.layer4(module.layer3(module.layer2(module.layer1(x))))
    features = torch.flatten(module.avgpool(x), 1)
    return module.fc(features), features


def _batches(dataset: "ImageDataset", runtime, batch_size: int, workers: int | None) -> Iterator:
    """(records, batch) per batch: a burst pool on CPU by default, else a DataLoader with workers."""
    from torch.utils.data import DataLoader

    from .device import default_workers, usable_cores

    if workers is None and not runtime.is_cuda and usable_cores() > 1:
        return burst_batches(dataset, batch_size, usable_cores())
    workers = default_workers(runtime.device.type, workers)
    if workers == 0:
        return iter(DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate,
                               pin_memory=runtime.pin_memory))  # decoding in this process: nothing to recover
    return _loader_batches(dataset, batch_size, workers, runtime.pin_memory)


# Batches a DataLoader worker decodes ahead (its prefetch_factor): with `workers` of them, the
# batches in flight when one dies are at most _PREFETCH x workers from the first not yet handed out.
_PREFETCH = 4
# How long a failed next() waits for a dying worker to be seen dead: the error can come first (a
# lost connection to the worker, the pin-memory thread that was reading from it).
_DEATH_GRACE_S = 5.0


def _loader_batches(dataset: "ImageDataset", batch_size: int, workers: int, pin_memory: bool) -> Iterator:
    """DataLoader batches in order; a worker that dies (a C decoder crashing on a hostile file, the
    OOM killer) costs the file it was decoding, not the run. The batches the loader had in flight
    are decoded again by burst_batches, which finds the file and makes it an error record, and a
    fresh loader takes the rest. Without this a nightly job would die on the same file every night."""
    from torch.utils.data import DataLoader

    done, total = 0, len(dataset)
    with _deaths_raised_only_by_reads():
        while done < total:
            loader = DataLoader(dataset.window(done, total), batch_size=batch_size, shuffle=False,
                                num_workers=workers, collate_fn=collate, pin_memory=pin_memory,
                                prefetch_factor=_PREFETCH, worker_init_fn=_loader_worker_init(),
                                multiprocessing_context=loader_context())
            batches = None
            try:
                while True:
                    try:  # only around starting the workers and taking a batch, never around the yield
                        if batches is None:
                            batches = _started(loader)
                        records, batch = _read(batches)
                    except StopIteration:
                        return
                    except Exception as exc:
                        if not (isinstance(exc, _WorkerDied) or _worker_died(exc, batches)):
                            raise
                        break
                    done += len(records)
                    yield records, batch
            finally:  # workers shut down here, whatever ends the loop, before the handler changes back
                _shut_down(batches)
            suspects = min(total, done + _PREFETCH * workers * batch_size)
            if suspects == done:  # every batch was read: nothing was lost, nothing to decode again
                log.debug("a decoding worker was gone after the last batch; nothing to decode again")
                return
            log.warning("a decoding worker died; decoding the %d files it may have held again, each crash "
                        "costing only its own file", suspects - done)
            # bursts of BURST_IMAGES at most: a crash in one costs that many processes of one file each
            for records, batch in burst_batches(dataset.window(done, suspects), min(batch_size, BURST_IMAGES),
                                                workers):
                done += len(records)
                yield records, batch


def _loader_worker_init() -> Callable[[int], None]:
    """A loader's worker_init_fn: die with this process, then hold this loader's decode budget (a
    fresh one per loader: a worker killed holding a share must not leak it into the next loader)."""
    return functools.partial(_start_loader_worker, loader_worker_init(this_process()), decode_budget.from_env())


def _start_loader_worker(start: Callable[[int], None], budget: decode_budget.DecodeBudget, worker_id: int) -> None:
    start(worker_id)
    decode_budget.install(budget)


class _WorkerDied(Exception):
    """A worker of the loader being read is dead."""


_READING: list = []  # the loader iterator that next() is reading, while it is


def _read(batches):
    """next(batches), or _WorkerDied if one of its workers is dead, before or during the read.

    Before: a worker killed while the model ran may have left its last message half-written, and
    reading that would wait for the rest for ever. During: the SIGCHLD handler below raises into
    the read, as torch's own would."""
    _READING.append(batches)
    try:
        if _dead(batches):
            raise _WorkerDied()
        return next(batches)
    finally:
        _READING.clear()


def _shut_down(batches) -> None:
    """Stop a loader iterator's workers now, not whenever the iterator is collected."""
    shut_down = getattr(batches, "_shutdown_workers", None)  # what torch's iterator runs when collected
    if shut_down is not None:
        shut_down()


def _dead(batches) -> bool:
    return any(not p.is_alive() for p in getattr(batches, "_workers", None) or ())  # torch keeps them there


def _on_sigchld(signum, frame) -> None:
    """classify's SIGCHLD handler while its loaders run: a worker's death is raised only into a read."""
    if _READING and _dead(_READING[0]):
        raise _WorkerDied()


def _started(loader) -> Iterator:
    """iter(loader), with the handler of _deaths_raised_only_by_reads put back at once if torch has
    just installed its own (it does, once per process, when the first loader starts workers)."""
    import signal

    try:
        return iter(loader)
    finally:
        if _in_main_thread():
            handler = signal.getsignal(signal.SIGCHLD)
            if handler is not _on_sigchld:
                _TORCH_SIGCHLD[:] = [handler]
                signal.signal(signal.SIGCHLD, _on_sigchld)


def _worker_died(exc: Exception, batches) -> bool:
    """Whether exc, raised while starting or reading a loader, comes from a worker that died: torch
    says so itself, or (an error met on the way, such as a lost connection) one of its workers is
    dead within a few seconds. Any other error, a worker's own exception included, is not one."""
    if isinstance(exc, RuntimeError) and str(exc).startswith("DataLoader worker"):
        return True
    if str(exc).startswith("Caught "):  # torch re-raising an exception from a worker (or its pin thread)
        return False
    deadline = time.monotonic() + _DEATH_GRACE_S
    while getattr(batches, "_workers", None):
        if _dead(batches):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return False


_TORCH_SIGCHLD: list = []  # torch's SIGCHLD handler, when it installed one while ours was in place
_DEPTH: list = []  # one entry per _deaths_raised_only_by_reads entered (loaders read side by side)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _deaths_raised_only_by_reads() -> Iterator[None]:
    """While classify's loaders run, a worker's death is raised only where a batch is read.

    A DataLoader with workers installs a SIGCHLD handler (once per process) that raises a worker's
    death as a RuntimeError in the main thread at whatever it is doing: inside the model's forward
    pass, or while a cache part is being committed, where nothing can recover. In its place
    _on_sigchld raises only into a read (_read), and _read checks before it reads. The handler
    that was there (torch's, if it has installed one meanwhile) is put back after."""
    import signal

    if not _in_main_thread():
        yield  # signal handlers belong to the main thread; torch installs none from here either
        return
    _DEPTH.append(None)
    if len(_DEPTH) > 1:  # an enclosing loader has put the handler in place and will put it back
        try:
            yield
        finally:
            _DEPTH.pop()
        return
    before = signal.getsignal(signal.SIGCHLD)
    before = signal.SIG_DFL if before is None else before  # None: set from C, not restorable
    _TORCH_SIGCHLD.clear()
    signal.signal(signal.SIGCHLD, _on_sigchld)
    try:
        yield
    finally:
        _DEPTH.pop()
        signal.signal(signal.SIGCHLD, _TORCH_SIGCHLD.pop() if _TORCH_SIGCHLD else before)


def _compiled(module, batch_size: int):
    """torch.compile'd forward; every batch padded to batch_size so the graph compiles once."""
    import torch

    compiled = torch.compile(lambda x: forward_with_features(module, x), dynamic=False)

    def forward(x):
        n = x.shape[0]
        if n < batch_size:
            pad = x.new_zeros((batch_size - n, *x.shape[1:]))
            x = torch.cat([x, pad]).contiguous(memory_format=torch.channels_last)
        logits, features = compiled(x)
        return logits[:n], features[:n]

    return forward


def _postprocess(logits, features, labels: Sequence[str], temperature: float,
                 embeddings: bool) -> list[dict[str, Any] | str]:
    """Probabilities (temperature-scaled softmax), margin and entropy per row; a reason where not finite."""
    import torch

    probs = torch.softmax(logits.float() / temperature, dim=1).cpu()  # one device-to-host copy per batch
    feats = features.float().cpu() if embeddings else None
    top_p, top_i = probs.topk(min(2, probs.shape[1]), dim=1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1)
    finite = torch.isfinite(probs).all(dim=1).tolist()
    out: list[dict[str, Any] | str] = []
    for row, (p, i, ok) in enumerate(zip(top_p.tolist(), top_i.tolist(), finite)):
        if not ok:
            out.append("the model produced non-finite outputs (NaN or infinity) for this image")
            continue
        out.append({Col.LABEL: labels[i[0]], Col.CONFIDENCE: p[0], Col.PROBS: probs[row].tolist(),
                    Col.MARGIN: p[0] - p[1] if len(p) > 1 else p[0], Col.ENTROPY: float(entropy[row]),
                    Col.EMBEDDING: feats[row].tolist() if feats is not None else None})
    return out


def fit_batch_size(module, runtime, crop: int, largest: int = 512) -> int:
    """On CUDA, the largest power-of-two batch up to `largest` whose forward pass fits in memory."""
    import torch

    size = largest
    while size > 1:
        try:
            with runtime.autocast():
                x = torch.zeros(size, 3, crop, crop, device=runtime.device).contiguous(
                    memory_format=torch.channels_last)
                forward_with_features(module, x)
            torch.cuda.synchronize(runtime.device)
            return size
        except torch.cuda.OutOfMemoryError:
            size //= 2
        finally:
            torch.cuda.empty_cache()
    return 1


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
    forward = _compiled(module, batch_size) if compile else (lambda x: forward_with_features(module, x))
    mean = torch.tensor(spec.preprocessing.mean, device=runtime.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.preprocessing.std, device=runtime.device).view(1, 3, 1, 1) * 255
    dataset = ImageDataset(items, spec.preprocessing, jpeg_to_device=jpeg_on_device)
    for records, batch in _batches(dataset, runtime, batch_size, workers):
        preds: list[dict[str, Any] | str] = []
        x = device_batch(records, batch, runtime, spec.preprocessing)
        if x is not None:
            with runtime.autocast():
                logits, features = forward(x.to(torch.float32, copy=True).sub_(mean).div_(std))
            preds = _postprocess(logits, features, spec.labels, spec.temperature, embeddings)
        it = iter(preds)
        results = []
        for r in records:
            pred = next(it) if r["error"] is None else None
            error = pred if isinstance(pred, str) else r["error"]
            results.append(ContentResult(r["sha256"], error, r.get("facts") if error is None else None,
                                         None if error else pred, r["changed"]))
        yield results
