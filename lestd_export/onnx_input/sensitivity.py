"""What a unit of output error at each weight costs the model's predictions (:func:`loss_prices`), measured through
ONNX Runtime: one weight at a time is replaced by a perturbed copy (a probe: the weight as one of its storage
options would store it), and the KL divergence of the next-token distribution from the dense model's is divided by
the probe's calibration output error ``tr(E^T C E)``.

For small errors the KL is quadratic in the error, so this ratio is the weight's price of output error in loss units
for errors shaped like the probe's; a whole-file plan (:mod:`.budget`) multiplies each option's output error by the
price of its kind of error (rounding, or low-rank truncation), so that it minimises the predicted KL of the whole
model rather than a sum of errors in unrelated units. (Isotropic noise as the probe priced rounding errors wrongly:
measured, a plan chosen with it lost to uniform block 64 at the same bytes.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from .sessions import decoder_feed, subgraph_model, subgraph_session
from .source import OnnxInput

PROBE_SEQUENCES = 2
PROBE_TOKENS = 256


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def loss_prices(source: OnnxInput, weights: list[str], probes: Callable[[str], Iterable[tuple[str, np.ndarray, float]]],
                sequences: np.ndarray, *, progress: bool = True) -> dict[tuple[str, str], float]:
    """``{(initializer, label): KL per unit output error}`` for each probe ``(label, perturbed initializer value,
    its output error)`` that ``probes(initializer)`` yields, for each weight initializer in ``weights``; the KL is
    the mean per token over the first :data:`PROBE_SEQUENCES` x :data:`PROBE_TOKENS` calibration tokens of
    ``sequences`` (every reader of the initializer sees the probe: a tied table too)."""
    from onnx import helper, numpy_helper
    from tqdm.auto import tqdm

    logits_name = (source.genai_decoder or {}).get("outputs", {}).get("logits", "logits")
    part = subgraph_model(source.model, [logits_name])
    wanted = set(weights)
    kept = [init for init in part.graph.initializer if init.name not in wanted]
    inputs = [init for init in part.graph.initializer if init.name in wanted]
    del part.graph.initializer[:]
    part.graph.initializer.extend(kept)
    part.graph.input.extend(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
                            for init in inputs)  # fed: a probe replaces one without a new session
    session = subgraph_session(part, source.model)
    originals = {init.name: numpy_helper.to_array(init) for init in source.model.graph.initializer
                 if init.name in wanted}
    ids = sequences[:PROBE_SEQUENCES, :PROBE_TOKENS]
    feed = decoder_feed(session, source.io, source.shape, ids, source.genai_decoder, known=originals)
    reference = _log_softmax(session.run([logits_name], feed)[0].astype(np.float64))  # [B, T, V]
    probabilities = np.exp(reference)
    prices = {}
    for name in tqdm(weights, desc="loss sensitivity (onnxruntime)", unit="weight", disable=not progress):
        for label, value, error in probes(name):
            feed[name] = np.ascontiguousarray(value, dtype=originals[name].dtype)
            probed = _log_softmax(session.run([logits_name], feed)[0].astype(np.float64))
            kl = float(np.mean(np.sum(probabilities * (reference - probed), axis=-1)))
            prices[(name, label)] = max(kl, 0.0) / max(error, 1e-30)
        feed[name] = originals[name]
    return prices
