"""onnxruntime-genai model directories: build them, recognise them, run and score them.

The genai builder (``python -m onnxruntime_genai.models.builder``) turns a Hugging Face directory into
``model.onnx`` (+ external data) and ``genai_config.json``: GroupQueryAttention with rotary inside, fused
layer norms, int4 MatMulNBits at ``-p int4``. It is what a user of the genai runtime would pick, so bench
and eval treat such a directory as a first-class variant: bench times it through genai's C++ generation
loop (:class:`GenaiRuntime`), eval scores its decoder graph in a plain onnxruntime session
(:func:`open_genai_onnx`) on the same windows as every other backend. ``onnxruntime_genai`` is imported
lazily; this module imports neither torch nor onnx.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CheckpointError, InvalidConfigError, LestdError
from .files import read_json
from .io import atomic_output_dir, check_output_dir
from .runtime import OrtCausalLM, open_session

if TYPE_CHECKING:
    import numpy as np

GENAI_REQUIREMENT = "onnxruntime-genai==0.15.2"
GENAI_CONFIG = "genai_config.json"
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
BASELINE_PRECISIONS = ("fp32", "int4")  # what a genai user would pick: the builder's dense fp32 and int4 models
TAIL_LINES = 15
# builder 0.15.2 at int8 shares a tied embedding with the lm_head under the int4 weight's name
# ("lm_head.MatMul.weight_Q4", absent from the int8 graph): the model does not load. Unshared, it does.
PRECISION_OPTIONS = {"int8": {"shared_embeddings": "false"}}
FIX_GENAI = "rebuild the directory with the onnxruntime-genai builder"


class GenaiUnavailableError(LestdError):
    """onnxruntime-genai is not installed."""


class GenaiBuildError(LestdError):
    """The onnxruntime-genai builder failed; the message ends with the last lines of its output."""


def require_genai() -> None:
    """Raise :class:`GenaiUnavailableError` (saying what to install) unless onnxruntime_genai is importable."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise GenaiUnavailableError(f"onnxruntime-genai is not installed: pip install {GENAI_REQUIREMENT} "
                                    "(or pip install 'lestd-export[genai]')")


def is_genai_dir(path: Path) -> bool:
    """True when ``path`` holds ``genai_config.json`` and the decoder model file it names."""
    if not (Path(path) / GENAI_CONFIG).is_file():
        return False
    try:
        return decoder_file(path).is_file()
    except LestdError:
        return False


def check_genai_dir(path: Path) -> bool:
    """False when ``path`` has no ``genai_config.json``; True when it is a genai directory; a typed error naming
    the file when its config is corrupt or names a decoder file that is missing."""
    if not (Path(path) / GENAI_CONFIG).is_file():
        return False
    model_file = decoder_file(path)
    if not model_file.is_file():
        raise CheckpointError(f"{Path(path) / GENAI_CONFIG} names {model_file.name}, which is missing: {FIX_GENAI}")
    return True


def decoder(path: Path) -> dict:
    """The ``model.decoder`` section of ``path/genai_config.json`` (a typed error when it has none)."""
    config = read_json(Path(path) / GENAI_CONFIG, FIX_GENAI)
    section = config.get("model", {}).get("decoder") if isinstance(config.get("model"), dict) else None
    if not isinstance(section, dict) or not isinstance(section.get("filename"), str):
        raise CheckpointError(f"{Path(path) / GENAI_CONFIG} has no model.decoder.filename: {FIX_GENAI}")
    return {**section, "vocab_size": config["model"].get("vocab_size"),
            "context_length": config["model"].get("context_length")}


def decoder_file(path: Path) -> Path:
    """The decoder ONNX file a genai directory's config names."""
    return Path(path) / decoder(path)["filename"]


