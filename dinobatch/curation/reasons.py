"""Why an image is in the review queue: each reason's name, score and meaning, spelled once.

Light on purpose (no numpy, no Arrow): `curate --help` lists the reasons from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["Reason", "ANY", "TINY_SIDE", "MAX_ASPECT"]

ANY = "any"  # --fail-on's name for "flagged for any reason"
TINY_SIDE = 64  # pixels: a shorter side below this is tiny
MAX_ASPECT = 4.0  # long side over short side above this is an extreme aspect


@dataclass(frozen=True)
class _Scoring:
    base: float  # the score of the mildest case
    span: float  # how far a worse case raises it (0: one fixed score)
    description: str


class Reason(StrEnum):
    """A curation reason; its value is the name the queue, the summary and --fail-on spell.

    The queue is ordered by the highest score among each image's reasons. Members are listed in the
    order the summary counts them (that order is part of summary.json's bytes)."""

    LABEL_ERROR = "label_error"
    DUPLICATE_SPLIT_LEAK = "duplicate_split_leak"
    DUPLICATE_LABEL_CONFLICT = "duplicate_label_conflict"
    UNKNOWN_LABEL = "unknown_label"
    UNREADABLE = "unreadable"
    LOW_CONFIDENCE = "low_confidence"
    EMBEDDING_NEAR_DUPLICATE = "embedding_near_duplicate"
    OUTLIER = "outlier"
    NEARLY_BLANK = "nearly_blank"
    TINY = "tiny"
    EXTREME_ASPECT = "extreme_aspect"

    @property
    def base(self) -> float:
        """The score of this reason's mildest case."""
        return _TABLE[self].base

    @property
    def top(self) -> float:
        """The score of this reason's worst case."""
        return _TABLE[self].base + _TABLE[self].span

    @property
    def description(self) -> str:
        """What the reason means, for a person (help, review page)."""
        return _TABLE[self].description

    def score(self, strength: float = 0.0, per: float = 1.0) -> float:
        """The score of a case of strength strength/per, 0 (mildest) to 1 (worst); fixed-score reasons
        ignore it. base + span * strength / per, in that order: the scores' last bits stay as they were."""
        entry = _TABLE[self]
        return entry.base + entry.span * strength / per if entry.span else entry.base

    def scores(self) -> str:
        """The score, or its range, as help text shows it: '0.9', '0.4-0.6'."""
        return f"{self.base:g}" if not _TABLE[self].span else f"{self.base:g}-{self.top:g}"


# base + span x strength; strength is the reason's own measure (see curate), scaled to 0..1
_TABLE = {
    Reason.LABEL_ERROR: _Scoring(0.5, 0.5, "the given label looks wrong: confident learning on the model's "
                                           "probabilities (needs --manifest)"),
    Reason.DUPLICATE_SPLIT_LEAK: _Scoring(0.9, 0.0, "copies of the same image sit in different splits "
                                                    "(needs --manifest)"),
    Reason.DUPLICATE_LABEL_CONFLICT: _Scoring(0.85, 0.0, "copies of the same image carry different labels "
                                                         "(needs --manifest)"),
    Reason.UNKNOWN_LABEL: _Scoring(0.7, 0.0, "a given label the model does not know (a typo, or a new class)"),
    Reason.UNREADABLE: _Scoring(0.8, 0.0, "the file could not be read or decoded"),
    Reason.LOW_CONFIDENCE: _Scoring(0.0, 0.5, "the model's confidence is below --low-confidence"),
    Reason.EMBEDDING_NEAR_DUPLICATE: _Scoring(0.4, 0.2, "the same scene as another image by embedding, not "
                                                        "caught by the hashes"),
    Reason.OUTLIER: _Scoring(0.3, 0.2, "far from every class centre in embedding space"),
    Reason.NEARLY_BLANK: _Scoring(0.3, 0.0, "almost no edges: a nearly blank image"),
    Reason.TINY: _Scoring(0.25, 0.0, f"the shorter side is under {TINY_SIDE} pixels"),
    Reason.EXTREME_ASPECT: _Scoring(0.2, 0.0, f"one side is more than {MAX_ASPECT:g} times the other"),
}
