"""The ``inspect`` verb: what the tool finds in a model, a checkpoint or an ONNX build, and where its bytes are.

``inspect_model(arg)`` returns a :class:`~.weights.WeightMap`: format, precision, architecture, every weight
group kind with its sites, shapes and stored bytes, and what is already compressed or quantised.
"""

from __future__ import annotations

from pathlib import Path

from .errors import LestdError
from .weights import KINDS, WeightMap


class InspectError(LestdError):
    """The argument is neither a model the tool loads nor a decoder ONNX build."""


def inspect_model(model_arg: str | None = None) -> WeightMap:
    """The weight map of a model argument (alias, GGUF, Hugging Face directory, compressed checkpoint) or of
    an ONNX decoder (an ``.onnx`` file or its directory: optimum export, onnxruntime-genai build)."""
    from .onnx_input import is_onnx_input

    if model_arg is not None and is_onnx_input(model_arg):
        return inspect_onnx(Path(model_arg))
    from .loading import load_model
    from .weights import torch_weight_map

    loaded = load_model(model_arg)
    return torch_weight_map(loaded.model, "compressed checkpoint" if loaded.compressed else "pytorch")


def inspect_onnx(path: Path) -> WeightMap:
    """The weight map of an ONNX decoder; the architecture and layer count come from its config files."""
    import onnx

    from .files import check_onnx
    from .onnx_input.source import GENAI_CONFIG, HF_CONFIG, config_model_type, read_config, resolve_input
    from .onnx_sites import config_head_counts
    from .weights import onnx_weight_map

    directory, model_file = resolve_input(path)
    check_onnx(model_file, "re-export the model")
    architecture, layers, format = None, None, "onnx"
    if (directory / GENAI_CONFIG).is_file() or (directory / HF_CONFIG).is_file():
        config, _, genai = read_config(directory)
        architecture, layers = config_model_type(config, genai), config_head_counts(config, genai)["layers"]
        format = "onnxruntime-genai" if genai else "optimum"
    graph = onnx.load(str(model_file), load_external_data=False)
    return onnx_weight_map(graph, format, architecture, layers)


def summary(weight_map: WeightMap, source: str) -> str:
    """A table of the byte totals per kind, their share, site count and storage."""
    totals = weight_map.totals()
    storage = weight_map.storages()
    sites = {kind: [s for s in weight_map.sites if s.kind == kind] for kind in KINDS}
    total = weight_map.total_bytes or 1
    lines = [f"{source}: {weight_map.format}, {weight_map.precision}, architecture {weight_map.architecture}, "
             f"{weight_map.layers} layers, {weight_map.total_bytes / 1e6:.1f} MB of weights",
             f"{'kind':<14} {'sites':>5} {'MB':>9} {'share':>6}  example shape(s)        storage"]
    for kind in KINDS:
        if not sites[kind]:
            continue
        shapes = " ".join("x".join(map(str, shape)) for shape in sites[kind][0].shapes[:2])
        lines.append(f"{kind:<14} {len(sites[kind]):>5} {totals[kind] / 1e6:>9.2f} {totals[kind] / total:>6.1%}  "
                     f"{shapes:<23} {'; '.join(storage[kind])}")
    return "\n".join(lines)