def run_builder(hf_dir: Path, out_dir: Path, precision: str, *, extra_options: dict[str, str] | None = None,
                overwrite: bool = False) -> Path:
    """Build a genai model of ``hf_dir`` at ``precision`` for the CPU into ``out_dir``; return ``out_dir``.

    Runs the builder in a subprocess (offline: ``HF_HUB_OFFLINE=1``) into a staging directory next to
    ``out_dir`` that is renamed into place only when the build succeeds. An existing ``out_dir`` is an
    :class:`~lestd_export.errors.OutputExistsError` unless ``overwrite``. A failing builder raises
    :class:`GenaiBuildError` ending with the last lines of its output.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if precision not in PRECISIONS:
        raise InvalidConfigError(f"unknown genai precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    require_genai()
    check_output_dir(out_dir, overwrite)
    if not (hf_dir / "config.json").is_file():
        raise GenaiBuildError(f"{hf_dir} is not a Hugging Face model directory (no config.json): "
                              "give the directory save_pretrained wrote")
    options = [f"{key}={value}" for key, value in {**PRECISION_OPTIONS.get(precision, {}),
                                                     **(extra_options or {})}.items()]
    with atomic_output_dir(out_dir, overwrite) as staging:
        cache = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.cache-", dir=staging.parent))
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir.resolve()),
                   "-o", str(staging), "-p", precision, "-e", "cpu", "-c", str(cache)]
        if options:
            command += ["--extra_options", *options]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(cache / "hf")}
        try:
            done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  errors="replace", check=False)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        if done.returncode != 0 or not is_genai_dir(staging):
            tail = "\n".join(done.stdout.strip().splitlines()[-TAIL_LINES:])
            why = f"exit code {done.returncode}" if done.returncode else f"no {GENAI_CONFIG} with its model"
            raise GenaiBuildError(f"the onnxruntime-genai builder failed on {hf_dir} ({precision}, {why}); "
                                  f"its last output lines:\n{tail}")
    return out_dir


def genai_version() -> str | None:
    """The installed onnxruntime-genai version (None when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("onnxruntime-genai")
    except PackageNotFoundError:
        return None


def _cache_key(model_arg: str) -> str:
    """A folder name for the builds of ``model_arg``: its name and a digest of what it is (a local path's
    files, sizes and times; an alias's source entry; a hub id) and of the builder's version."""
    from . import catalogue

    path = Path(model_arg).expanduser()
    if path.exists():
        files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.is_file())
        what = str(path.resolve()) + "".join(f"|{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
        name = path.stem if path.is_file() else path.resolve().name
    elif model_arg in catalogue.list_aliases():
        what, name = json.dumps(catalogue.entry(model_arg).source, sort_keys=True), model_arg
    else:
        what, name = model_arg, model_arg.replace("/", "--")
    digest = hashlib.sha256(f"{what}|onnxruntime-genai {genai_version()}".encode()).hexdigest()[:12]
    return f"{name}-{digest}"


@contextmanager
def _hf_dir(model_arg: str, scratch: Path) -> Iterator[Path]:
    """A Hugging Face directory of the dense model ``model_arg``: the one it was loaded from when that is a
    plain Hugging Face directory (e.g. the dequantised-GGUF cache), else a ``save_pretrained`` copy in a
    temporary folder under ``scratch`` (removed afterwards)."""
    from .checkpoint import is_compressed_checkpoint
    from .loading import WEIGHT_PATTERNS, load_model

    loaded = load_model(model_arg)
    if loaded.compressed:
        raise InvalidConfigError(f"{model_arg} is a compressed checkpoint: the genai builder makes baselines of the "
                                 "dense model; pass the model it was compressed from")
    source = Path(getattr(loaded.model, "name_or_path", "") or "")
    if (source / "config.json").is_file() and any(any(source.glob(p)) for p in WEIGHT_PATTERNS) \
            and not is_compressed_checkpoint(source):
        del loaded
        yield source
        return
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".hf-", dir=scratch) as tmp:
        loaded.model.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        del loaded
        yield Path(tmp)


