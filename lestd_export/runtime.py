"""A small ONNX Runtime generation loop for exports in Optimum's text-generation-with-past format.

No PyTorch needed: numpy + onnxruntime only, so an app can copy this file. Inputs are
``input_ids``, ``attention_mask``, ``position_ids`` (when the graph has it) and
``past_key_values.{i}.key/value``; outputs are ``logits`` and ``present.{i}.key/value``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from .errors import CheckpointError, CorruptFileError, InvalidConfigError, ModelRunError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def session_options(threads: int | None = None, optimization: str = "all"):
    """The same options for every variant we compare: thread count and ORT graph optimisation level."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    options.graph_optimization_level = levels[optimization]
    return options


def open_session(model_path: Path, provider: str = "cpu", threads: int | None = None, optimization: str = "all"):
    """An InferenceSession, with typed errors for a missing/corrupt file or an unavailable provider."""
    import onnxruntime as ort

    model_path = Path(model_path)
    if not model_path.is_file():
        raise CheckpointError(f"{model_path} does not exist: pass a directory produced by `lestd-export export`")
    if provider not in PROVIDERS:
        raise InvalidConfigError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    if PROVIDERS[provider] not in ort.get_available_providers():
        raise InvalidConfigError(
            f"{provider.upper()} is unavailable in this onnxruntime build (available: "
            f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu on a machine with a GPU, or use cpu")
    try:
        return ort.InferenceSession(str(model_path), sess_options=session_options(threads, optimization),
                                    providers=[PROVIDERS[provider]])
    except Exception as error:  # onnxruntime raises its own untyped exceptions for invalid graphs
        raise CorruptFileError(f"onnxruntime cannot load {model_path} ({str(error).splitlines()[0][:200]}): the file "
                               "is truncated, corrupt or not an ONNX model; re-export it (lestd-export export)") from None


@dataclass
class StepOutput:
    logits: np.ndarray  # [B, T, vocab]
    past: list[np.ndarray]  # present.{i}.key, present.{i}.value, ... in input order


class OrtCausalLM:
    """Prefill/decode steps and greedy or sampled generation over an exported model directory."""

    def __init__(self, export_dir: str | Path, provider: str = "cpu", threads: int | None = None,
                 optimization: str = "all", session=None):
        self.path = Path(export_dir)
        self.session = session or open_session(self.path / "model.onnx", provider, threads, optimization)
        inputs = {i.name: i for i in self.session.get_inputs()}
        if "input_ids" not in inputs or "logits" not in {o.name for o in self.session.get_outputs()}:
            raise CheckpointError(f"{self.path / 'model.onnx'} does not follow the text-generation convention "
                                  "(inputs input_ids, attention_mask[, past_key_values.*]; output logits)")
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.uses_position_ids = "position_ids" in inputs
        self.past_dims = [self._kv_dims(inputs[n].shape) for n in self.past_names]  # (kv heads, head dim)
        self.dtype = np.float16 if self.past_names and "float16" in inputs[self.past_names[0]].type else np.float32

    @cached_property
    def config(self) -> dict:
        """The export's ``config.json`` (``{}`` when absent)."""
        file = self.path / "config.json"
        if not file.is_file():
            return {}
        try:
            return json.loads(file.read_bytes().decode("utf-8"))
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
            raise CorruptFileError(f"{file} is not valid JSON ({str(error)[:200]}): the file is truncated or "
                                   "corrupt; re-export the model") from None

    def _kv_dims(self, shape: list) -> tuple[int, int]:
        """``(kv_heads, head_dim)`` of a past input ``[batch, kv_heads, past, head_dim]``, from the graph
        or, where it leaves them symbolic, from ``config.json``."""
        heads, head_dim = shape[1], shape[3]
        if isinstance(heads, int) and isinstance(head_dim, int):
            return heads, head_dim
        config = self.config
        attention_heads = config.get("num_attention_heads") or config.get("n_head")
        hidden = config.get("hidden_size") or config.get("n_embd")
        heads = heads if isinstance(heads, int) else config.get("num_key_value_heads") or attention_heads
        head_dim = head_dim if isinstance(head_dim, int) else config.get("head_dim") or (
            hidden // attention_heads if hidden and attention_heads else None)
        if not (isinstance(heads, int) and isinstance(head_dim, int)):
            raise CheckpointError(f"cannot tell the KV-cache shape of {self.path} from the graph or config.json")
        return heads, head_dim

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, heads, 0, head_dim), dtype=self.dtype) for heads, head_dim in self.past_dims]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[np.ndarray] | None = None) -> StepOutput:
        """One forward: ``input_ids [B, T]``, ``attention_mask [B, past + T]`` (1 = real token)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        past = self.empty_past(input_ids.shape[0]) if past is None else past
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.uses_position_ids:
            feed["position_ids"] = position_ids(attention_mask)[:, -input_ids.shape[1]:]
        feed.update(zip(self.past_names, past))
        try:
            outputs = self.session.run(["logits", *self.present_names], feed)
        except Exception as error:  # noqa: BLE001 -- onnxruntime raises its own untyped errors at run time
            raise ModelRunError(f"onnxruntime loads {self.path} but fails running it "
                                f"({str(error).splitlines()[0][:200]}): the model is broken; rebuild it (the genai "
                                "builder 0.15.2's shared int4 embedding fails so when the block size does not divide "
                                "the hidden size)") from None
        return StepOutput(logits=outputs[0], past=outputs[1:])

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0,
                 seed: int | None = None, on_token=None) -> np.ndarray:
        """Generate up to ``max_new_tokens`` per row; rows that emit a stop token are padded afterwards.

        ``input_ids [B, T]`` left-padded with ``attention_mask`` (default: all ones). Returns
        ``[B, T + generated]``. ``on_token(step)`` is called after each new token (for timing).
        """
        rng = np.random.default_rng(seed)
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        stops = set([] if eos_token_id is None else np.atleast_1d(eos_token_id).tolist())
        finished = np.zeros(ids.shape[0], dtype=bool)
        sequence, past, step_ids = ids, None, ids
        for step in range(max_new_tokens):
            out = self.step(step_ids, mask, past)
            logits = out.logits[:, -1].astype(np.float64)
            token = sample(logits, rng, temperature, top_k, top_p) if do_sample else logits.argmax(-1)
            token = np.where(finished, pad_token_id, token)
            finished |= np.isin(token, list(stops))
            sequence = np.concatenate([sequence, token[:, None]], axis=1)
            if on_token is not None:
                on_token(step)
            if finished.all():
                break
            if self.past_names:
                past, step_ids = out.past, token[:, None]
            else:  # an export without a KV cache recomputes the whole sequence every step
                step_ids = sequence
            mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=np.int64)], axis=1)
        return sequence


def position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """Positions counted over real tokens only (left padding gets position 1, as transformers does)."""
    positions = np.cumsum(attention_mask, axis=1) - 1
    return np.where(attention_mask == 0, 1, positions).astype(np.int64)


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0) -> np.ndarray:
    """One token per row from ``logits [B, vocab]`` with temperature, top-k and nucleus filtering."""
    logits = logits / max(temperature, 1e-6)
    if top_k > 0:
        kth = np.sort(logits, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, -1)
        drop = np.cumsum(sorted_probs, -1) - sorted_probs > top_p  # outside the nucleus
        probs = np.zeros_like(probs)
        np.put_along_axis(probs, order, np.where(drop, 0.0, sorted_probs), -1)
        probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs], dtype=np.int64)
