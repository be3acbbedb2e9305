"""What a reviewer should look at first: a queue of images, most urgent first, with reasons.

The reasons, their scores and what they mean are curation.reasons.Reason; the queue is ordered by
the highest score among each image's reasons.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dinobatch.curation.reasons import ANY, MAX_ASPECT, TINY_SIDE, Reason
from dinobatch.errors import ConfigError, InputError
from dinobatch.schema import STATUS_ERROR, STATUS_OK, Col, read_metadata
from dinobatch.store.predictions import check_predictions

__all__ = ["Reason", "REASONS", "CurateConfig", "CurateResult", "curate", "confident_learning", "near_embedding_pairs",
           "MAX_REVIEW", "review_key", "mark_review"]

log = logging.getLogger(__name__)

REASONS = tuple(r.value for r in Reason)  # the names, in the summary's order
MAX_REVIEW = 500  # review items (a duplicate group is one): about a reviewer's hour at a few seconds each


@dataclass(frozen=True)
class CurateConfig:
    predictions: str  # a classify output folder
    out: str
    manifest: str | None = None
    low_confidence: float = 0.5
    rank_by: str = "self_confidence"  # or normalized_margin
    method: str = "prune_by_noise_rate"  # or confident_learning
    embedding_duplicate: float = 0.97  # cosine similarity
    outlier_z: float = 3.5  # robust z-score of the distance to the nearest class centre
    tiny: int = TINY_SIDE  # shorter side in pixels
    max_aspect: float = MAX_ASPECT
    blank_bits: int = 2  # dHash with at most this many bits set: almost no structure
    fail_on: tuple[tuple[str, float], ...] = ()
    max_review: int = MAX_REVIEW  # items on the review page; 0: every flagged image

    def __post_init__(self) -> None:
        if self.max_review < 0:
            raise ConfigError("--max-review must be 0 (no cap) or more")
        if self.rank_by not in ("self_confidence", "normalized_margin"):
            raise ConfigError("rank_by must be self_confidence or normalized_margin")
        if self.method not in ("prune_by_noise_rate", "confident_learning"):
            raise ConfigError("method must be prune_by_noise_rate or confident_learning")
        for reason, share in self.fail_on:
            if reason not in REASONS and reason != ANY:
                raise ConfigError(f"--fail-on: unknown reason {reason!r}; use one of {', '.join(REASONS)} or {ANY}")
            if not 0 <= share <= 1:
                raise ConfigError(f"--fail-on {reason}: the share must be between 0 and 1")


@dataclass
class CurateResult:
    queue: list[dict[str, Any]]
    counts: dict[str, int]
    images: int
    breaches: list[str] = field(default_factory=list)
    confusion: dict[str, Any] = field(default_factory=dict)
    groups: list[list[dict[str, Any]]] = field(default_factory=list)
    source_folder: str | None = None
    labels: list[str] = field(default_factory=list)  # the model's, in its order (the relabel type-ahead)
    manifest: str | None = None  # absolute path of --manifest: what the review's decisions apply to
    max_review: int = MAX_REVIEW


def confident_learning(probs: np.ndarray, given: np.ndarray, rank_by: str = "self_confidence",
                       method: str = "prune_by_noise_rate"):
    """Label issues by confident learning (Northcutt, Jiang and Chuang, JAIR 2021).

    Per-class thresholds t_j = mean predicted probability of class j over the images labelled j;
    an image's confident class is its most probable class among those at or above their threshold,
    and the confident joint counts (given, confident) pairs. method "confident_learning" flags every
    off-diagonal image; "prune_by_noise_rate" (the paper's recommendation, fewer false alarms)
    calibrates the joint to the label counts and, for each off-diagonal cell (i, j), flags only
    round(n * Q[i, j]) images labelled i, those with the largest margin p_j - p_i.
    Returns (issue mask, suggested class, ranking score in [0, 1], higher = more likely wrong)."""
    n, c = probs.shape
    thresholds = np.full(c, np.inf)
    for j in range(c):
        mine = given == j
        if mine.any():
            thresholds[j] = probs[mine, j].mean()
    above = probs >= thresholds[None, :] - 1e-6  # as cleanlab: a mean equal to its members still counts
    confident = np.where(above, probs, -1.0).argmax(axis=1)
    has = above.any(axis=1)
    off_diagonal = has & (confident != given)
    if method == "confident_learning":
        issue = off_diagonal
    else:
        issue = _prune_by_noise_rate(probs, given, confident, has, c)
    issue &= probs.argmax(axis=1) != given  # as cleanlab: never flag an image the model agrees with
    others = probs.copy()
    others[np.arange(n), given] = -1.0
    suggested = np.where(off_diagonal, confident, others.argmax(axis=1))
    self_conf = probs[np.arange(n), given]
    if rank_by == "self_confidence":
        score = 1.0 - self_conf
    else:
        score = (1.0 - (self_conf - others.max(axis=1))) / 2.0
    return issue, suggested, score


def _prune_by_noise_rate(probs, given, confident, has, c) -> np.ndarray:
    n = len(given)
    joint = np.zeros((c, c))
    np.add.at(joint, (given[has], confident[has]), 1)
    label_counts = np.bincount(given, minlength=c)
    rows = joint.sum(axis=1, keepdims=True)
    calibrated = np.divide(joint, rows, out=np.zeros_like(joint), where=rows > 0) * label_counts[:, None]
    q = calibrated / max(calibrated.sum(), 1e-12)
    issue = np.zeros(n, dtype=bool)
    for i in range(c):
        mine = np.nonzero(given == i)[0]
        for j in range(c):
            k = int(round(n * q[i, j]))
            if j == i or k == 0 or len(mine) == 0:
                continue
            margin = probs[mine, j] - probs[mine, i]
            issue[mine[np.argsort(-margin, kind="stable")[:k]]] = True
    return issue


def near_embedding_pairs(emb: np.ndarray, threshold: float, block: int = 2048) -> list[tuple[int, int, float]]:
    """Pairs (i < j) whose embeddings have cosine similarity >= threshold, in blocks of rows."""
    if len(emb) < 2:
        return []
    x = emb / np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)
    out = []
    for lo in range(0, len(x), block):
        sims = x[lo:lo + block] @ x.T
        i, j = np.nonzero(sims >= threshold)
        keep = j > i + lo
        out.extend((int(a + lo), int(b), float(sims[a, b])) for a, b in zip(i[keep], j[keep]))
    return out


def _manifest_index(path: str | None):
    """sha256 -> [(absolute path, label, split)] of a manifest's usable rows, or None without one."""
    if path is None:
        return None
    from dinobatch.training.manifest import load_manifest

    manifest = load_manifest(path)
    index: dict[str, list[tuple[str, str, str]]] = {}
    for r in manifest.rows():
        index.setdefault(r[Col.SHA256], []).append((os.path.normpath(manifest.abspath(r)), r[Col.LABEL], r[Col.SPLIT]))
    return index


def _given(row: dict[str, Any], index, folder: str | None) -> tuple[str | None, str | None]:
    """The label and split a manifest gives this file: matched by content, preferring the entry for
    the very same file (manifest root/path == classified folder/path)."""
    if index is None or not row[Col.SHA256] or row[Col.SHA256] not in index:
        return None, None
    from dinobatch.training.manifest import exact_name

    entries = index[row[Col.SHA256]]
    here = os.path.normpath(os.path.join(folder, exact_name(row))) if folder else None  # as the manifest's
    same = [e for e in entries if e[0] == here]
    _, label, split = (same or entries)[0]
    return label, split


def curate(cfg: CurateConfig) -> CurateResult:
    """Build the review queue from a classify output folder (and, optionally, the labels people gave)."""
    from dinobatch.curation.decisions import refuse_earlier_review
    from dinobatch.store.runs import latest_run

    refuse_earlier_review(cfg.out)
    table, summary = latest_run(cfg.predictions)
    if not table.num_rows:  # before the labels: a run with nothing to classify loaded no model to name them
        raise InputError(f"{cfg.predictions}: the latest classify run has no rows")
    labels = read_metadata(table.schema).get("labels") or []
    rows = check_predictions(table, labels, f"{cfg.predictions} (run {summary.get('run_id')})").to_pylist()
    index = _manifest_index(cfg.manifest)
    flags: dict[int, dict[str, tuple[float, str]]] = {}

    def flag(i: int, reason: Reason, detail: str, strength: float = 0.0, per: float = 1.0) -> None:
        score = reason.score(strength, per)
        if score > flags.setdefault(i, {}).get(reason.value, (-1.0, ""))[0]:
            flags[i][reason.value] = (float(score), detail)

    folder = summary.get("config", {}).get("folder")
    given = [_given(r, index, folder) for r in rows]
    _manifest_copies(rows, index, flag)
    suggested: dict[int, str] = {}
    _quality(rows, cfg, flag)
    _confidence_and_labels(rows, given, labels, cfg, flag, suggested)
    groups = _duplicates(rows, given, flag)
    _embeddings(rows, given, labels, cfg, flag)
    queue = _queue(rows, given, flags, suggested)
    mark_review(queue, cfg.max_review)
    counts = {reason: sum(1 for f in flags.values() if reason in f) for reason in REASONS}
    breaches = _breaches(cfg, counts, len(rows), len(queue))
    manifest = os.path.abspath(cfg.manifest) if cfg.manifest else None
    return CurateResult(queue, counts, len(rows), breaches, _confusion(rows, given, labels), groups, folder,
                        list(labels), manifest, cfg.max_review)


def _manifest_copies(rows, index, flag) -> None:
    """Copies (same bytes) that the manifest itself lists with different labels or splits."""
    if index is None:
        return
    for i, r in enumerate(rows):
        entries = index.get(r[Col.SHA256] or "", [])
        labels, splits = {e[1] for e in entries}, {e[2] for e in entries if e[2]}
        if len(labels) > 1:
            flag(i, Reason.DUPLICATE_LABEL_CONFLICT, f"the manifest lists copies as {', '.join(sorted(labels))}")
        if len(splits) > 1:
            flag(i, Reason.DUPLICATE_SPLIT_LEAK, f"the manifest has copies in {', '.join(sorted(splits))}")


def _quality(rows, cfg: CurateConfig, flag) -> None:
    for i, r in enumerate(rows):
        if r[Col.STATUS] == STATUS_ERROR:
            flag(i, Reason.UNREADABLE, r[Col.ERROR] or Reason.UNREADABLE.value)
            continue
        w, h = r[Col.WIDTH] or 0, r[Col.HEIGHT] or 0
        if min(w, h) < cfg.tiny:
            flag(i, Reason.TINY, f"{w}x{h} pixels")
        if min(w, h) and max(w, h) / min(w, h) > cfg.max_aspect:
            flag(i, Reason.EXTREME_ASPECT, f"aspect ratio {max(w, h) / min(w, h):.1f}:1")
        if r[Col.DHASH] and bin(int(r[Col.DHASH], 16)).count("1") <= cfg.blank_bits:
            flag(i, Reason.NEARLY_BLANK, "almost no edges (dHash nearly empty)")


def _confidence_and_labels(rows, given, labels, cfg: CurateConfig, flag, suggested) -> None:
    scored = [i for i, r in enumerate(rows) if r[Col.STATUS] != STATUS_ERROR and r[Col.PROBS]]
    for i in scored:
        conf = rows[i][Col.CONFIDENCE]
        if conf is not None and conf < cfg.low_confidence:
            flag(i, Reason.LOW_CONFIDENCE, f"confidence {conf:.2f} < {cfg.low_confidence}", 1 - conf)
    lookup = {label: k for k, label in enumerate(labels)}
    unknown = [i for i in scored if given[i][0] and given[i][0] not in lookup]
    for i in unknown:
        flag(i, Reason.UNKNOWN_LABEL, f"labelled {given[i][0]}, a class the model does not have")
    if unknown:
        log.warning("%d image(s) carry labels the model does not know (%s); they are left out of the label-error "
                    "check", len(unknown), ", ".join(sorted({given[i][0] for i in unknown})[:5]))
    # near duplicates carry their kept file's prediction: judge only images on their own prediction
    known = [i for i in scored if given[i][0] in lookup and rows[i][Col.DUPLICATE_KIND] != "near"]
    if not known:
        return
    probs = np.array([rows[i][Col.PROBS] for i in known], dtype=np.float64)
    y = np.array([lookup[given[i][0]] for i in known])
    issue, confident, score = confident_learning(probs, y, cfg.rank_by, cfg.method)
    for k, i in enumerate(known):
        if issue[k]:
            suggested[i] = labels[confident[k]]
            flag(i, Reason.LABEL_ERROR, f"labelled {given[i][0]} (p={probs[k, y[k]]:.2f}), looks like "
                 f"{labels[confident[k]]} (p={probs[k, confident[k]]:.2f})", score[k])


def _duplicates(rows, given, flag) -> list[list[dict[str, Any]]]:
    """Flag duplicate groups with conflicting labels or straddling splits; return every group."""
    members: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        if r[Col.DUPLICATE_GROUP] is not None:
            members.setdefault(r[Col.DUPLICATE_GROUP], []).append(i)
    groups = []
    for idx in members.values():
        labels = {given[i][0] for i in idx if given[i][0]}
        splits = {given[i][1] for i in idx if given[i][1]}
        for i in idx:
            if len(splits) > 1:
                flag(i, Reason.DUPLICATE_SPLIT_LEAK, f"copies in splits {', '.join(sorted(splits))}")
            if len(labels) > 1:
                flag(i, Reason.DUPLICATE_LABEL_CONFLICT, f"copies labelled {', '.join(sorted(labels))}")
        groups.append([{Col.PATH: rows[i][Col.PATH], Col.SHA256: rows[i][Col.SHA256], Col.LABEL: given[i][0],
                        Col.SPLIT: given[i][1], "kept": rows[i][Col.DUPLICATE_OF] is None,
                        Col.PREDICTED_LABEL: rows[i][Col.LABEL], Col.CONFIDENCE: rows[i][Col.CONFIDENCE],
                        Col.DUPLICATE_GROUP: rows[i][Col.DUPLICATE_GROUP]} for i in idx])
    return groups


def _embeddings(rows, given, labels, cfg: CurateConfig, flag) -> None:
    idx = [i for i, r in enumerate(rows) if r[Col.STATUS] == STATUS_OK and r[Col.EMBEDDING]]
    if len(idx) < 2:
        log.info("no embeddings in these predictions (classify --embeddings): near duplicates by "
                 "embedding and outliers are not checked")
        return
    emb = np.array([rows[i][Col.EMBEDDING] for i in idx], dtype=np.float32)
    for a, b, sim in near_embedding_pairs(emb, cfg.embedding_duplicate):
        ra, rb = rows[idx[a]], rows[idx[b]]
        if ra[Col.DUPLICATE_GROUP] is not None and ra[Col.DUPLICATE_GROUP] == rb[Col.DUPLICATE_GROUP]:
            continue
        above, scale = sim - cfg.embedding_duplicate, max(1 - cfg.embedding_duplicate, 1e-9)
        flag(idx[a], Reason.EMBEDDING_NEAR_DUPLICATE, f"looks like {rb[Col.PATH]} (cosine {sim:.3f})", above, scale)
        flag(idx[b], Reason.EMBEDDING_NEAR_DUPLICATE, f"looks like {ra[Col.PATH]} (cosine {sim:.3f})", above, scale)
    x = emb / np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)
    names = [given[i][0] or rows[i][Col.LABEL] for i in idx]  # the given label, else the predicted one
    z = _outlier_scores(x, names)
    if z is None:
        return
    for k in np.nonzero(z > cfg.outlier_z)[0]:
        flag(idx[k], Reason.OUTLIER, f"far from every class centre (robust z {z[k]:.1f})",
             min(1.0, (z[k] - cfg.outlier_z) / 10))


