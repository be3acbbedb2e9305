"""Unchanged reruns: whether a classify run has nothing to infer (the model file and every listed file as
the file index last saw them, every content's prediction in the cache, the options of the last run), found
without importing torch, so the job can rebuild the rows from the cache without loading the model."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from dinobatch import __version__
from dinobatch.config import ClassifyConfig
from dinobatch.io.walk import sha256_file
from dinobatch.models.file import imagenet_weights_name
from dinobatch.schema import Col, file_index_schema
from dinobatch.stages.fingerprint import known_shas
from dinobatch.store.results import ResultsDir

__all__ = ["Unchanged", "find", "model_stat", "model_seen"]

log = logging.getLogger(__name__)

# Options a run resolves ("auto"/None here: the last run's choice stands), and options that do not change
# what a run computes (taken from this run as they are).
_RESOLVED = ("device", "precision", "batch_size", "workers")
_THIS_RUN = ("wait", "force")
_STAT = (Col.ABSPATH, Col.BYTES, Col.MTIME_NS, Col.CTIME_NS, Col.INODE)


@dataclass(frozen=True)
class Unchanged:
    """An unchanged rerun's inputs: the walk, each file's sha256 and error, the cached content, and the
    last run's summary (its model, runtime and resolved configuration stand for this run's)."""

    files: pa.Table
    shas: pa.ChunkedArray
    errors: pa.ChunkedArray
    content: pa.Table
    labels: list[str]
    model_row: pa.Table  # the model file's stat and sha256, for the file index
    config: dict[str, Any]
    previous: dict[str, Any]


def model_stat(ref: str) -> pa.Table | None:
    """The model file's stat as one walk-like row (abspath, bytes, mtime_ns, ctime_ns, inode); None for
    torchvision's weights (only torchvision knows their file) or a path that is not a regular file."""
    if imagenet_weights_name(ref) is not None:
        return None
    path = os.path.abspath(ref)
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    if not os.path.isfile(path):
        return None
    values = (os.fsencode(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    schema = file_index_schema()
    return pa.table([pa.array([v], schema.field(c).type) for c, v in zip(_STAT, values)], names=list(_STAT))


def model_seen(before: pa.Table | None, after: pa.Table | None, fingerprint: str) -> pa.Table | None:
    """The model file's row for the file index (its stat and sha256) when its stat did not change while it
    was read (else None: a file rewritten meanwhile may not be the bytes that were hashed)."""
    if before is None or after is None or not before.equals(after):
        return None
    return before.append_column(Col.SHA256, pa.array([fingerprint], pa.string()))


def find(cfg: ClassifyConfig, out: ResultsDir, files: pa.Table) -> Unchanged | None:
    """The unchanged rerun cfg amounts to over the walked files, or None when it must take the normal path
    (what it lacks is logged): --force, torchvision weights, other options or another model than the last run, a file the
    file index does not vouch for, or a content without a cached prediction (a file that failed to decode
    is retried every run, so a folder holding one is never unchanged)."""
    previous = out.latest_summary()
    config = None if cfg.force or previous is None else _same_options(cfg, previous)
    if config is None or previous.get("version") != __version__:
        return _no("--force, another version, or options other than the last run's")
    index = out.read_file_index()
    model_row = _model_row(cfg.model, index)
    fingerprint = previous.get("model", {}).get("fingerprint")
    if model_row is None or model_row[Col.SHA256][0].as_py() != fingerprint:
        return _no("the model is not the file the last run used")
    shas, errors = known_shas(files, index), files[Col.ERROR]
    del index
    if pc.any(pc.and_(errors.is_null(), shas.is_null())).as_py():
        return _no("files the file index does not vouch for")
    wanted = pc.unique(shas.drop_null())
    content = out.read_cache(fingerprint, wanted, with_embeddings=cfg.embeddings)
    labels = out.cache_labels(fingerprint)
    if content.num_rows != len(wanted) or labels is None or len(labels) != previous["model"].get("classes"):
        return _no("contents without a cached prediction")
    return Unchanged(files, shas, errors, content, labels, model_row, config, previous)


def _no(why: str) -> None:
    log.debug("not an unchanged rerun (%s): the normal path", why)
    return None


def _model_row(ref: str, index: pa.Table) -> pa.Table | None:
    """The model file's index row: its sha256 from the file index where its stat matches, else read
    (a copied or touched file, same bytes) and kept only if its stat held still meanwhile."""
    before = model_stat(ref)
    if before is None:
        return None
    known = known_shas(before, index)[0].as_py()
    if known is not None:
        return before.append_column(Col.SHA256, pa.array([known], pa.string()))
    try:
        fingerprint = sha256_file(os.fsdecode(before[Col.ABSPATH][0].as_py()))
    except OSError:
        return None
    return model_seen(before, model_stat(ref), fingerprint)


def _same_options(cfg: ClassifyConfig, previous: dict[str, Any]) -> dict[str, Any] | None:
    """The resolved configuration this run records when it asks what the last run asked (an option it
    leaves to "auto" accepts the last run's choice), else None."""
    last = previous.get("config")
    if not isinstance(last, dict):
        return None
    asked = cfg.to_dict()
    for key, value in asked.items():
        if key in _THIS_RUN or (key in _RESOLVED and value in ("auto", None)):
            continue
        if key not in last or last[key] != value:
            return None
    return {**last, **{k: asked[k] for k in _THIS_RUN}}
