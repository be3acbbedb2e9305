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
from typing import Any, Callable

from . import __version__, faults
from .augment import augment_image, multiplier
from .decode import DecodeError, decode
from .device import default_workers, resolve_runtime
from .errors import ConfigError, InputError
from .infer import forward_with_features, model_input
from .manifest import Manifest, load_manifest
from .metrics import expected_calibration_error, fit_temperature, report, softmax
from .model import ARCHS, ModelSpec, Preprocessing, initial_module, save_model, torch_save_atomic
from .scan import read_bytes
from .schema import Col

__all__ = ["TrainConfig", "TrainResult", "train", "checkpoint_path", "metrics_path"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe; the defaults are the seed's (batch 128, lr 0.01 x10 then 0.005 x1, level 2)."""

    manifest: str
    out: str
    arch: str = "resnet50"
    pretrained: str = "imagenet"  # imagenet | none | a dinobatch model file
    epochs: int = 10
    lr: float = 0.01
    final_epochs: int = 1
    final_lr: float | None = None  # None: half of lr
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 1e-4
    augment_level: int = 2
    freeze_backbone: bool = False
    image_size: int = 224
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown architecture {self.arch!r}; supported: {', '.join(ARCHS)}")
        if self.epochs < 0 or self.final_epochs < 0 or self.epochs + self.final_epochs < 1:
            raise ConfigError("training needs at least one epoch")
        if self.batch_size < 1 or self.lr <= 0 or self.image_size < 16:
            raise ConfigError("batch_size >= 1, lr > 0 and image_size >= 16 are required")
        if (self.final_lr is not None and self.final_lr <= 0) or not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ConfigError("final_lr > 0, 0 <= momentum < 1 and weight_decay >= 0 are required")
        multiplier(self.augment_level)  # validates the level

    def lr_at(self, epoch: int) -> float:
        """Learning rate of a 0-based epoch: lr, then final_lr for the final epochs."""
        return self.lr if epoch < self.epochs else (self.final_lr if self.final_lr is not None else self.lr / 2)

    def preprocessing(self) -> Preprocessing:
        return Preprocessing(resize=round(self.image_size * 256 / 224), crop=self.image_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    model: str
    fingerprint: str
    metrics: list[dict[str, Any]]
    best_epoch: int
    calibration: dict[str, Any]
    splits: dict[str, int]


def checkpoint_path(out: str | Path) -> Path:
    return Path(str(out) + ".ckpt")


def metrics_path(out: str | Path) -> Path:
    return Path(str(out) + ".metrics.jsonl")


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
        except (OSError, DecodeError) as exc:
            log.warning("skipping %s: %s", row[Col.PATH], exc)
            return None
        if self.level:
            rgb = augment_image(rgb, self.level, i % self.per_row, (self.seed, self.epoch, row[Col.PATH]))
        return model_input(rgb, self.prep), self.index[row[Col.LABEL]]


def _collate(samples):
    import torch

    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples])


def _loader(samples: _Samples, cfg: TrainConfig, runtime, order, training: bool = False):
    from torch.utils.data import DataLoader

    workers = default_workers(runtime.device.type, cfg.workers)
    # a last training batch of one image would break batch norm at small image sizes: drop it
    drop_last = training and len(order) > cfg.batch_size and len(order) % cfg.batch_size == 1
    return DataLoader(samples, batch_size=cfg.batch_size, sampler=order, num_workers=workers,
                      collate_fn=_collate, pin_memory=runtime.pin_memory, drop_last=drop_last)


