"""Typed, validated, JSON-serialisable compression settings."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

from .errors import InvalidConfigError

METHODS = ("lestd", "tensorllm", "svd")
GRANULARITIES = ("row", "element")
BUDGETS = ("layer", "global")
OBJECTIVES = ("balanced", "frobenius", "fisher")
DEFAULT_SIZE_FRACTION = 0.7
REFIT_TARGETS = ("layer", "model")
STORAGES = ("fp32", "int8", "int4")  # precision of the stored attention weights in the exported file
LAYOUTS = ("shared", "plain")
INDEX_COST = {"fp32": 1, "int8": 4, "int4": 8}  # stored values an int32 row index costs
STORAGE_BITS = {"int8": 8, "int4": 4}  # MatMulNBits bits of a quantised storage
# 2048 measured worse at 0.5: x2.57 / x2.75 against x2.38 / x2.67 (default text / prose, 4096 tokens each)
DEFAULT_CALIBRATION_TOKENS = 4096
MODULES = ("attention", "mlp", "embedding")  # which weights ``compress`` brings into the compressed domain
DEFAULT_MLP_FRACTION = 0.9  # the least destructive measured (README "Whole-model compression")
DEFAULT_EMBEDDING_FRACTION = 0.9
MLP_METHODS = ("svd", "tt", "saten")  # SVD-LLM factors with a shared input basis; TT-matrix; TT + sparse residual
DEFAULT_HEAL_TOKENS = 65536  # the whole default text (64,636 tokens)
DEFAULT_HEAL_STEPS = 100
DEFAULT_HEAL_BATCH = 4  # sequences per step: as good as 1 at equal sequences, a quarter of the steps (README)
DEFAULT_HEAL_LR = 2e-4
HEAL_DEVICES = ("auto", "cpu", "cuda")  # auto: a CUDA GPU when torch sees one, else the CPU


def default_input_whitening(dense_output: bool, layout: str) -> float:
    """Power of the input Gram in ``U1``'s metric (measured at 0.5 on the default model, README "Data-aware
    compression"):
    1 when ``U1`` serves only the Q/K/V inputs (dense output: their output error exactly); with a factored
    output ``U1`` is also the output heads' output side, where the input Gram misallocates the budget:
    0 in the shared layout, 0.5 in the plain layout, whose Q/K/V keep far fewer (shared) rows."""
    if dense_output:
        return 1.0
    return 0.5 if layout == "plain" else 0.0


@dataclass(frozen=True)
class CompressionConfig:
    """How to compress the attention of a model.

    ``size_fraction``: stored attention parameters (factors + core values + int32 indices) as a
    fraction of the dense attention weights; the planner picks ranks and kept core rows to meet it
    (default 0.7 when something is left to plan). ``ranks``: explicit ``(R1, R2)``, ``None`` inside
    meaning full rank (for ``svd``: one rank for every matrix in ``R1``). ``core_density``: fraction
    of core entries to keep (with no ranks: full ranks). Explicit settings override the planner; a
    size fraction given where nothing is left to plan is an error.

    ``calibration``: where activation statistics come from (``lestd_export.calibration``); anything
    but ``none`` makes Stage I/II minimise the layers' *output* error (whitening by the input Gram
    matrices, ``damping`` relative ridge), refits the kept values by least squares (``refit``) and,
    with ``heal``, distils the compressed model against the dense one for ``heal_steps`` steps of ``heal_batch``
    sequences on ``heal_tokens`` calibration tokens (Adam at ``heal_lr``, on ``heal_device``: a CUDA GPU where torch
    sees one with ``auto``). The library default is ``none`` (explicit data); the CLI
    calibrates ``lestd`` on ``default`` unless told otherwise.

    ``storage``: the precision the export stores the attention weights in (``int8``/``int4``:
    ONNX Runtime's MatMulNBits, what ``--quantize`` writes); the size fraction then counts in stored
    values of that precision (an int32 index costs 4 int8 or 8 int4 values). ``layout``: ``shared``
    reads ``U1`` once on both sides (fp32 optimum exports); ``plain`` makes every stored weight the
    right operand of a 2-D MatMul, so that quantisers take them all, at the cost of a second copy of
    the ``U1`` rows the output heads keep (graft.py); quantised storage and onnxruntime-genai
    models need it, and the planner counts it.

    ``dense_output``: the output projection stays dense and exact; Stage I/II, the refit and the
    budget cover Q/K/V only (the size fraction still counts all four projections). In the plain
    layout a factored output projection pays ``d`` more per kept row and one more MatMul per layer.
    ``input_whitening`` (``p``) whitens the shared basis's ``d`` mode by the input Gram to the power
    ``p``; the default depends on what ``U1`` serves (``default_input_whitening``).

    ``modules``: which weights are compressed: ``attention`` (``method`` as above) and/or ``mlp``: every
    MLP weight as SVD-LLM low-rank factors (whitened by its calibration input Gram when calibrated), the
    weights that read one input (SwiGLU gate and up, or a fused gate_up_proj) sharing one input basis as
    Q/K/V do; ``mlp_fraction`` is the MLP's stored parameters as a fraction of its dense ones (default
    0.9), shared out over its matrices (per layer, or over all layers with ``budget="global"``) by
    relative energy; ``mlp_method`` ``tt`` stores each MLP weight as a two-core TT-matrix (TT-LLM's FFN format) and
    ``saten`` adds Saten's unstructured sparse residual (a quarter of the entries, each value with its int32 index),
    both at ``mlp_fraction`` of every weight, in the Frobenius norm (a TT has no whitened form). ``embedding``: the
    token table ``E [V, d]`` as ``A [V, r] @ B [r, d]`` (a lookup reads a row of ``A`` times ``B``; a tied lm_head
    computes ``(h B^T) A^T`` from the same factors, stored once; an untied lm_head is factored on its own), SVD-LLM
    whitened by the lm_head's calibration input Gram;
    ``embedding_fraction`` is the stored fraction of the table (and of an untied head), default 0.9, the rank a
    multiple of 32 so that int4 blocks fit.

    ``objective``: the norm that Stage I and Stage II minimise (numerics/planner.py).
    ``balanced`` (the default for ``lestd``) weights each slice group (q, k, v, o of a layer) by
    ``1/sqrt(its energy)``, which is invariant to the Q/K and V/O rescalings that leave the model
    unchanged; ``fisher`` (needs calibration) weights each group by the measured mean squared loss
    gradient of its outputs, which puts every group and layer in loss units; ``frobenius`` is the
    papers' plain norm and the only one for ``tensorllm`` (kept paper-faithful as a baseline).
    ``svd`` has its own per-matrix relative objective: ``None``.
    """

    method: str = "lestd"
    size_fraction: float | None = None
    ranks: tuple[int | None, int | None] | None = None
    core_density: float | None = None
    granularity: str = "row"
    budget: str = "layer"
    hooi_tol: float = 1e-6
    hooi_max_iter: int = 10
    objective: str | None = None  # None: the method's default (lestd: balanced, tensorllm: frobenius)
    calibration: str = "none"  # "none" (data-free), "default", "wikitext2", "self" or a text file path
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS
    damping: float = 0.01  # ridge on the calibration Gram matrices, relative to their mean diagonal
    refit: bool = True  # with calibration: least-squares refit of the kept core values, layer by layer
    refit_target: str = "layer"  # "layer": the dense layer on the compressed model's inputs; "model": the dense model's outputs
    input_whitening: float | None = None  # power p of the input Gram in U1's metric (None: whitening_power)
    heal: bool = False  # with calibration: distil the compressed model against the dense one
    heal_tokens: int = DEFAULT_HEAL_TOKENS
    heal_steps: int = DEFAULT_HEAL_STEPS
    heal_batch: int = DEFAULT_HEAL_BATCH  # sequences of 256 tokens per step (their mean gradient)
    heal_lr: float = DEFAULT_HEAL_LR  # Adam's peak learning rate (cosine-decayed)
    heal_device: str = "auto"
    storage: str = "fp32"
    layout: str = "shared"
    dense_output: bool = False  # keep the output projection dense (exact); the budget goes to Q/K/V
    modules: tuple[str, ...] = ("attention",)
    mlp_fraction: float | None = None  # with "mlp" in modules: its stored fraction (None: DEFAULT_MLP_FRACTION)
    embedding_fraction: float | None = None  # with "embedding" in modules (None: DEFAULT_EMBEDDING_FRACTION)
    mlp_method: str = "svd"

    def __post_init__(self):
        def bad(message: str):
            raise InvalidConfigError(message)

        if self.method not in METHODS:
            bad(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.granularity not in GRANULARITIES:
            bad(f"unknown granularity {self.granularity!r}; choose one of {', '.join(GRANULARITIES)}")
        if self.budget not in BUDGETS:
            bad(f"unknown budget scope {self.budget!r}; choose one of {', '.join(BUDGETS)}")
        f = self.size_fraction
        if f is not None and not (isinstance(f, (int, float)) and math.isfinite(f) and 0 < f <= 1):
            bad(f"size fraction must lie in (0, 1], got {f!r}")
        d = self.core_density
        if d is not None and not (isinstance(d, (int, float)) and math.isfinite(d) and 0 < d <= 1):
            bad(f"core density must lie in (0, 1], got {d!r}")
        if self.ranks is not None:
            if len(self.ranks) != 2:
                bad(f"ranks must be two values R1,R2 (integers or 'full'), got {self.ranks!r}")
            for r in self.ranks:
                if r is not None and (not isinstance(r, int) or r < 1):
                    bad(f"ranks must be positive integers or 'full', got {self.ranks!r}")
        if self.method == "tensorllm" and self.core_density not in (None, 1.0):
            bad("tensorllm keeps the whole core: --core-density does not apply (use --method lestd)")
        if self.method == "tensorllm" and self.budget != "layer":
            bad("tensorllm fills every layer's budget with its own ranks: --budget global does not apply")
        if self.method == "svd" and (self.core_density is not None or self.granularity != "row"):
            bad("svd has no core: --core-density and --granularity do not apply")
        if self.objective is not None and self.objective not in OBJECTIVES:
            bad(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.method == "svd" and self.objective is not None:
            bad("svd balances its matrices by relative error already: the objective setting does not apply")
        if self.method == "tensorllm" and self.objective == "balanced":
            bad("tensorllm is the paper-faithful baseline (plain Frobenius objective): "
                "use --method lestd for the balanced objective")
        if self.objective == "fisher" and (self.method != "lestd" or self.calibration == "none"):
            bad("the fisher objective weighs groups by measured gradients: it needs --method lestd and calibration")
        if not isinstance(self.calibration, str) or not self.calibration.strip():
            bad("calibration must be none, default, wikitext2, self or a text file path")
        if not (isinstance(self.calibration_tokens, int) and self.calibration_tokens >= 128):
            bad(f"calibration tokens must be an integer >= 128, got {self.calibration_tokens!r}")
        if not (isinstance(self.damping, (int, float)) and math.isfinite(self.damping) and self.damping > 0):
            bad(f"damping must be a positive number, got {self.damping!r}")
        if self.refit_target not in REFIT_TARGETS:
            bad(f"unknown refit target {self.refit_target!r}; choose one of {', '.join(REFIT_TARGETS)}")
        if self.heal and self.calibration == "none":
            bad("--heal distils on calibration data: give a --calibration source")
        if not (isinstance(self.heal_tokens, int) and self.heal_tokens >= 128 and isinstance(self.heal_steps, int)
                and self.heal_steps >= 1):
            bad("heal tokens must be >= 128 and heal steps >= 1")
        if not (isinstance(self.heal_batch, int) and self.heal_batch >= 1):
            bad(f"--heal-batch must be a whole number of sequences >= 1, got {self.heal_batch!r}")
        if not (isinstance(self.heal_lr, (int, float)) and math.isfinite(self.heal_lr) and self.heal_lr > 0):
            bad(f"--heal-lr must be a positive number, got {self.heal_lr!r}")
        if self.heal_device not in HEAL_DEVICES:
            bad(f"unknown healing device {self.heal_device!r}; choose one of {', '.join(HEAL_DEVICES)}")
        if self.storage not in STORAGES:
            bad(f"unknown storage precision {self.storage!r}; choose one of {', '.join(STORAGES)}")
        if self.layout not in LAYOUTS:
            bad(f"unknown layout {self.layout!r}; choose one of {', '.join(LAYOUTS)}")
        if self.storage != "fp32" and self.layout == "shared":  # quantisers only take plain 2-D MatMul weights
            object.__setattr__(self, "layout", "plain")
        if self.input_whitening is not None and not (isinstance(self.input_whitening, (int, float))
                                                     and 0 <= self.input_whitening <= 1):
            bad(f"input whitening must lie in [0, 1], got {self.input_whitening!r}")
        if self.dense_output and self.method == "svd":
            bad("svd compresses every matrix on its own: --dense-output does not apply")
        if self.layout == "plain" and self.granularity == "element":
            bad("element pruning is not exported in the plain (quantisable, onnxruntime-genai) layout: "
                "use --granularity row")
        if self.objective is None and self.method != "svd":
            object.__setattr__(self, "objective", "balanced" if self.method == "lestd" else "frobenius")
        modules = (self.modules,) if isinstance(self.modules, str) else tuple(self.modules)
        if not modules or any(m not in MODULES for m in modules) or len(set(modules)) != len(modules):
            bad(f"modules must be a non-empty choice of {', '.join(MODULES)}, got {self.modules!r}")
        object.__setattr__(self, "modules", tuple(m for m in MODULES if m in modules))
        for module, field, default in (("mlp", "mlp_fraction", DEFAULT_MLP_FRACTION),
                                       ("embedding", "embedding_fraction", DEFAULT_EMBEDDING_FRACTION)):
            m, flag = getattr(self, field), "--" + field.replace("_", "-")
            if module not in self.modules:
                if m is not None:
                    bad(f"{flag} sizes the compressed {module}: add {module} to --modules")
            elif m is None:
                object.__setattr__(self, field, default)
            elif not (isinstance(m, (int, float)) and math.isfinite(m) and 0 < m <= 1):
                bad(f"{flag} must lie in (0, 1], got {m!r}")
        if self.mlp_method not in MLP_METHODS:
            bad(f"unknown MLP method {self.mlp_method!r}; choose one of {', '.join(MLP_METHODS)}")
        if self.mlp_method != "svd" and "mlp" not in self.modules:
            bad("--mlp-method chooses how the MLP is compressed: add mlp to --modules")
        if "attention" not in self.modules and self.size_fraction is not None:
            bad("--size-fraction sizes the compressed attention: add attention to --modules or give --mlp-fraction")
        if self.needs_size_fraction and "attention" in self.modules:
            if self.size_fraction is None:
                object.__setattr__(self, "size_fraction", DEFAULT_SIZE_FRACTION)
        elif self.size_fraction is not None:
            bad("--size-fraction conflicts with the explicit ranks/density given: drop one of them")
        if self.hooi_max_iter < 0 or not (self.hooi_tol > 0):
            bad("hooi_max_iter must be >= 0 and hooi_tol > 0")

    @property
    def index_cost(self) -> int:
        """Stored values one int32 row index costs at this storage precision."""
        return INDEX_COST[self.storage]

    @property
    def whitening_power(self) -> float:
        """``input_whitening`` as given, else :func:`default_input_whitening` of the (final) layout; ``svd``:
        0 (SVD-LLM whitens on its own). Resolved on use, so ``dataclasses.replace`` of the layout follows."""
        if self.input_whitening is not None:
            return float(self.input_whitening)
        return 0.0 if self.method == "svd" else default_input_whitening(self.dense_output, self.layout)

    @property
    def bits(self) -> int | None:
        """MatMulNBits bits of the storage (None: fp32)."""
        return STORAGE_BITS.get(self.storage)

    @property
    def needs_size_fraction(self) -> bool:
        """Whether the planner has anything left to choose from a size budget."""
        if self.method == "lestd":
            return self.core_density is None
        return self.ranks is None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["ranks"] = None if self.ranks is None else ["full" if r is None else r for r in self.ranks]
        data["modules"] = list(self.modules)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> CompressionConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InvalidConfigError(f"unknown compression settings: {', '.join(sorted(unknown))}")
        data = dict(data)
        if data.get("ranks") is not None:
            data["ranks"] = parse_ranks(data["ranks"])
        if "modules" in data:
            data["modules"] = tuple(data["modules"])
        return cls(**data)


def parse_ranks(value) -> tuple[int | None, int | None]:
    """``"R1,R2"``, ``"full,48"``, ``"full"`` or a sequence of those -> ``(R1, R2)`` with None = full."""
    items = value.split(",") if isinstance(value, str) else list(value)
    if len(items) == 1:
        items = items * 2
    if len(items) != 2:
        raise InvalidConfigError(f"ranks must be 'R1,R2' (integers or 'full'), got {value!r}")
    parsed = []
    for item in items:
        text = str(item).strip().lower()
        if text == "full":
            parsed.append(None)
            continue
        try:
            parsed.append(int(text))
        except ValueError:
            raise InvalidConfigError(f"ranks must be integers or 'full', got {item!r}") from None
    return parsed[0], parsed[1]


def parse_choices(value: str | Sequence[str], allowed: Sequence[str], what: str) -> list[str]:
    """``"a,b"`` or a sequence -> a list of known, unique values (order kept)."""
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    items = [v for v in items if v]
    if not items:
        raise InvalidConfigError(f"no {what} given; choose from {', '.join(allowed)}")
    unknown = [v for v in items if v not in allowed]
    if unknown:
        raise InvalidConfigError(f"unknown {what} {', '.join(map(repr, unknown))}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))
