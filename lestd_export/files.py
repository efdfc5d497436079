"""Reading the files the tool is given, with typed errors that name the file and say what to do.

Library readers meet a truncated or foreign file with their own exception types (json, safetensors,
tokenizers, protobuf, gguf) and a traceback. These checks run first, where a file enters the tool, so
that a bad file is a one-line :class:`CorruptFileError` before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import CorruptFileError

# JSON files of a model, checkpoint or export directory that transformers, optimum or we read
MODEL_JSON_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.json", "added_tokens.json", "vocab.json", "model.safetensors.index.json",
                    "compression_report.json", "export_report.json")
GGUF_SPECIAL_TOKENS = {  # generation-config name -> GGUF metadata key
    "bos_token_id": "tokenizer.ggml.bos_token_id", "eos_token_id": "tokenizer.ggml.eos_token_id",
    "pad_token_id": "tokenizer.ggml.padding_token_id", "unk_token_id": "tokenizer.ggml.unknown_token_id",
    "add_bos_token": "tokenizer.ggml.add_bos_token", "add_eos_token": "tokenizer.ggml.add_eos_token"}


def first_line(error: BaseException) -> str:
    """An exception as one short line (its type when it has no message)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def read_json(path: Path, fix: str = "restore or re-create it") -> dict:
    """A JSON object from ``path``; :class:`CorruptFileError` (naming the file, then ``fix``) otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as error:
        raise CorruptFileError(f"cannot read {path}: {error.strerror or first_line(error)}") from None
    except UnicodeDecodeError:
        raise CorruptFileError(f"{path} is not JSON text (it is not UTF-8): the file is corrupt; {fix}") from None
    except json.JSONDecodeError as error:
        raise CorruptFileError(f"{path} is not valid JSON ({error}): the file is "
                               f"truncated or corrupt; {fix}") from None
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path} holds a JSON {type(data).__name__}, not an object: {fix}")
    return data


def check_safetensors(path: Path, fix: str) -> None:
    """Open a safetensors file's header, which also checks that the file is as long as it says."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as error:  # noqa: BLE001 -- safetensors raises its own SafetensorError (and OSError)
        raise CorruptFileError(f"{path} is not a readable safetensors file ({first_line(error)}): the file is "
                               f"truncated or corrupt; {fix}") from None


def check_model_dir(path: Path, fix: str) -> None:
    """Every JSON and safetensors file of a model, checkpoint or export directory that loading will read."""
    path = Path(path)
    for name in MODEL_JSON_FILES:
        if (path / name).is_file():
            read_json(path / name, fix)
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors(weights, fix)


def check_onnx(path: Path, fix: str) -> None:
    """Parse an ONNX file's protobuf (weights in external files are not read)."""
    import onnx

    try:
        onnx.load(str(path), load_external_data=False)
    except Exception as error:  # noqa: BLE001 -- protobuf's DecodeError and onnx's own errors
        raise CorruptFileError(f"{path} is not a readable ONNX model ({first_line(error)}): the file is "
                               f"truncated or corrupt; {fix}") from None


def gguf_special_tokens(path: Path) -> dict:
    """The special-token ids and BOS/EOS flags a GGUF records (keys of :data:`GGUF_SPECIAL_TOKENS` it has).

    Reading the metadata also checks the file: one that is not a complete GGUF is a :class:`CorruptFileError`.
    """
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as error:  # noqa: BLE001 -- gguf raises ValueError, numpy errors, OSError for bad files
        raise CorruptFileError(f"{path} is not a readable GGUF file ({first_line(error)}): pass a complete .gguf "
                               "model file (a truncated download fails like this)") from None
    found = {}
    for name, key in GGUF_SPECIAL_TOKENS.items():
        field = reader.fields.get(key)
        if field is not None and field.data:
            value = field.parts[field.data[0]][0]
            found[name] = bool(value) if name.startswith("add_") else int(value)
    return found
