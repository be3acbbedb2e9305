"""Species facts (manifests/species.csv) joined onto predictions by label."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from dinobatch.errors import ConfigError
from dinobatch.schema import Col

__all__ = ["SPECIES_CSV_COLUMNS", "default_species_csv", "load_species"]

SPECIES_CSV_COLUMNS = ("label", "common_name", "scientific_name", "period", "diet", "length_m", "source")
_TO_ROW = {
    "common_name": Col.SPECIES_COMMON_NAME,
    "scientific_name": Col.SPECIES_SCIENTIFIC_NAME,
    "period": Col.SPECIES_PERIOD,
    "diet": Col.SPECIES_DIET,
    "length_m": Col.SPECIES_LENGTH_M,
}


def default_species_csv() -> Path | None:
    """manifests/species.csv in the current folder, else the one beside the installed source tree."""
    for candidate in (Path.cwd() / "manifests" / "species.csv",
                      Path(__file__).resolve().parent.parent / "manifests" / "species.csv"):
        if candidate.is_file():
            return candidate
    return None


def load_species(path: str | os.PathLike | None) -> dict[str, dict[str, str | None]]:
    """Map label -> species columns of the output rows; an empty mapping when path is None."""
    if path is None:
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in SPECIES_CSV_COLUMNS[:-1] if c not in (reader.fieldnames or [])]
            if missing:
                raise ConfigError(f"species file {path} lacks column(s): {', '.join(missing)}")
            table = {}
            for row in reader:
                label = (row.get("label") or "").strip()
                if label:
                    table[label] = {out: (row.get(src) or "").strip() or None for src, out in _TO_ROW.items()}
            return table
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"cannot read species file {path}: {exc}") from exc
