"""Open an ONNX input: resolve the model file and its config, check its external data, refuse a model
lestd-export already compressed, locate the attention sites and read their dense weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import COMPRESSION_KEY
from ..errors import CheckpointError
from ..files import check_onnx, read_json
from ..onnx_sites import AttentionSite, DecoderIO

GENAI_CONFIG = "genai_config.json"
HF_CONFIG = "config.json"


class OnnxInputError(CheckpointError):
    """The ONNX input path, its directory or its config cannot be used."""


@dataclass
class OnnxInput:
    """A decoder ONNX model read for compression: graph (with weights), config, sites, tokenizer."""

    directory: Path
    model_file: Path
    config: dict
    config_file: Path
    genai: bool
    model: object  # onnx.ModelProto, weights loaded
    io: DecoderIO
    shape: object  # registry.AttentionShape
    producer: str
    sites: list[AttentionSite]
    external_files: set[str]  # external data files of the input graph (relative to its directory)
    output_energies: list[float] | None = None  # per layer ||W_O||^2 (read with the weights)

    @property
    def model_type(self) -> str | None:
        return config_model_type(self.config, self.genai)

    @property
    def max_positions(self) -> int | None:
        from ..onnx_sites import config_head_counts

        return config_head_counts(self.config, self.genai)["max_positions"]

    @property
    def genai_decoder(self) -> dict | None:
        return self.config["model"]["decoder"] if self.genai else None

    def input_bytes(self) -> int:
        return sum((self.directory / name).stat().st_size for name in {self.model_file.name, *self.external_files}
                   if (self.directory / name).is_file())


def config_model_type(config: dict, genai: bool) -> str | None:
    """The architecture a genai_config.json (``model.type``) or a config.json (``model_type``) names."""
    return config.get("model", {}).get("type") if genai else config.get("model_type")


def is_onnx_input(path: str | Path) -> bool:
    """Whether ``path`` names an ``.onnx`` file or a directory holding an ONNX model (the CLI shorthand)."""
    path = Path(path)
    if path.suffix == ".onnx":
        return True
    return path.is_dir() and ((path / GENAI_CONFIG).is_file() or any(path.glob("*.onnx")))


def resolve_input(path: str | Path) -> tuple[Path, Path]:
    """``(directory, model file)`` for an ``.onnx`` file or a directory holding one (the file that
    genai_config.json names, else ``model.onnx``, else its only ``.onnx`` file)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise OnnxInputError(f"{path} does not exist: give a decoder .onnx file or the directory holding it")
    if path.is_file():
        if path.suffix != ".onnx":
            raise OnnxInputError(f"{path} is not an .onnx file: give a decoder .onnx file or its directory")
        return path.parent, path
    candidates = []
    if (path / GENAI_CONFIG).is_file():
        filename = read_json(path / GENAI_CONFIG, "re-create it with the onnxruntime-genai builder").get(
            "model", {}).get("decoder", {}).get("filename")
        if isinstance(filename, str):
            candidates.append(path / filename)
    candidates.append(path / "model.onnx")
    for candidate in candidates:
        if candidate.is_file():
            return path, candidate
    found = sorted(path.glob("*.onnx"))
    if len(found) == 1:
        return path, found[0]
    if not found:
        raise OnnxInputError(f"{path} holds no .onnx model: give a directory with model.onnx (an onnxruntime-genai "
                             "build or an optimum export); a Hugging Face model goes to `lestd-export compress`")
    raise OnnxInputError(f"{path} holds several .onnx files ({', '.join(f.name for f in found[:4])}): "
                         "give the decoder's file itself")


