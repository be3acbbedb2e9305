"""The Parquet schemas of the tables dinobatch writes, their column names (Col), the status and
duplicate-kind values, and the key-value metadata each file carries."""

from __future__ import annotations

import json

import pyarrow as pa

__all__ = [
    "SCHEMA_VERSION",
    "STATUS_OK",
    "STATUS_DUPLICATE",
    "STATUS_ERROR",
    "STATUSES",
    "DUPLICATE_EXACT",
    "DUPLICATE_NEAR",
    "Col",
    "FACT_COLUMNS",
    "PREDICTION_COLUMNS",
    "SPECIES_COLUMNS",
    "row_schema",
    "manifest_schema",
    "SPLITS",
    "cache_schema",
    "file_index_schema",
    "walk_schema",
    "SCAN_SCHEMA_VERSION",
    "scan_schema",
    "scan_metadata",
    "schema_metadata",
    "read_metadata",
]

SCHEMA_VERSION = "3"  # 2: path_bytes; 3: precision

STATUS_OK = "ok"
STATUS_DUPLICATE = "duplicate"
STATUS_ERROR = "error"
STATUSES = (STATUS_OK, STATUS_DUPLICATE, STATUS_ERROR)

DUPLICATE_EXACT = "exact"
DUPLICATE_NEAR = "near"


class Col:
    """Column names, spelled once."""

    RUN_ID = "run_id"
    PATH = "path"
    PATH_BYTES = "path_bytes"
    BYTES = "bytes"
    MTIME = "mtime"
    SHA256 = "sha256"
    STATUS = "status"
    ERROR = "error"
    FORMAT = "format"
    WIDTH = "width"
    HEIGHT = "height"
    MODE = "mode"
    PHASH = "phash"
    DHASH = "dhash"
    DUPLICATE_OF = "duplicate_of"
    DUPLICATE_KIND = "duplicate_kind"
    DUPLICATE_GROUP = "duplicate_group"
    MODEL = "model"
    MODEL_FINGERPRINT = "model_fingerprint"
    LABEL = "label"
    CONFIDENCE = "confidence"
    TOPK_LABELS = "topk_labels"
    TOPK_PROBS = "topk_probs"
    PROBS = "probs"
    MARGIN = "margin"
    ENTROPY = "entropy"
    EMBEDDING = "embedding"
    PRECISION = "precision"  # what the prediction was made at: fp32, bf16, fp16 or int8
    SPECIES_COMMON_NAME = "species_common_name"
    SPECIES_SCIENTIFIC_NAME = "species_scientific_name"
    SPECIES_PERIOD = "species_period"
    SPECIES_DIET = "species_diet"
    SPECIES_LENGTH_M = "species_length_m"
    # the file index and a walk's in-memory table
    ABSPATH = "abspath"
    MTIME_NS = "mtime_ns"
    CTIME_NS = "ctime_ns"
    INODE = "inode"
    # manifests
    SPLIT = "split"
    GROUP = "group"
    KIND = "kind"
    SOURCE = "source"
    VARIANT = "variant"
    # curate's queue (queue.parquet, queue.csv)
    GIVEN_LABEL = "given_label"
    PREDICTED_LABEL = "predicted_label"
    SUGGESTED_LABEL = "suggested_label"
    SCORE = "score"
    REASONS = "reasons"
    DETAILS = "details"
    IN_REVIEW = "in_review"  # whether the entry is among the items the review page shows (curate --max-review)
    # evaluate's predictions.parquet
    PREDICTED = "predicted"
    CORRECT = "correct"
    LOSS = "loss"
    # sweep's trials.parquet (the val_* figures are also train's per-epoch metrics)
    TRIAL = "trial"
    CONFIG = "config"
    BEST_EPOCH = "best_epoch"
    VAL_LOSS = "val_loss"
    VAL_TOP1 = "val_top1"
    VAL_TOP3 = "val_top3"
    VAL_MACRO_F1 = "val_macro_f1"
    UNREADABLE = "unreadable"
    SECONDS = "seconds"


_FLOATS = pa.list_(pa.float32())

