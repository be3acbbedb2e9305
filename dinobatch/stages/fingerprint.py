"""Stage fingerprint: each listed file's sha256, read only where the file index cannot vouch for it."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dinobatch.io.walk import read_error, sha256_file
from dinobatch.runtime import faults
from dinobatch.schema import Col

__all__ = ["KNOWN_SHA256", "FINGERPRINT_SCHEMA", "known_shas", "with_known_shas", "fingerprint"]

KNOWN_SHA256 = "known_sha256"  # the input column fingerprint trusts instead of reading the file
FINGERPRINT_SCHEMA = pa.schema([pa.field(Col.SHA256, pa.string()), pa.field(Col.ERROR, pa.string())])


def known_shas(files: pa.Table, index: pa.Table) -> pa.ChunkedArray:
    """Per file, the sha256 the file index holds for it where size, mtime, ctime and inode all match
    what the walk saw (null elsewhere): those files are not read again. An object in a store has no
    ctime or inode: null in both the walk and the index counts as a match there, while size and
    mtime must be known and equal (a store without them has every object read again)."""
    at = pc.index_in(files[Col.ABSPATH], value_set=index[Col.ABSPATH].combine_chunks())
    same = pa.chunked_array([pa.array(np.ones(files.num_rows, bool))])
    for c in (Col.BYTES, Col.MTIME_NS, Col.CTIME_NS, Col.INODE):  # a column at a time: no copy of the index
        seen, known = files[c], index[c].take(at)
        equal = pc.equal(seen, known)
        if c in (Col.CTIME_NS, Col.INODE) and seen.null_count:  # local files: none null, nothing to do
            equal = pc.if_else(pc.and_(seen.is_null(), known.is_null()), True, equal)
        same = pc.and_(same, pc.fill_null(equal, False))
    return pc.if_else(same, index[Col.SHA256].take(at), pa.scalar(None, pa.string()))


def with_known_shas(files: pa.Table, index: pa.Table) -> pa.Table:
    """fingerprint's input for the whole walk: abspath, the walk's error and KNOWN_SHA256.

    One lookup over the whole index (a hash table of it is built once), so that the batches cut
    from this table carry everything fingerprint needs."""
    return pa.table([files[Col.ABSPATH], files[Col.ERROR], known_shas(files, index)],
                    names=[Col.ABSPATH, Col.ERROR, KNOWN_SHA256])


def fingerprint(batch: pa.Table | pa.RecordBatch) -> pa.Table:
    """sha256 and error of each file of the batch (columns of with_known_shas), in order: a known
    sha256 is taken as it is, a file the walk could not stat keeps its error, others are read."""
    shas, errors = [], []
    columns = (batch.column(c).to_pylist() for c in (Col.ABSPATH, Col.ERROR, KNOWN_SHA256))
    for abspath, error, sha in zip(*columns):
        if error is None and sha is None:
            try:
                sha = sha256_file(os.fsdecode(abspath))
            except OSError as exc:
                error = read_error(exc)
        shas.append(None if error else sha)
        errors.append(error)
        faults.point("fingerprint")
    return pa.table([pa.array(shas, pa.string()), pa.array(errors, pa.string())], schema=FINGERPRINT_SCHEMA)