def read_config(directory: Path) -> tuple[dict, Path, bool]:
    """``(config, its file, is genai_config.json)``; the genai config wins when both exist."""
    for name, genai in ((GENAI_CONFIG, True), (HF_CONFIG, False)):
        file = directory / name
        if file.is_file():
            config = read_json(file, "restore it from the model's original files")
            if genai and not isinstance(config.get("model", {}).get("decoder"), dict):
                raise OnnxInputError(f"{file} has no model.decoder section: it is not an onnxruntime-genai config")
            return config, file, genai
    raise OnnxInputError(f"{directory} has neither {GENAI_CONFIG} nor {HF_CONFIG}: the head counts and the runtime "
                         "need them; put the model's config next to its .onnx file")


def _external_files(model) -> set[str]:
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    files = set()
    for init in model.graph.initializer:
        if uses_external_data(init):
            files.add(ExternalDataInfo(init).location)
    return files


def open_onnx_input(path: str | Path, attention: bool = True) -> OnnxInput:
    """Read, locate and check an ONNX decoder (typed errors; nothing is written). ``attention``: locate the attention
    sites (what compression needs; quantising does not, so an architecture whose attention is not mapped in ONNX,
    e.g. GPT-2's fused Conv1D, still quantises)."""
    import onnx

    from ..onnx_sites import decoder_io, head_counts, locate
    from ..registry import REGISTRY

    directory, model_file = resolve_input(path)
    fix = "re-create it (onnxruntime-genai builder, or lestd-export export --dense)"
    check_onnx(model_file, fix)
    config, config_file, genai = read_config(directory)
    header = onnx.load(str(model_file), load_external_data=False)
    external = _external_files(header)
    missing = [name for name in sorted(external) if not (directory / name).is_file()]
    if missing:
        raise OnnxInputError(f"{model_file} keeps its weights in {missing[0]}, which is not in {directory}")
    _refuse_compressed(header, config, model_file)
    io = decoder_io(header, config["model"]["decoder"] if genai else None)
    shape = head_counts(config, genai, header, io, str(config_file))
    spec = REGISTRY.get(config_model_type(config, genai))
    producer, sites = (locate(header, io, shape, spec) if attention  # before reading gigabytes of weights
                       else ("onnxruntime-genai" if genai else "onnx", []))
    del header
    try:
        model = onnx.load(str(model_file))
    except Exception as error:  # noqa: BLE001 -- truncated external data: onnx raises several types
        raise OnnxInputError(f"cannot read the weights of {model_file} ({str(error).splitlines()[0][:200]}): "
                             f"{fix}") from None
    return OnnxInput(directory, model_file, config, config_file, genai, model, io, shape, producer, sites, external)


def graph_input(model, directory: Path, model_file: str = "model.onnx") -> OnnxInput:
    """An in-memory decoder graph (compressed or not) with the config in ``directory``, to run through ONNX
    Runtime (calibration capture, checks); it has no attention sites."""
    from ..onnx_sites import decoder_io, head_counts

    config, config_file, genai = read_config(directory)
    io = decoder_io(model, config["model"]["decoder"] if genai else None)
    shape = head_counts(config, genai, model, io, str(config_file))
    return OnnxInput(directory, directory / model_file, config, config_file, genai, model, io, shape, "in memory",
                     [], set())


def _refuse_compressed(model, config: dict, model_file: Path) -> None:
    """A model that lestd-export already compressed (its export or its graft) is not compressed twice."""
    grafted = any("/lestd/" in node.name for node in model.graph.node)
    if grafted or COMPRESSION_KEY in config:
        raise OnnxInputError(f"{model_file} is already compressed by lestd-export: compress the dense model "
                             "(the onnxruntime-genai builder's -p fp32 output, or lestd-export export --dense)")


def read_weights(source: OnnxInput) -> list:
    """Per layer, :class:`~lestd_export.surgery.AttentionWeights` (float64, ``y = x W``; biases stay in the graph)."""
    from ..onnx_sites import read_site_weights
    from ..surgery import AttentionWeights

    return [AttentionWeights(read_site_weights(source.model, site, source.shape, str(source.directory)),
                             dict.fromkeys(("q", "k", "v", "o")))
            for site in source.sites]