# Facts decoded from the bytes: the same for every copy of the same content.
FACT_FIELDS = [
    pa.field(Col.FORMAT, pa.string()),
    pa.field(Col.WIDTH, pa.int32()),
    pa.field(Col.HEIGHT, pa.int32()),
    pa.field(Col.MODE, pa.string()),
    pa.field(Col.PHASH, pa.string()),  # 16 hex digits, as str(imagehash.phash(img))
    pa.field(Col.DHASH, pa.string()),
]
# What the model says about one content (cached per sha256 and model), in the model's label order, and
# the precision it said it at (a cached prediction keeps the precision it was made at).
PREDICTION_FIELDS = [
    pa.field(Col.LABEL, pa.string()),
    pa.field(Col.CONFIDENCE, pa.float32()),
    pa.field(Col.PROBS, _FLOATS),
    pa.field(Col.MARGIN, pa.float32()),
    pa.field(Col.ENTROPY, pa.float32()),
    pa.field(Col.EMBEDDING, _FLOATS),
    pa.field(Col.PRECISION, pa.string()),  # null in a cache part written before it was recorded
]
# Derived from probs when rows are written, so that --top-k applies to cached predictions too.
TOPK_FIELDS = [
    pa.field(Col.TOPK_LABELS, pa.list_(pa.string())),
    pa.field(Col.TOPK_PROBS, _FLOATS),
]
SPECIES_FIELDS = [
    pa.field(Col.SPECIES_COMMON_NAME, pa.string()),
    pa.field(Col.SPECIES_SCIENTIFIC_NAME, pa.string()),
    pa.field(Col.SPECIES_PERIOD, pa.string()),
    pa.field(Col.SPECIES_DIET, pa.string()),
    pa.field(Col.SPECIES_LENGTH_M, pa.string()),
]
FACT_COLUMNS = tuple(f.name for f in FACT_FIELDS)
PREDICTION_COLUMNS = tuple(f.name for f in PREDICTION_FIELDS)
SPECIES_COLUMNS = tuple(f.name for f in SPECIES_FIELDS)

_FILE_FIELDS = [
    pa.field(Col.RUN_ID, pa.string(), nullable=False),
    pa.field(Col.PATH, pa.string(), nullable=False),
    pa.field(Col.PATH_BYTES, pa.binary()),  # the name's exact bytes, when they are not UTF-8 as shown
    pa.field(Col.BYTES, pa.int64()),
    pa.field(Col.MTIME, pa.timestamp("us", tz="UTC")),
    pa.field(Col.SHA256, pa.string()),
    pa.field(Col.STATUS, pa.string(), nullable=False),
    pa.field(Col.ERROR, pa.string()),
]
_DUPLICATE_FIELDS = [
    pa.field(Col.DUPLICATE_OF, pa.string()),
    pa.field(Col.DUPLICATE_KIND, pa.string()),
    pa.field(Col.DUPLICATE_GROUP, pa.int64()),
]
_MODEL_FIELDS = [
    pa.field(Col.MODEL, pa.string()),
    pa.field(Col.MODEL_FINGERPRINT, pa.string()),
]


def row_schema(metadata: dict[bytes, bytes] | None = None) -> pa.Schema:
    """Schema of the per-file rows a run writes: one row per input file."""
    fields = _FILE_FIELDS + FACT_FIELDS + _DUPLICATE_FIELDS + _MODEL_FIELDS + PREDICTION_FIELDS[:2]
    return pa.schema(fields + TOPK_FIELDS + PREDICTION_FIELDS[2:] + SPECIES_FIELDS, metadata=metadata)


SPLITS = ("train", "val", "test")


def manifest_schema(metadata: dict[bytes, bytes] | None = None) -> pa.Schema:
    """A labelled dataset: one row per file, with its split; augmented copies name their source."""
    return pa.schema([
        pa.field(Col.PATH, pa.string(), nullable=False),  # relative to the manifest's root, printable
        pa.field(Col.PATH_BYTES, pa.binary()),  # the name's exact bytes, when `path` had to escape them
        pa.field(Col.LABEL, pa.string(), nullable=False),
        pa.field(Col.SPLIT, pa.string()),  # train | val | test; null for files that are not images
        pa.field(Col.SHA256, pa.string()),
        pa.field(Col.WIDTH, pa.int32()),
        pa.field(Col.HEIGHT, pa.int32()),
        pa.field(Col.STATUS, pa.string(), nullable=False),  # ok | error
        pa.field(Col.ERROR, pa.string()),
        pa.field(Col.GROUP, pa.int64()),  # duplicate group (exact or near); members share a split
        pa.field(Col.KIND, pa.string()),  # e.g. photo | drawing, when known
        pa.field(Col.SOURCE, pa.string()),  # augmented copies: the original's path
        pa.field(Col.VARIANT, pa.int32()),  # augmented copies: which variant of the original
    ], metadata=metadata)


