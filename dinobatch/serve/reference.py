"""The reference manifest as the server uses it: embeddings for /api/similar (cached as `similar`
caches them), hashes for the duplicates /api/predict reports, and an image id for every file."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dinobatch.dedupe import DEFAULT_DHASH_MAX, DEFAULT_PHASH_MAX
from dinobatch.dedupe.hamming import popcount64
from dinobatch.schema import Col
from dinobatch.serve.context import ImageRegistry

__all__ = ["ReferenceSet", "load_reference"]

log = logging.getLogger(__name__)
_MAX_DUPLICATES = 20  # reported per upload, closest first: enough to act on, bounded for the response


@dataclass(frozen=True)
class ReferenceSet:
    """The usable rows of a reference manifest: embeddings (L2-normalised, with their labels and paths),
    and per row its id, sha256 and 64-bit pHash/dHash (0 and unreadable where it could not be decoded)."""

    labels: list[str]  # aligned with embeddings (the rows that could be embedded)
    embeddings: np.ndarray
    paths: list[str]
    ids: dict[str, str]  # path -> image id, every usable row
    row_paths: list[str]  # every usable row
    row_labels: list[str]
    row_shas: list[str]
    phash: np.ndarray  # uint64 per usable row
    dhash: np.ndarray
    hashed: np.ndarray  # bool: the row's hashes are known

    def duplicates(self, sha256: str, phash: str, dhash: str) -> list[dict[str, Any]]:
        """Reference images that are the same bytes, or near duplicates within dedupe's default limits
        (pHash and dHash both close), closest first: {id, path, label, kind, distance (pHash bits)}."""
        p = popcount64(self.phash ^ np.uint64(int(phash, 16)))
        d = popcount64(self.dhash ^ np.uint64(int(dhash, 16)))
        exact = np.array([s == sha256 for s in self.row_shas], dtype=bool)
        near = self.hashed & (p <= DEFAULT_PHASH_MAX) & (d <= DEFAULT_DHASH_MAX)
        hits = np.flatnonzero(exact | near)
        order = sorted(hits.tolist(), key=lambda i: (not exact[i], int(p[i]), self.row_paths[i]))
        return [{"id": self.ids[self.row_paths[i]], "path": self.row_paths[i], "label": self.row_labels[i],
                 "kind": "exact" if exact[i] else "near", "distance": 0 if exact[i] else int(p[i])}
                for i in order[:_MAX_DUPLICATES]]


def load_reference(manifest_path: str, model, runtime, images: ImageRegistry, *, cache_dir: Path,
                   batch_size: int | None) -> ReferenceSet:
    """Embed (or read the cached embeddings of) a reference manifest, hash its images as classify
    hashes an upload, and register each file so that its thumbnail can be served by id."""
    from dinobatch.curation.similar import reference_embeddings
    from dinobatch.training.manifest import load_manifest

    labels, emb, paths = reference_embeddings(manifest_path, model, runtime, cache_dir=cache_dir,
                                              batch_size=batch_size, workers=None)
    manifest = load_manifest(manifest_path)
    rows = manifest.rows()
    abspaths = [manifest.abspath(r) for r in rows]
    phash, dhash, hashed = _hashes(abspaths, model.spec.preprocessing.resize)
    ids = {r[Col.PATH]: images.add(a) for r, a in zip(rows, abspaths)}
    log.info("reference: %d images (%d embedded) from %s", len(rows), len(paths), manifest_path)
    return ReferenceSet(labels, emb, paths, ids, [r[Col.PATH] for r in rows], [r[Col.LABEL] for r in rows],
                        [r[Col.SHA256] for r in rows], phash, dhash, hashed)


def _hashes(abspaths: list[str], resize: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pHash and dHash of each file, from the decode classify (and /api/predict) makes at the model's
    resize, so an upload's hashes compare with them bit for bit; threads, as Pillow frees the GIL."""
    from dinobatch.imaging.decode import DecodeError, decode, quiet_decoding
    from dinobatch.io.walk import read_bytes

    def one(path: str) -> tuple[int, int] | None:
        try:
            dec = decode(read_bytes(path), min_side=resize)
        except (OSError, DecodeError) as exc:
            log.warning("reference image %s left out of duplicate checks: %s", path, exc)
            return None
        return int(dec.phash, 16), int(dec.dhash, 16)

    with quiet_decoding(), ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        found = list(pool.map(one, abspaths))
    phash = np.array([h[0] if h else 0 for h in found], dtype=np.uint64)
    dhash = np.array([h[1] if h else 0 for h in found], dtype=np.uint64)
    return phash, dhash, np.array([h is not None for h in found], dtype=bool)
