"""Fine-tune a torchvision ResNet on a manifest: the seed's recipe as a rerunnable command.

Every random choice (initial classifier, sample order, augmentation) is derived from the seed,
the epoch and the sample, so a run resumed from its per-epoch checkpoint ends exactly where an
uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

from dinobatch import __version__
from dinobatch.config import TrainConfig
from dinobatch.errors import ConfigError, InputError
from dinobatch.imaging.decode import DecodeError, decode
from dinobatch.imaging.preprocess import model_input
from dinobatch.io.lock import exclusive
from dinobatch.io.walk import read_bytes, read_error
from dinobatch.models.file import ModelSpec, Preprocessing, initial_module, save_model, torch_save_atomic
from dinobatch.models.forward import forward_with_features
from dinobatch.runtime import faults
from dinobatch.runtime.device import default_workers, resolve_runtime
from dinobatch.runtime.workers import loader_context, loader_worker_init, this_process
from dinobatch.schema import Col
from dinobatch.training.augment import augment_image, multiplier
from dinobatch.training.manifest import Manifest, describe_unreadable, load_manifest
from dinobatch.training.metrics import expected_calibration_error, fit_temperature, report, softmax

__all__ = ["TrainResult", "train", "checkpoint_path", "metrics_path", "lock_path"]

log = logging.getLogger(__name__)
_NAMED = 20  # unreadable images named in a model's source (all are counted)


@dataclass
class TrainResult:
    model: str
    fingerprint: str
    metrics: list[dict[str, Any]]
    best_epoch: int
    calibration: dict[str, Any]
    splits: dict[str, int]
    unreadable: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> why, left out of training


def checkpoint_path(out: str | Path) -> Path:
    return Path(str(out) + ".ckpt")


def metrics_path(out: str | Path) -> Path:
    return Path(str(out) + ".metrics.jsonl")


def lock_path(out: str | Path) -> Path:
    """Held while a run writes OUT, its checkpoint and metrics: one run at a time per model file."""
    return Path(str(out) + ".lock")


class _Unreadable(NamedTuple):
    """A sample whose file could not be read or decoded: counted and reported, never silently dropped."""

    path: str
    reason: str


class _Samples:
    """Training (augmented, level > 0) or evaluation (level 0) samples of one split, decoded per access."""

    def __init__(self, manifest: Manifest, rows: list[dict], label_index: dict[str, int],
                 prep: Preprocessing, level: int, seed: int):
        self.manifest, self.rows, self.index = manifest, rows, label_index
        self.prep, self.level, self.seed = prep, level, seed
        self.per_row = multiplier(level)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.rows) * self.per_row

    def __getitem__(self, i: int):
        row = self.rows[i // self.per_row]
        try:
            rgb = decode(read_bytes(self.manifest.abspath(row)), min_side=self.prep.resize).image
        except OSError as exc:
            return _Unreadable(row[Col.PATH], read_error(exc))
        except DecodeError as exc:
            return _Unreadable(row[Col.PATH], str(exc))
        if self.level:
            rgb = augment_image(rgb, self.level, i % self.per_row, (self.seed, self.epoch, row[Col.PATH]))
        return model_input(rgb, self.prep), self.index[row[Col.LABEL]]


def _collate(samples):
    """(inputs, targets, {path: why} of the unreadable samples); inputs and targets None when none was read."""
    import torch

    bad = {s.path: s.reason for s in samples if isinstance(s, _Unreadable)}
    good = [s for s in samples if not isinstance(s, _Unreadable)]
    if not good:
        return None, None, bad
    return torch.stack([s[0] for s in good]), torch.tensor([s[1] for s in good]), bad


@dataclass(frozen=True)
class _Run:
    """What every epoch of one training run works with (the network, optimizer and scaler change in
    place; which ones they are does not)."""

    cfg: TrainConfig
    module: Any
    optimizer: Any
    scaler: Any
    runtime: Any
    prep: Preprocessing
    labels: list[str]
    train_set: _Samples
    val_set: _Samples
    progress: Callable[[str, int, int], None] | None


def _loader(run: _Run, samples: _Samples, order, *, training: bool = False):
    """Batches of the samples in `order`, decoded by the run's workers."""
    from torch.utils.data import DataLoader

    cfg, runtime = run.cfg, run.runtime
    workers = default_workers(runtime.device.type, cfg.workers)
    # a last training batch of one image would break batch norm at small image sizes: drop it
    drop_last = training and len(order) > cfg.batch_size and len(order) % cfg.batch_size == 1
    return DataLoader(samples, batch_size=cfg.batch_size, sampler=order, num_workers=workers,
                      collate_fn=_collate, pin_memory=runtime.pin_memory, drop_last=drop_last,
                      worker_init_fn=loader_worker_init(this_process()) if workers else None,
                      multiprocessing_context=loader_context() if workers else None)