def _outlier_scores(x: np.ndarray, names: list[str], min_class: int = 3):
    """Robust z-score of each image's cosine distance to the nearest class centre. An image's own
    class centre leaves the image out; classes of fewer than min_class images have no centre."""
    classes = [n for n in sorted(set(names)) if names.count(n) >= min_class]
    if not classes:
        return None
    member = np.array([[m == n for n in classes] for m in names])  # (images, classes)
    sums = member.T.astype(np.float64) @ x
    counts = member.sum(axis=0)
    centres = sums / counts[:, None]
    sims = x @ (centres / np.clip(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12, None)).T
    for k in range(len(classes)):  # an image's own class: the centre of the others
        rows = np.nonzero(member[:, k])[0]
        loo = (sums[k][None, :] - x[rows]) / (counts[k] - 1)
        sims[rows, k] = (x[rows] * loo).sum(axis=1) / np.clip(np.linalg.norm(loo, axis=1), 1e-12, None)
    distance = 1.0 - sims.max(axis=1)
    median = np.median(distance)
    mad = max(1.4826 * float(np.median(np.abs(distance - median))), 0.01)  # floor: tight clusters
    return (distance - median) / mad


def _queue(rows, given, flags, suggested) -> list[dict[str, Any]]:
    """One entry per flagged image, its reasons by score (highest first); most urgent image first."""
    queue = []
    for i, reasons in flags.items():
        r = rows[i]
        ordered = sorted(reasons.items(), key=lambda kv: -kv[1][0])
        queue.append({Col.PATH: r[Col.PATH], Col.SHA256: r[Col.SHA256], Col.STATUS: r[Col.STATUS],
                      Col.GIVEN_LABEL: given[i][0], Col.SPLIT: given[i][1], Col.PREDICTED_LABEL: r[Col.LABEL],
                      Col.SUGGESTED_LABEL: suggested.get(i, r[Col.LABEL] if given[i][0] else None),
                      Col.CONFIDENCE: r[Col.CONFIDENCE], Col.SCORE: round(ordered[0][1][0], 4),
                      Col.REASONS: [k for k, _ in ordered], Col.DETAILS: "; ".join(v[1] for _, v in ordered),
                      Col.DUPLICATE_GROUP: r[Col.DUPLICATE_GROUP]})
    queue.sort(key=lambda q: (-q[Col.SCORE], q[Col.PATH]))
    return queue