def cache_schema(metadata: dict[bytes, bytes] | None = None) -> pa.Schema:
    """Schema of the per-content cache: one row per (sha256, model) that decoded and was inferred."""
    fields = [pa.field(Col.SHA256, pa.string(), nullable=False)] + FACT_FIELDS + PREDICTION_FIELDS
    return pa.schema(fields, metadata=metadata)


def file_index_schema() -> pa.Schema:
    """Schema of the file index: what a file's stat said when its sha256 was last computed, so an
    unchanged file is not read again (the idea of git's index: size, mtime, ctime and inode)."""
    return pa.schema([
        pa.field(Col.ABSPATH, pa.binary(), nullable=False),  # os.fsencode of the absolute path
        pa.field(Col.BYTES, pa.int64(), nullable=False),
        pa.field(Col.MTIME_NS, pa.int64(), nullable=False),
        pa.field(Col.CTIME_NS, pa.int64()),  # null for an object in a store (no ctime, no inode)
        pa.field(Col.INODE, pa.int64()),
        pa.field(Col.SHA256, pa.string(), nullable=False),
    ])


def walk_schema() -> pa.Schema:
    """The files a walk found, one row each, as classify holds them in memory (never written):
    columns rather than one Python object per file, so a run's memory does not grow with the folder."""
    return pa.schema([
        pa.field(Col.PATH, pa.string(), nullable=False),  # relative, '/'-separated, printable
        pa.field(Col.PATH_BYTES, pa.binary()),  # the exact bytes, when `path` had to escape them
        pa.field(Col.ABSPATH, pa.binary(), nullable=False),  # os.fsencode of the absolute path
        pa.field(Col.BYTES, pa.int64()),  # size, mtime, ctime and inode: null where stat failed
        pa.field(Col.MTIME_NS, pa.int64()),
        pa.field(Col.CTIME_NS, pa.int64()),
        pa.field(Col.INODE, pa.int64()),
        pa.field(Col.ERROR, pa.string()),  # why the file cannot be read, found by the walk
    ])


_META_PREFIX = "dinobatch."


def schema_metadata(*, version: str, model_name: str, model_fingerprint: str,
                    labels: list[str], folder: str | None = None) -> dict[bytes, bytes]:
    """Key-value metadata stored in every Parquet file dinobatch writes (folder: the classified one)."""
    values = {
        "schema_version": SCHEMA_VERSION,
        "version": version,
        "model": model_name,
        "model_fingerprint": model_fingerprint,
        "labels": json.dumps(labels),
    }
    if folder is not None:
        values["folder"] = folder
    return {(_META_PREFIX + k).encode(): v.encode() for k, v in values.items()}


def read_metadata(schema: pa.Schema) -> dict[str, object]:
    """Decode dinobatch's key-value metadata from a Parquet schema (labels as a list)."""
    raw = schema.metadata or {}
    out: dict[str, object] = {}
    for key, value in raw.items():
        name = key.decode()
        if name.startswith(_META_PREFIX):
            out[name[len(_META_PREFIX):]] = value.decode()
    if "labels" in out:
        out["labels"] = json.loads(str(out["labels"]))
    return out


SCAN_SCHEMA_VERSION = "1"


def scan_schema(metadata: dict[bytes, bytes] | None = None) -> pa.Schema:
    """`dinobatch scan` output: one row per file found, with its facts, hashes and duplicate group."""
    file_fields = [f for f in _FILE_FIELDS if f.name != Col.RUN_ID]
    return pa.schema(file_fields + FACT_FIELDS + _DUPLICATE_FIELDS, metadata=metadata)


def scan_metadata(*, version: str, folder: str, jpeg_min_side: int, hash_min_side: int, phash_max: int,
                  dhash_max: int) -> dict[bytes, bytes]:
    """Key-value metadata of a scan file: what was scanned, and how its hashes and groups were made."""
    values = {
        "kind": "scan",
        "schema_version": SCAN_SCHEMA_VERSION,
        "version": version,
        "folder": folder,
        "hash": "imagehash phash + dhash, 64 bits each",
        "hash_jpeg_min_side": str(jpeg_min_side),  # JPEG: the smallest DCT scale keeping this
        "hash_min_side": str(hash_min_side),  # all: reduced by an integer factor keeping this
        "phash_max": str(phash_max),
        "dhash_max": str(dhash_max),
    }
    return {(_META_PREFIX + k).encode(): v.encode() for k, v in values.items()}