def _normalise(runtime, x, prep: Preprocessing):
    import torch

    mean = torch.tensor(prep.mean, device=runtime.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(prep.std, device=runtime.device).view(1, 3, 1, 1) * 255
    return (runtime.to_device(x).float() - mean) / std


class _Pass(NamedTuple):
    """What one pass over a loader gives: mean loss, accuracy, logits and targets (evaluation only),
    how many images it used, and the ones it could not read."""

    loss: float
    accuracy: float
    logits: Any
    targets: Any
    images: int
    unreadable: dict[str, str]


def _run_epoch(run: _Run, loader, *, training: bool = False, stage: str = "") -> _Pass:
    """One pass over the loader; trains (and reports progress) when `training`, else keeps the logits."""
    import torch

    module, runtime, prep = run.module, run.runtime, run.prep
    optimizer, scaler = (run.optimizer, run.scaler) if training else (None, None)
    progress = run.progress if training else None
    total, correct, loss_sum, all_logits, all_y, unreadable = 0, 0, 0.0, [], [], {}
    grad = torch.enable_grad() if optimizer else torch.inference_mode()
    with grad:
        for step, (x, y, bad) in enumerate(loader, 1):
            unreadable.update(bad)
            if x is None:
                continue
            y = y.to(runtime.device)
            with runtime.train_autocast():
                logits, _ = forward_with_features(module, _normalise(runtime, x, prep))
                loss = torch.nn.functional.cross_entropy(logits.float(), y)
            if optimizer:
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                all_logits.append(logits.float().cpu())
                all_y.append(y.cpu())
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
            if progress:
                progress(stage, step, len(loader))
    if optimizer is not None and total == 0:
        why = f" ({describe_unreadable(unreadable)})" if unreadable else ""
        raise InputError(f"no training image could be read{why}: check that the manifest's files are where it says")
    logits = torch.cat(all_logits).numpy() if all_logits else None
    targets = torch.cat(all_y).numpy() if all_y else None
    return _Pass(loss_sum / total if total else float("nan"), correct / total if total else 0.0, logits, targets,
                 total, unreadable)


def _same_run(config: dict[str, Any]) -> dict[str, Any]:
    """The options that make two runs the same: all but how the manifest and OUT are spelt (the
    manifest is compared by its sha256; the checkpoint was found beside OUT)."""
    return {k: v for k, v in config.items() if k not in ("manifest", "out")}


def _load_checkpoint(path: Path, cfg: TrainConfig, manifest_sha: str) -> dict[str, Any] | None:
    import torch

    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved, now = _same_run(json.loads(state["config"])), _same_run(cfg.to_dict())
    if saved != now or state["manifest_sha256"] != manifest_sha:
        changed = [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
                   if saved.get(k) != now.get(k)] or ["the manifest's contents"]
        raise ConfigError(f"{path} was written by a different configuration or manifest ({', '.join(changed)}); "
                          f"remove it, or rerun with the same options to resume")
    return state


def _write_metrics(path: Path, metrics: list[dict[str, Any]]) -> None:
    from dinobatch.io.files import atomic_path

    with atomic_path(path, "write metrics") as tmp:
        tmp.write_text("".join(json.dumps(m) + "\n" for m in metrics), encoding="utf-8")


def _setup(cfg: TrainConfig):
    manifest = load_manifest(cfg.manifest)
    labels = manifest.labels()
    train_rows, val_rows = manifest.rows("train"), manifest.rows("val")
    if not train_rows:
        raise InputError(f"{cfg.manifest} has no usable rows in the train split")
    if len(labels) < 2:
        raise InputError(f"{cfg.manifest} has {len(labels)} label(s); classification needs at least two")
    return manifest, labels, train_rows, val_rows


def train(cfg: TrainConfig, *, resume: bool = False, progress: Callable[[str, int, int], None] | None = None,
          stop_after_epoch: int | None = None, wait: float = 0.0) -> TrainResult | None:
    """Train, keep the best epoch by validation loss, calibrate, and write a dinobatch model file.

    One run at a time writes OUT (and its checkpoint and metrics): a second gets LockedError after
    `wait` seconds. stop_after_epoch ends the run after that many epochs with only the checkpoint
    written (as a kill would), which is how resume is tested."""
    lock = lock_path(cfg.out)
    with exclusive(lock, wait=wait, what=f"the model file {cfg.out}"):
        try:
            return _train(cfg, resume, progress, stop_after_epoch)
        finally:  # removed while still held: a run waiting on it locks the next file instead
            lock.unlink(missing_ok=True)


def _train(cfg: TrainConfig, resume: bool, progress, stop_after_epoch: int | None) -> TrainResult | None:

    manifest, labels, train_rows, val_rows = _setup(cfg)
    runtime = resolve_runtime(cfg.device, cfg.precision)
    prep = cfg.preprocessing()
    module, optimizer, start = _module_and_optimizer(cfg, labels, runtime)
    scaler = runtime.grad_scaler()
    index = {label: i for i, label in enumerate(labels)}
    run = _Run(cfg=cfg, module=module, optimizer=optimizer, scaler=scaler, runtime=runtime, prep=prep, labels=labels,
               train_set=_Samples(manifest, train_rows, index, prep, cfg.augment_level, cfg.seed),
               val_set=_Samples(manifest, val_rows, index, prep, 0, cfg.seed), progress=progress)
    ckpt = checkpoint_path(cfg.out)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    state = _load_checkpoint(ckpt, cfg, manifest.sha256) if resume else None
    metrics: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": 0, "val_loss": float("inf"), "state_dict": None}
    first, unreadable = 0, {}
    if state:
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        metrics, best, first = json.loads(state["metrics"]), state["best"], state["epoch"]
        log.info("resuming %s after epoch %d", cfg.out, first)
    total_epochs = cfg.epochs + cfg.final_epochs
    for epoch in range(first, total_epochs):
        row, bad = _train_one_epoch(run, epoch)
        metrics.append(row)
        unreadable.update(bad)
        score = row["val_loss"] if row["val_loss"] is not None else row["train_loss"]
        if score < best["val_loss"]:
            best = {"epoch": epoch + 1, "val_loss": score,
                    "state_dict": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}}
        _write_metrics(metrics_path(cfg.out), metrics)
        torch_save_atomic({"epoch": epoch + 1, "model": module.state_dict(), "optimizer": optimizer.state_dict(),
                           "scaler": scaler.state_dict(),
                           "best": best, "metrics": json.dumps(metrics), "config": json.dumps(cfg.to_dict()),
                           "manifest_sha256": manifest.sha256}, ckpt)
        faults.point("epoch")
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < total_epochs:
            return None
    return _finish(run, best=best, metrics=metrics, manifest=manifest, start=start,
                   splits={"train": len(train_rows), "val": len(val_rows)}, unreadable=unreadable)


