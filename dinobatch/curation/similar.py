"""Which dinosaur does this look like: embeddings of an image against a labelled reference set."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dinobatch.engines.local import predict
from dinobatch.errors import InputError
from dinobatch.io.arrow import read_table, write_table
from dinobatch.schema import Col
from dinobatch.stages.decode import WorkItem

__all__ = ["similar", "rank", "reference_embeddings", "default_cache_dir"]

log = logging.getLogger(__name__)
_PER_SPECIES = 3  # a species' score: the mean of its few closest reference images


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dinobatch" / "embeddings"


def _embed(model, runtime, paths_by_sha: dict[str, list[str]], batch_size: int | None, workers: int | None):
    """sha256 -> the model's result (with its embedding) for each content, read from any of its files;
    decoded and batched as classify does (batch_size and workers None: its defaults)."""
    items = [WorkItem(tuple(p), sha) for sha, p in paths_by_sha.items()]
    out: dict[str, Any] = {}
    for batch in predict(model, runtime, items, batch_size=batch_size, workers=workers, embeddings=True):
        out.update({r.sha256: r for r in batch})
    return out


def reference_embeddings(manifest_path: str, model, runtime, *, cache_dir: Path, batch_size: int | None = None,
                         workers: int | None = None):
    """(labels, L2-normalised embeddings, paths) of the manifest's usable images, cached on disk
    under the manifest's and the model's fingerprints once every image was read."""
    import hashlib
    import json

    import pyarrow as pa

    from dinobatch.training.manifest import describe_unreadable, load_manifest

    manifest = load_manifest(manifest_path)
    rows = manifest.rows()
    # keyed by what the embeddings depend on: every image's content and label, and the model
    content = hashlib.sha256(json.dumps(sorted((r[Col.PATH], r[Col.SHA256], r[Col.LABEL]) for r in rows)).encode())
    cache = cache_dir / f"{content.hexdigest()[:16]}-{model.fingerprint[:16]}.parquet"
    if cache.is_file():
        table = read_table(cache).to_pylist()
        log.info("reference embeddings from cache %s", cache)
    else:
        paths: dict[str, list[str]] = {}
        for r in rows:
            paths.setdefault(r[Col.SHA256], []).append(manifest.abspath(r))
        results = _embed(model, runtime, paths, batch_size, workers)
        table = [{Col.PATH: r[Col.PATH], Col.LABEL: r[Col.LABEL], Col.EMBEDDING: results[r[Col.SHA256]].prediction[Col.EMBEDDING]}
                 for r in rows if results[r[Col.SHA256]].error is None]
        unreadable = {r[Col.PATH]: results[r[Col.SHA256]].error for r in rows if results[r[Col.SHA256]].error}
        if unreadable:  # not cached: the next run tries them again
            log.warning("%s; left out of the reference set", describe_unreadable(unreadable, "reference image"))
        elif table:
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_table(pa.Table.from_pylist(table), cache)
    if not table:
        raise InputError(f"{manifest_path} has no readable reference image")
    emb = np.array([t[Col.EMBEDDING] for t in table], dtype=np.float32)
    emb /= np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)
    return [t[Col.LABEL] for t in table], emb, [t[Col.PATH] for t in table]


def similar(images: Sequence[str], model_ref: str, reference: str, *, top_k: int = 3, neighbours: int = 3,
            device: str = "auto", precision: str = "auto", species_csv: str | None = None,
            cache_dir: Path | None = None, batch_size: int | None = None,
            workers: int | None = None) -> list[dict[str, Any]]:
    """For each image: the precision its embedding was computed at, the top-k species by embedding
    similarity, its nearest reference images, and the species facts; an unreadable image gets its error."""
    from dinobatch.io.walk import sha256_file
    from dinobatch.models.file import resolve_model
    from dinobatch.runtime.device import resolve_runtime
    from dinobatch.store.species import default_species_csv, load_species

    runtime = resolve_runtime(device, precision)
    model = resolve_model(model_ref)
    runtime = runtime.for_model(model.spec.precision, precision)  # an int8 file: CPU only, int8
    labels, ref, ref_paths = reference_embeddings(reference, model, runtime, cache_dir=cache_dir or default_cache_dir(),
                                                  batch_size=batch_size, workers=workers)
    species = load_species(species_csv or default_species_csv())
    shas = {}
    for image in images:
        try:
            shas[image] = sha256_file(image)
        except OSError as exc:
            shas[image] = None
            log.warning("cannot read %s: %s", image, exc)
    results = _embed(model, runtime, {s: [i for i in images if shas[i] == s] for s in set(shas.values()) if s},
                     batch_size, workers)
    out = []
    for image in images:
        r = results.get(shas[image]) if shas[image] else None
        if r is None or r.error:
            out.append({"image": image, "error": r.error if r else "cannot read file"})
            continue
        ranked = rank(r.prediction[Col.EMBEDDING], labels, ref, ref_paths, top_k=top_k, neighbours=neighbours,
                      species=species)
        out.append({"image": image, "error": None, "precision": r.prediction[Col.PRECISION], **ranked})
    return out


def rank(embedding, labels: Sequence[str], ref: np.ndarray, ref_paths: Sequence[str], *, top_k: int,
         neighbours: int, species: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """One image's answer: the top_k species by the mean of their closest reference images, and its
    nearest reference images (`similar` and `serve`'s /api/similar give the same)."""
    names = sorted(set(labels))
    members = {n: np.array([k for k, m in enumerate(labels) if m == n]) for n in names}
    per_species = min(_PER_SPECIES, min(len(v) for v in members.values()))  # the same k for every species
    q = np.asarray(embedding, dtype=np.float32)
    sims = ref @ (q / max(float(np.linalg.norm(q)), 1e-12))
    scores = {n: float(np.sort(sims[idx])[-per_species:].mean()) for n, idx in members.items()}
    ranked = sorted(scores.items(), key=lambda kv: -kv[1])[:top_k]
    nearest = np.argsort(-sims)[:neighbours]
    return {"species": [{"label": n, "similarity": s, **species.get(n, {})} for n, s in ranked],
            "nearest": [{"path": ref_paths[k], "label": labels[k], "similarity": float(sims[k])} for k in nearest]}
