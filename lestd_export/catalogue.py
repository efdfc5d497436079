"""The catalogue of known models: one JSON file per alias in the top-level ``models/`` folder.

Each entry says where the weights come from (``source``) and which settings we recommend.
``LESTD_MODELS_DIR`` points the catalogue elsewhere.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelNotFoundError

DEFAULT_ALIAS = "smollm2-135m"


@dataclass(frozen=True)
class CatalogueEntry:
    alias: str
    name: str
    description: str
    source: dict
    recommended: dict


def catalogue_dir() -> Path:
    override = os.environ.get("LESTD_MODELS_DIR")
    return Path(override) if override else Path(__file__).resolve().parent.parent / "models"


def list_aliases() -> list[str]:
    folder = catalogue_dir()
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def entry(alias: str) -> CatalogueEntry:
    path = catalogue_dir() / f"{alias}.json"
    if not path.is_file():
        known = ", ".join(list_aliases()) or f"none (no catalogue at {catalogue_dir()})"
        raise ModelNotFoundError(f"unknown model alias {alias!r}; known aliases: {known}")
    data = json.loads(path.read_text())
    return CatalogueEntry(alias=data["alias"], name=data.get("name", alias), description=data.get("description", ""),
                          source=data["source"], recommended=data.get("recommended", {}))
