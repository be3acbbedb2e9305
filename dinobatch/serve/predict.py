"""The model behind /api/predict and /api/similar: an upload decoded as classify decodes a file,
then predicted in micro-batches (serve.batching) by classify's infer stage."""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from dinobatch.imaging import decode_budget
from dinobatch.imaging.decode import decode
from dinobatch.imaging.preprocess import model_input
from dinobatch.models.file import LoadedModel
from dinobatch.runtime.device import Runtime
from dinobatch.schema import SPECIES_COLUMNS
from dinobatch.serve.batching import MicroBatcher
from dinobatch.stages.decode import decode_error, facts
from dinobatch.stages.infer import Predictor

__all__ = ["Prepared", "UnusableImage", "ModelService", "species_facts"]

log = logging.getLogger(__name__)
_SPECIES_PREFIX = "species_"


class UnusableImage(Exception):
    """An upload the model cannot take (not an image, a bomb, a broken file): the reason is for the client."""


@dataclass(frozen=True)
class Prepared:
    """One upload, decoded once: its facts and hashes (as classify's row has them) and its model input."""

    sha256: str
    facts: dict[str, Any]  # format, width, height, mode, phash, dhash
    pixels: Any  # uint8 CHW tensor, crop x crop


def species_facts(species: Mapping[str, Mapping[str, Any]], label: str) -> dict[str, Any] | None:
    """A label's species facts as the API spells them (common_name, ..., length_m), None if unknown."""
    facts = species.get(label)
    if not facts:
        return None
    return {c.removeprefix(_SPECIES_PREFIX): facts.get(c) for c in SPECIES_COLUMNS}


class ModelService:
    """The loaded model on its device, with its micro-batcher; thread-safe (one worker runs the model)."""

    def __init__(self, model: LoadedModel, runtime: Runtime, *, batch_size: int, max_wait_ms: float):
        self.model, self.runtime = model, runtime
        self.prep = model.spec.preprocessing
        # embeddings always: /api/similar shares the batches of /api/predict
        self.predictor = Predictor(model, runtime, batch_size=batch_size, embeddings=True)
        self.batcher: MicroBatcher = MicroBatcher(self._forward, max_batch=batch_size, max_wait_ms=max_wait_ms)

    def prepare(self, data: bytes) -> Prepared:
        """Decode an upload as classify decodes a file (imaging.decode: allowed formats, bombs refused,
        EXIF orientation) into its facts and model input; UnusableImage with the reason otherwise."""
        try:
            dec = decode(data, min_side=self.prep.resize, heavy=decode_budget.hold)
            pixels = model_input(dec.image, self.prep)
        except Exception as exc:  # as stages.decode.decode_item: a hostile file's error, not the server's
            raise UnusableImage(decode_error(exc)) from exc
        return Prepared(hashlib.sha256(data).hexdigest(), facts(dec), pixels)

    def submit(self, prepared: Prepared) -> Future:
        """Queue a prepared upload for the next forward pass; the Future gets infer's prediction
        (label, confidence, probs, margin, entropy, embedding, precision) or stages.infer.NON_FINITE."""
        return self.batcher.submit(prepared.pixels)

    def _forward(self, pixels: Sequence[Any]) -> list[dict[str, Any] | str]:
        """One forward pass over the batch, on the worker thread."""
        import torch

        return self.predictor(self.runtime.to_device(torch.stack(list(pixels))))

    def top_k(self, probs: Sequence[float], k: int) -> list[dict[str, Any]]:
        """The k best labels with their probabilities, as classify's topk_labels and topk_probs."""
        from dinobatch.stages.rows import top_k

        names, values = top_k([list(probs)], self.model.spec.labels, k)
        return [{"label": n, "prob": p} for n, p in zip(names[0], values[0])]

    def close(self) -> None:
        self.batcher.close()