def _normalise(runtime, x, prep: Preprocessing):
    import torch

    mean = torch.tensor(prep.mean, device=runtime.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(prep.std, device=runtime.device).view(1, 3, 1, 1) * 255
    return (runtime.to_device(x).float() - mean) / std


def _run_epoch(module, loader, runtime, prep, optimizer=None, scaler=None, progress=None, stage=""):
    """One pass: returns (mean loss, accuracy, logits, targets). Trains when an optimizer is given."""
    import torch

    total, correct, loss_sum, all_logits, all_y = 0, 0, 0.0, [], []
    grad = torch.enable_grad() if optimizer else torch.inference_mode()
    with grad:
        for step, batch in enumerate(loader, 1):
            if batch is None:
                continue
            x, y = batch
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
        raise InputError("no training image could be read: check that the manifest's files are where it says")
    logits = torch.cat(all_logits).numpy() if all_logits else None
    targets = torch.cat(all_y).numpy() if all_y else None
    return (loss_sum / total if total else float("nan")), (correct / total if total else 0.0), logits, targets


def _load_checkpoint(path: Path, cfg: TrainConfig, manifest_sha: str) -> dict[str, Any] | None:
    import torch

    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = json.loads(state["config"])
    if saved != cfg.to_dict() or state["manifest_sha256"] != manifest_sha:
        raise ConfigError(f"{path} was written by a different configuration or manifest; "
                          f"remove it, or rerun with the same options to resume")
    return state


def _write_metrics(path: Path, metrics: list[dict[str, Any]]) -> None:
    from .results import atomic_path

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
          stop_after_epoch: int | None = None) -> TrainResult | None:
    """Train, keep the best epoch by validation loss, calibrate, and write a dinobatch model file.

    stop_after_epoch ends the run after that many epochs with only the checkpoint written (as a
    kill would), which is how resume is tested."""
    import torch

    manifest, labels, train_rows, val_rows = _setup(cfg)
    runtime = resolve_runtime(cfg.device, cfg.precision)
    prep = cfg.preprocessing()
    torch.manual_seed(cfg.seed)
    module, start = initial_module(cfg.arch, labels, cfg.pretrained)
    module = runtime.prepare(module)
    if cfg.freeze_backbone:
        for name, p in module.named_parameters():
            p.requires_grad = name.startswith("fc.")
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scaler = runtime.grad_scaler()
    index = {label: i for i, label in enumerate(labels)}
    train_set = _Samples(manifest, train_rows, index, prep, cfg.augment_level, cfg.seed)
    val_set = _Samples(manifest, val_rows, index, prep, 0, cfg.seed)
    ckpt = checkpoint_path(cfg.out)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    state = _load_checkpoint(ckpt, cfg, manifest.sha256) if resume else None
    metrics: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": 0, "val_loss": float("inf"), "state_dict": None}
    first = 0
    if state:
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        metrics, best, first = json.loads(state["metrics"]), state["best"], state["epoch"]
        log.info("resuming %s after epoch %d", cfg.out, first)
    total_epochs = cfg.epochs + cfg.final_epochs
    for epoch in range(first, total_epochs):
        row = _train_one_epoch(cfg, epoch, module, optimizer, scaler, train_set, val_set, runtime, prep, labels,
                               progress)
        metrics.append(row)
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
    return _finish(cfg, module, best, metrics, manifest, labels, val_set, runtime, prep, start,
                   {"train": len(train_rows), "val": len(val_rows)})


def _train_one_epoch(cfg, epoch, module, optimizer, scaler, train_set, val_set, runtime, prep, labels,
                     progress) -> dict[str, Any]:
    """One epoch of training at its learning rate, then validation; returns the epoch's metrics row."""
    import torch

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
    loader = _loader(train_set, cfg, runtime, order.tolist(), True)
    tr_loss, tr_acc, _, _ = _run_epoch(module, loader, runtime, prep, optimizer, scaler, progress, stage)
    module.eval()
    val = _evaluate(module, val_set, cfg, runtime, prep, labels)
    row = {"epoch": epoch + 1, "lr": cfg.lr_at(epoch), "train_loss": tr_loss, "train_acc": tr_acc,
           "val_loss": val.get("loss"), "val_top1": val.get("top1"), "val_top3": val.get("top3"),
           "val_macro_f1": val.get("macro_f1"), "seconds": round(time.monotonic() - t0, 2)}
    log.info("%s: train loss %.4f acc %.3f | val loss %s top-1 %s top-3 %s", stage, tr_loss, tr_acc,
             _fmt(row["val_loss"]), _fmt(row["val_top1"]), _fmt(row["val_top3"]))
    return row


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _evaluate(module, samples: _Samples, cfg, runtime, prep, labels) -> dict[str, Any]:
    """Metrics of the module on level-0 samples (an empty dict when there are none)."""
    if len(samples) == 0:
        return {}
    _, _, logits, y = _run_epoch(module, _loader(samples, cfg, runtime, list(range(len(samples)))), runtime, prep)
    if logits is None:
        return {}
    out = report(y, softmax(logits), labels)
    out["_logits"], out["_y"] = logits, y
    return out


def _finish(cfg, module, best, metrics, manifest, labels, val_set, runtime, prep, start, splits) -> TrainResult:
    """Restore the best epoch, fit the temperature on validation, write the model file."""
    if best["state_dict"] is not None:  # None only if every epoch's loss was NaN: keep the last weights
        module.load_state_dict(best["state_dict"])
    module.eval()
    val = _evaluate(module, val_set, cfg, runtime, prep, labels)
    calibration: dict[str, Any] = {"temperature": 1.0}
    if val:
        t = fit_temperature(val["_logits"], val["_y"])
        calibration = {"temperature": t, "ece_before": expected_calibration_error(softmax(val["_logits"]), val["_y"]),
                       "ece_after": expected_calibration_error(softmax(val["_logits"], t), val["_y"]),
                       "fitted_on": f"val ({len(val['_y'])} images)"}
        log.info("calibration: temperature %.3f, ECE %.4f -> %.4f", t, calibration["ece_before"],
                 calibration["ece_after"])
    else:
        log.warning("no validation split: confidence is left uncalibrated (temperature 1.0)")
    source = {"kind": "train", "manifest": str(Path(cfg.manifest).resolve()), "manifest_sha256": manifest.sha256,
              "config": cfg.to_dict(), "metrics": metrics, "best_epoch": best["epoch"], "calibration": calibration,
              "splits": splits, "dinobatch": __version__, **start}
    spec = ModelSpec(cfg.arch, labels, prep, source, temperature=calibration["temperature"])
    fingerprint = save_model(cfg.out, spec, module.state_dict())
    checkpoint_path(cfg.out).unlink(missing_ok=True)
    return TrainResult(cfg.out, fingerprint, metrics, best["epoch"], calibration, splits)
