"""A loaded model and its tokenizer: the model-side primitives that loading, checkpoints and exports share.

Every loaded tokenizer is made to agree with the model (:func:`harmonise_special_tokens`), so every
directory saved from a loaded model (checkpoint, export) has consistent special tokens and a pad token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError
from .files import first_line

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class LoadedModel:
    model: object  # transformers PreTrainedModel, eval mode, fp32
    tokenizer: object | None
    source: str  # what was loaded, for reports
    compressed: bool = False


def load_tokenizer(location: str | Path, **kwargs):
    """The tokenizer saved at ``location``, or None when a local directory holds no tokenizer files."""
    from transformers import AutoTokenizer

    folder = Path(location)
    if folder.is_dir() and not kwargs and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(location), **kwargs)
    except Exception as error:  # noqa: BLE001 -- tokenizers raises a bare Exception for a corrupt tokenizer.json
        if not folder.is_dir():
            raise  # a hub repo: loading.load_model says what to do
        raise CheckpointError(f"cannot load the tokenizer in {folder} ({first_line(error)}): re-save its tokenizer "
                              "files (tokenizer.json, tokenizer_config.json) or remove them") from None


SPECIAL_TOKENS = ("bos", "eos", "pad", "unk")


def harmonise_special_tokens(model, tokenizer, recorded: dict | None = None) -> None:
    """Make ``tokenizer``'s bos/eos/pad/unk tokens the ones the model generates with, and give it a pad token.

    Each id comes from ``recorded`` (a GGUF's own metadata, see :func:`lestd_export.files.gguf_special_tokens`)
    where given, else the generation config, else the config, and is adopted where the tokenizer knows it
    as a special (added) token. A tokenizer still without a pad token pads with eos, and a generation
    config without a pad id gets the tokenizer's. ``recorded`` BOS/EOS flags are applied, and padding
    goes left (a decoder-only model generates from left-padded batches). Saved directories (checkpoint,
    export) then agree: tokenizer files, ``config.json`` and ``generation_config.json``.
    """
    if tokenizer is None:
        return
    recorded = recorded or {}
    generation = getattr(model, "generation_config", None)
    special = set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids)
    for name in SPECIAL_TOKENS:
        key, current = f"{name}_token_id", getattr(tokenizer, f"{name}_token_id")
        wanted = recorded.get(key)
        for config in (generation, model.config):
            if wanted is None:
                wanted = getattr(config, key, None)
        if isinstance(wanted, (list, tuple)):  # several stop tokens: keep the tokenizer's when it is one of them
            wanted = current if current in wanted else next(iter(wanted), None)
        if wanted is not None and wanted != current and wanted in special:
            setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(int(wanted)))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for flag in ("add_bos_token", "add_eos_token"):
        if flag in recorded and hasattr(tokenizer, flag):
            setattr(tokenizer, flag, recorded[flag])
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"  # init_kwargs: what save_pretrained writes
    if generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
