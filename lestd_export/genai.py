"""onnxruntime-genai model directories: build them, recognise them.

The genai builder (``python -m onnxruntime_genai.models.builder``) turns a Hugging Face directory into
``model.onnx`` (+ external data) and ``genai_config.json``: GroupQueryAttention with rotary inside, fused
layer norms, int4 MatMulNBits at ``-p int4``. It is what a user of the genai runtime would pick, so bench
and eval treat such a directory as a first-class variant. ``onnxruntime_genai`` is imported lazily.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import InvalidConfigError, LestdError
from .files import read_json
from .io import atomic_output_dir

GENAI_REQUIREMENT = "onnxruntime-genai==0.15.2"
GENAI_CONFIG = "genai_config.json"
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
TAIL_LINES = 15


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
    config = Path(path) / GENAI_CONFIG
    if not config.is_file():
        return False
    try:
        filename = read_json(config)["model"]["decoder"]["filename"]
    except (LestdError, KeyError, TypeError):
        return False
    return isinstance(filename, str) and (Path(path) / filename).is_file()


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
    if not (hf_dir / "config.json").is_file():
        raise GenaiBuildError(f"{hf_dir} is not a Hugging Face model directory (no config.json): "
                              "give the directory save_pretrained wrote")
    require_genai()
    options = [f"{key}={value}" for key, value in (extra_options or {}).items()]
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