def _module_and_optimizer(cfg: TrainConfig, labels, runtime):
    """The seeded initial network on its device, its SGD optimizer, and where its weights came from."""
    import torch

    torch.manual_seed(cfg.seed)
    module, start = initial_module(cfg.arch, labels, cfg.pretrained)
    module = runtime.prepare(module)
    if cfg.freeze_backbone:
        for name, p in module.named_parameters():
            p.requires_grad = name.startswith("fc.")
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return module, optimizer, start


def _train_one_epoch(run: _Run, epoch: int) -> tuple[dict[str, Any], dict[str, str]]:
    """One epoch of training at its learning rate, then validation: the epoch's metrics row, and the
    images it could not read (path -> why)."""
    import torch

    cfg, module, optimizer, train_set = run.cfg, run.module, run.optimizer, run.train_set
    t0 = time.monotonic()
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr_at(epoch)
    train_set.epoch = epoch
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
    module.train()
    if cfg.freeze_backbone:  # keep the backbone's batch-norm statistics as they were
        for name, m in module.named_modules():
            if name and not name.startswith("fc"):
                m.eval()
    stage = f"epoch {epoch + 1}/{cfg.epochs + cfg.final_epochs}"
    tr = _run_epoch(run, _loader(run, train_set, order.tolist(), training=True), training=True, stage=stage)
    module.eval()
    val, figures = _validate(run)
    bad = {**tr.unreadable, **val.unreadable}
    row = {"epoch": epoch + 1, "lr": cfg.lr_at(epoch), "train_loss": tr.loss, "train_acc": tr.accuracy,
           Col.VAL_LOSS: figures.get("loss"), Col.VAL_TOP1: figures.get("top1"), Col.VAL_TOP3: figures.get("top3"),
           Col.VAL_MACRO_F1: figures.get("macro_f1"), "train_samples": tr.images, "val_images": val.images,
           Col.UNREADABLE: len(bad), Col.SECONDS: round(time.monotonic() - t0, 2)}
    log.info("%s: train loss %.4f acc %.3f | val loss %s top-1 %s top-3 %s", stage, tr.loss, tr.accuracy,
             _fmt(row[Col.VAL_LOSS]), _fmt(row[Col.VAL_TOP1]), _fmt(row[Col.VAL_TOP3]))
    if bad:
        log.warning("%s: %s; left out of this epoch", stage, describe_unreadable(bad))
    return row, bad


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _validate(run: _Run) -> tuple[_Pass, dict[str, Any]]:
    """The module's pass over the level-0 validation samples (logits, targets, images read, which could
    not be) and its metrics.report, {} when no sample was read: the report alone is what metrics rows show."""
    samples = run.val_set
    if len(samples) == 0:
        return _Pass(float("nan"), 0.0, None, None, 0, {}), {}
    done = _run_epoch(run, _loader(run, samples, list(range(len(samples)))))
    figures = report(done.targets, softmax(done.logits), run.labels) if done.logits is not None else {}
    return done, figures


