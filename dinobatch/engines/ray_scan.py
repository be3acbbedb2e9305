"""Scan's Ray engine: stages.hashes.hash_batch over blocks of files, in CPU tasks of a Ray cluster.

The driver lists the folder (the job's walk: Ray's own readers take hours to list millions of paths,
ray issue #40686) and hands Ray the file table a window at a time, in blocks; each block is one
map_batches task running the stage, whose table has an explicit schema (a column that is all null
in a block keeps its type). The records come back to the driver in the job's order with each file's
index, where the job groups the duplicates over the whole dataset exactly as it does locally.

A file that cannot be read or decoded is a record with its reason, from the stage. A task whose worker
process dies is retried (a lost node); a file that kills its worker every time (a crashing decoder)
is found by hashing the files of the failed window one task each, and is a record saying so, as the
local engine's crash-isolating pool does. Nothing here imports torch.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from dinobatch.engines.local_scan import Progress
from dinobatch.engines.ray_common import CRASHED, connected, each_alone, map_blocks, ray_module
from dinobatch.runtime import faults
from dinobatch.schema import Col
from dinobatch.stages.hashes import Record, hash_batch

__all__ = ["WINDOW", "hash_files"]

log = logging.getLogger(__name__)

WINDOW = 65536  # files handed to Ray as one dataset: bounds what the driver puts in the object store
_MAX_BLOCK = 256  # files per task: enough to amortise a task's cost (ms), few enough to spread a folder
_BLOCKS_PER_CPU = 8  # so that the nodes finish together
_INDEX = "index"  # the file's index in the job, carried beside the stage's columns


def hash_files(todo: np.ndarray, paths: Callable[[np.ndarray], list[bytes]], sizes: np.ndarray, *,
               address: str | None = None, progress: Progress | None = None) -> Iterator[tuple[int, Record]]:
    """(index, hash_file's record) for each file index in `todo`, in that order, hashed on a Ray cluster.

    As engines.local_scan.hash_files, but for workers: address joins a running cluster (None: the one
    this process is connected to, or a local Ray started for the run and stopped after: ray_common.connected)."""
    ray = ray_module()
    with connected(address):
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        done = 0
        for lo in range(0, len(todo), WINDOW):
            for item in _hash_window(ray, todo[lo:lo + WINDOW], paths, sizes, cpus):
                yield item
                done += 1
                faults.point("fingerprint")
                if progress and (done % _MAX_BLOCK == 0 or done == len(todo)):
                    progress("hash", done, len(todo))


def _files_table(window: np.ndarray, paths: Callable[[np.ndarray], list[bytes]], sizes: np.ndarray) -> pa.Table:
    """What the stage reads of each file (abspath, bytes as the walk found them) and its index."""
    return pa.table({_INDEX: pa.array(window, pa.int64()), Col.ABSPATH: pa.array(paths(window), pa.large_binary()),
                     Col.BYTES: pa.array(sizes[window], pa.int64())})


def _hash_window(ray: Any, window: np.ndarray, paths: Callable[[np.ndarray], list[bytes]], sizes: np.ndarray,
                 cpus: int) -> Iterator[tuple[int, Record]]:
    """The records of one window's files in its order: blocks of tasks, and one task per file for the
    files of a window whose tasks kept dying."""
    files = _files_table(window, paths, sizes)
    rows = max(1, min(_MAX_BLOCK, -(-len(window) // (cpus * _BLOCKS_PER_CPU))))
    blocks = [files.slice(k, rows) for k in range(0, files.num_rows, rows)]
    ds = map_blocks(ray.data.from_arrow(blocks), _hash_block, zero_copy_batch=True, num_cpus=1)
    ds.context.execution_options.preserve_order = True  # the job's order, whichever task ends first
    ds.context.enable_progress_bars = False  # the job reports progress
    got: dict[int, Record] = {}
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            got.update(_records(batch))
    except ray.exceptions.RayError as exc:
        log.warning("hashing tasks kept dying (%s); hashing the %d files left one task each",
                    type(exc).__name__, len(window) - len(got))
        got.update(_hash_alone(ray, files.filter(pa.array([int(i) not in got for i in window]))))
    for index in window:
        yield int(index), got.pop(int(index))


def _hash_block(block: pa.Table) -> pa.Table:
    """In a Ray task: the stage over one block, with each file's index beside its row."""
    return hash_batch(block.select([Col.ABSPATH, Col.BYTES])).append_column(_INDEX, block[_INDEX])


def _records(table: pa.Table) -> dict[int, Record]:
    """The stage's rows as hash_file's records (what the job gathers), by file index."""
    c = {name: table[name].to_pylist() for name in table.column_names}
    facts = zip(c[Col.FORMAT], c[Col.WIDTH], c[Col.HEIGHT], c[Col.MODE], c[Col.PHASH], c[Col.DHASH])
    return {index: (sha, nbytes, f if f[0] is not None else None, error)
            for index, sha, nbytes, f, error in zip(c[_INDEX], c[Col.SHA256], c[Col.BYTES], facts, c[Col.ERROR])}


def _hash_alone(ray: Any, files: pa.Table) -> dict[int, Record]:
    """Each file in a task of its own (ray_common.each_alone); one whose worker dies every time is a
    record saying its decoder crashed, with the size the walk found."""
    got: dict[int, Record] = {}
    for one, table in each_alone(ray, _hash_block, files, num_cpus=1):
        if table is not None:
            got.update(_records(table))
            continue
        index, size = one[_INDEX][0].as_py(), one[Col.BYTES][0].as_py()
        log.warning("hashing %s: its Ray worker died every time", os.fsdecode(one[Col.ABSPATH][0].as_py()))
        got[index] = (None, size, None, CRASHED)
    return got
