"""Burst decoding for CPU inference: every core decodes a burst of images, then the model has them all.

On a CPU the model's threads use every core; decode workers running beside them (a DataLoader's)
take cores away at random moments and stall the threads at each barrier. Alternating gives each
phase all the cores: decoding costs its own time divided by the cores. Workers are forked once
(runtime.workers.IsolatingPool: a decoder that crashes its process costs only its file); they
write each model input straight into a shared buffer, channels-last, where the parent's batch
tensor is a view: no pickling of pixels, no stacking copy, no layout conversion.
"""

from __future__ import annotations

import functools
import heapq
import logging
import mmap
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from dinobatch.imaging import decode_budget
from dinobatch.imaging.decode import quiet_decoding
from dinobatch.runtime.dataset import DecodeDataset, Rec
from dinobatch.runtime.workers import Crashed, IsolatingPool

__all__ = ["burst_batches", "balanced_shares"]

log = logging.getLogger(__name__)

# Images decoded per burst (rounded down to whole batches, at least one): each burst costs a
# hand-over to every worker and a wait for the slowest, so fewer, larger bursts waste less.
BURST_IMAGES = 128


@dataclass
class _Shared:
    """What the forked workers inherit: the dataset, and the model-input slots of one burst."""

    dataset: DecodeDataset
    slots: np.ndarray  # (burst, crop, crop, 3) uint8 in an anonymous shared mapping


_SHARED: _Shared | None = None  # set just before the pool forks; workers inherit it


def burst_batches(dataset: DecodeDataset, batch_size: int, processes: int) -> Iterator[tuple[list[dict[str, Any]], Any]]:
    """(records, uint8 batch or None) per batch, in order; a decoder crash costs only its file."""
    global _SHARED
    burst = batch_size * max(1, BURST_IMAGES // batch_size)  # whole batches per burst
    crop = dataset.crop
    buffer = mmap.mmap(-1, burst * crop * crop * 3)  # MAP_SHARED: the workers' writes are seen here
    _SHARED = _Shared(dataset, np.frombuffer(buffer, np.uint8).reshape(burst, crop, crop, 3))
    try:
        # A fresh budget for each pool: see _init. Leaving early (an interrupt, the consumer done
        # with the batches) kills the workers; they hold nothing the run still needs.
        with IsolatingPool(processes, _init, _fresh_budget, task="decoding") as pool:
            for lo in range(0, len(dataset), burst):
                records = _decode_burst(pool, dataset, lo, min(len(dataset), lo + burst), processes)
                for b in range(0, len(records), batch_size):
                    yield _collate(records[b:b + batch_size], _SHARED.slots)
    finally:
        _SHARED = None


def _fresh_budget() -> tuple:
    return (decode_budget.from_env(),)


def _init(budget: decode_budget.DecodeBudget | None = None) -> None:
    """A burst worker (after runtime.workers' own start: signals, gc): one torch thread, and the
    pool's decode budget (none for a file decoded alone; each pool its own, so that a worker that
    crashed holding a share leaks nothing into the next)."""
    import torch

    torch.set_num_threads(1)
    decode_budget.install(budget)


def _items(indices: Sequence[int], burst: int) -> list[dict[str, Any]]:
    """Records of the items at indices, each model input written to slot index % burst."""
    assert _SHARED is not None  # set before the fork
    shared = _SHARED
    records = []
    with quiet_decoding():  # once per share of the burst, not per file
        for index in indices:
            slot = index % burst

            def into_slot(image, slot=slot) -> dict[str, Any]:
                shared.slots[slot] = shared.dataset.model_input_hwc(image)
                return {Rec.SLOT: slot}

            records.append(shared.dataset.record(index, into_slot))
    return records


def _decode_burst(pool: IsolatingPool, dataset: DecodeDataset, lo: int, hi: int, processes: int) -> list[dict[str, Any]]:
    """Decode items lo..hi-1, one share per process balanced by file size; their records, in order
    (a file whose decoder crashed its process, and again alone, is an error record)."""
    indices = range(lo, hi)
    burst = len(_SHARED.slots)
    shares = [share for share in balanced_shares(indices, [dataset.cost(i) for i in indices], processes) if share]
    done = {}
    for share, records in pool.map(functools.partial(_items, burst=burst), shares, in_flight=len(shares)):
        done.update(zip(share, records))
    return [dataset.failed(i, done[i].reason) if isinstance(done[i], Crashed) else done[i] for i in indices]


def _collate(records: list[dict[str, Any]], slots: np.ndarray):
    """The records and their uint8 batch: a channels-last NCHW view of their slots (a copy only
    where failed items leave gaps). The next burst overwrites the slots, so the batch must be
    used (predict normalises it into a new tensor) before the next one is asked for."""
    import torch

    used = [r.pop(Rec.SLOT) for r in records if r.get(Rec.ERROR) is None and Rec.SLOT in r]
    if not used:
        return records, None
    first = used[0]
    rows = slots[first:first + len(used)] if used == list(range(first, first + len(used))) else slots[used]
    return records, torch.from_numpy(rows).permute(0, 3, 1, 2)


def balanced_shares(indices: Sequence[int], costs: Sequence[float], n: int) -> list[list[int]]:
    """indices split into n shares of nearly equal total cost (largest first, each to the lightest
    share), every share in ascending index order."""
    shares: list[list[int]] = [[] for _ in range(n)]
    heap = [(0.0, k) for k in range(n)]
    for cost, index in sorted(zip(costs, indices), key=lambda ci: -ci[0]):
        total, k = heapq.heappop(heap)
        shares[k].append(index)
        heapq.heappush(heap, (total + cost, k))
    return [sorted(share) for share in shares]