def genai_baselines(model_arg: str | None = None, precisions: tuple[str, ...] = BASELINE_PRECISIONS,
                    progress: bool = True) -> list[Path]:
    """The genai builder's models of ``model_arg`` (anything :func:`lestd_export.loading.load_model` takes;
    default: the default alias) at ``precisions`` (default fp32 and int4), as ``genai-{precision}``
    directories cached under ``cache_dir()/genai/<model key>/``: built once, reused afterwards."""
    from tqdm.auto import tqdm

    from .catalogue import DEFAULT_ALIAS
    from .loading import cache_dir

    require_genai()
    model_arg = model_arg or DEFAULT_ALIAS
    root = cache_dir() / "genai" / _cache_key(model_arg)
    outs = [root / f"genai-{precision}" for precision in precisions]
    missing = [(precision, out) for precision, out in zip(precisions, outs) if not is_genai_dir(out)]
    if missing:
        with _hf_dir(model_arg, root) as hf_dir:
            for precision, out in tqdm(missing, desc="genai builder", unit="model", file=sys.stderr,
                                       disable=not progress):
                run_builder(hf_dir, out, precision, overwrite=out.exists())
    return outs


# ------------------------------------------------------------------------------------ running


class GenaiRuntime:
    """onnxruntime-genai's C++ generation loop over a genai directory, fed token ids (no tokenizer).

    CPU only (the builds here are ``-e cpu``); ``threads`` sets the session's intra-op threads, and the
    graph optimisation level is ``ORT_ENABLE_ALL`` as for every other bench variant. Search is greedy
    with ``min_length == max_length``, so a generator never stops early on an end-of-sequence token.
    """

    def __init__(self, genai_dir: Path, threads: int | None = None):
        require_genai()
        import onnxruntime_genai as og

        self.path = Path(genai_dir)
        self.vocab_size = int(decoder(self.path)["vocab_size"])
        options: dict = {"graph_optimization_level": "ORT_ENABLE_ALL"}
        if threads:
            options.update(intra_op_num_threads=threads, inter_op_num_threads=1)
        try:
            config = og.Config(str(self.path))
            config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
            self.model = og.Model(config)
        except Exception as error:  # noqa: BLE001 -- onnxruntime-genai raises bare RuntimeErrors
            raise CheckpointError(f"onnxruntime-genai cannot load {self.path} ({str(error).strip()[:200]}): "
                                  f"{FIX_GENAI}") from None

    def generator(self, batch: int, max_length: int):
        """A fresh greedy ``og.Generator`` for ``batch`` rows of up to ``max_length`` tokens (prompt included)."""
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.model)
        params.set_search_options(batch_size=batch, max_length=max_length, min_length=max_length, do_sample=False)
        return og.Generator(self.model, params)

    def generate(self, prompt: np.ndarray, new_tokens: int) -> np.ndarray:
        """Greedy continuation of ``prompt [B, P]`` by ``new_tokens`` tokens: ``[B, P + new_tokens]``."""
        import numpy as np

        prompt = np.asarray(prompt, dtype=np.int32)
        generator = self.generator(prompt.shape[0], prompt.shape[1] + new_tokens)
        generator.append_tokens(prompt)
        for _ in range(new_tokens):
            generator.generate_next_token()
        return np.stack([np.asarray(generator.get_sequence(row)) for row in range(prompt.shape[0])])


class GenaiOnnxLM(OrtCausalLM):
    """A genai directory's decoder graph in a plain onnxruntime session (inputs ``input_ids``,
    ``attention_mask``, ``past_key_values.{i}.key/value``; no ``position_ids``); KV heads and head size
    come from ``genai_config.json`` where the graph leaves them symbolic."""

    @cached_property
    def config(self) -> dict:
        section = decoder(self.path)
        return {"num_attention_heads": section.get("num_attention_heads"),
                "num_key_value_heads": section.get("num_key_value_heads"), "head_dim": section.get("head_size"),
                "hidden_size": section.get("hidden_size"), "vocab_size": section.get("vocab_size")}


def open_genai_onnx(genai_dir: Path, threads: int | None = None, session=None) -> GenaiOnnxLM:
    """:class:`GenaiOnnxLM` over ``genai_dir`` (its decoder file, or ``session`` on a copy of it)."""
    return GenaiOnnxLM(genai_dir, session=session or open_session(decoder_file(genai_dir), "cpu", threads))