def review_key(entry: dict[str, Any]) -> str:
    """The review item a queue entry belongs to: its duplicate group (shown once, with every member), else itself."""
    group = entry.get(Col.DUPLICATE_GROUP)
    return f"group-{group}" if group is not None else f"file-{entry[Col.PATH]}"


def mark_review(queue: list[dict[str, Any]], limit: int) -> None:
    """Set each entry's in_review: at most `limit` items (0: all), highest score first, with each reason's
    best items kept (limit // 50, at least 1, each) so a flood of one reason cannot hide the others.

    The queue keeps every flagged entry; the ones left out stay in queue.parquet and queue.csv, marked."""
    items: dict[str, list[dict[str, Any]]] = {}
    for q in queue:  # the queue is in score order: an item's position is its best entry's
        items.setdefault(review_key(q), []).append(q)
    keys = list(items)
    chosen = set(keys)
    if limit and len(keys) > limit:
        quota = max(1, limit // 50)
        reserved: list[str] = []
        for reason in REASONS:
            having = [k for k in keys if any(reason in q[Col.REASONS] for q in items[k])]
            reserved += [k for k in having[:quota] if k not in reserved]
        order = {k: n for n, k in enumerate(keys)}
        chosen = set(sorted(reserved, key=order.__getitem__)[:limit])
        for k in keys:
            if len(chosen) >= limit:
                break
            chosen.add(k)
    for k, entries in items.items():
        for q in entries:
            q[Col.IN_REVIEW] = k in chosen


def _breaches(cfg: CurateConfig, counts: dict[str, int], images: int, flagged: int) -> list[str]:
    out = []
    for reason, share in cfg.fail_on:
        n = flagged if reason == ANY else counts[reason]
        if images and n / images > share:
            out.append(f"{reason}: {n} of {images} images ({n / images:.1%}) > {share:.1%}")
    return out


def _confusion(rows, given, labels) -> dict[str, Any]:
    """Given label x predicted label counts over the labelled images (for the review page)."""
    pairs: dict[tuple[str, str], int] = {}
    for r, (label, _) in zip(rows, given):
        if label and r[Col.LABEL] and r[Col.STATUS] != STATUS_ERROR:
            pairs[(label, r[Col.LABEL])] = pairs.get((label, r[Col.LABEL]), 0) + 1
    names = sorted({a for a, _ in pairs} | {b for _, b in pairs})
    return {"labels": names, "counts": [[pairs.get((a, b), 0) for b in names] for a in names]}
