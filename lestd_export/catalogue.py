"""The catalogue of known models: one JSON file per alias in the top-level ``models/`` folder.

Each entry says where the weights come from (``source``) and which settings we recommend.
``LESTD_MODELS_DIR`` points the catalogue elsewhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import CorruptFileError, ModelNotFoundError
from .files import read_json

DEFAULT_ALIAS = "smollm2-135m"
SOURCE_KEYS = {  # source type -> the keys it needs
    "package-gguf": ("package", "file", "distribution", "version", "sha256"),  # see loading.package_gguf
    "package-gguf-parts": ("file", "sha256", "parts"),  # see loading.package_gguf_parts
    "hub": ("repo",),
}


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
    data = read_json(path, "fix the catalogue file, or set LESTD_MODELS_DIR to another catalogue folder")
    source = data.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if "alias" not in data or kind not in SOURCE_KEYS or any(key not in source for key in SOURCE_KEYS[kind]):
        kinds = " or ".join(f"{k} ({', '.join(keys)})" for k, keys in SOURCE_KEYS.items())
        raise CorruptFileError(f"{path} is not a complete catalogue entry: it needs 'alias' and a 'source' of type "
                               f"{kinds}; fix the file, or set LESTD_MODELS_DIR to another catalogue folder")
    return CatalogueEntry(alias=data["alias"], name=data.get("name", alias), description=data.get("description", ""),
                          source=data["source"], recommended=data.get("recommended", {}))