def _finish(run: _Run, *, best: dict[str, Any], metrics: list[dict[str, Any]], manifest: Manifest,
            start: dict[str, Any], splits: dict[str, int], unreadable: dict[str, str]) -> TrainResult:
    """Restore the best epoch, fit the temperature on validation, write the model file (its source
    names the images that could not be read)."""
    cfg, module = run.cfg, run.module
    if best["state_dict"] is not None:  # None only if every epoch's loss was NaN: keep the last weights
        module.load_state_dict(best["state_dict"])
    module.eval()
    val, _ = _validate(run)
    unreadable = {**unreadable, **val.unreadable}
    calibration: dict[str, Any] = {"temperature": 1.0}
    if val.logits is not None:
        t = fit_temperature(val.logits, val.targets)
        calibration = {"temperature": t, "ece_before": expected_calibration_error(softmax(val.logits), val.targets),
                       "ece_after": expected_calibration_error(softmax(val.logits, t), val.targets),
                       "fitted_on": f"val ({len(val.targets)} images)"}
        log.info("calibration: temperature %.3f, ECE %.4f -> %.4f", t, calibration["ece_before"],
                 calibration["ece_after"])
    else:
        log.warning("no validation split: confidence is left uncalibrated (temperature 1.0)")
    source = {"kind": "train", "manifest": str(Path(cfg.manifest).resolve()), "manifest_sha256": manifest.sha256,
              "config": cfg.to_dict(), "metrics": metrics, "best_epoch": best["epoch"], "calibration": calibration,
              "splits": splits, "unreadable": {"count": len(unreadable), "first": sorted(unreadable)[:_NAMED]},
              "dinobatch": __version__, **start}
    spec = ModelSpec(cfg.arch, run.labels, run.prep, source, temperature=calibration["temperature"])
    fingerprint = save_model(cfg.out, spec, module.state_dict())
    checkpoint_path(cfg.out).unlink(missing_ok=True)
    return TrainResult(cfg.out, fingerprint, metrics, best["epoch"], calibration, splits, unreadable)
