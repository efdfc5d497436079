"""Healing (DESIGN.md 2.5): distil the compressed model against the dense one (logit KL), updating
only the stored values of the compressed modules (attention: ``U1``, ``U2``, core blocks; MLP and a
factored token table or lm_head: both factors of every weight, or its TT cores and sparse values) with the
sparsity structure (kept rows, ranks) fixed. Adam, cosine-decayed learning rate, fixed data order and seed:
the same inputs give the same healed model. When the KL on the first two healing sequences ends
higher than it started, the starting values are restored (``kept: false`` in the record).
"""

from __future__ import annotations

import time

import numpy as np

from .config import DEFAULT_HEAL_LR
from .errors import InvalidConfigError

HEAL_SEQ_LEN = 256  # shorter sequences: more steps of fresh data per minute on a CPU


def stored_parameters(model) -> list:
    """The parameters of the compressed modules (factors and core blocks, not biases; a shared basis once)."""
    from .modules import CoreOutput, FactoredEmbedding, FactoredLinear, LatentAttention, LatentQKV, TTLinear

    found = {}
    for module in model.modules():
        if isinstance(module, (LatentAttention, LatentQKV, CoreOutput)):
            for name, param in module.named_parameters(recurse=False):
                if name != "bias" and param is not None:
                    found[id(param)] = param
        elif isinstance(module, FactoredLinear):
            for param in (module.basis.weight, module.expand.weight):
                found[id(param)] = param
        elif isinstance(module, TTLinear):
            for param in (module.first.weight, module.second.weight, module.sparse_values):
                found[id(param)] = param
        elif isinstance(module, FactoredEmbedding):
            for param in (module.table.weight, module.expand.weight):
                found[id(param)] = param
    return list(found.values())


def _kl(student_logits, teacher_logits):
    import torch.nn.functional as F

    vocab = student_logits.shape[-1]
    return F.kl_div(F.log_softmax(student_logits.reshape(-1, vocab).float(), -1),
                    F.log_softmax(teacher_logits.reshape(-1, vocab).float(), -1),
                    log_target=True, reduction="batchmean")


def healing_device(choice: str) -> str:
    """``cuda`` or ``cpu`` for a ``heal_device`` setting (``auto``: a CUDA GPU when torch sees one); refuses ``cuda``
    where there is none."""
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise InvalidConfigError("--heal-device cuda: torch sees no CUDA GPU here (a CPU-only torch, or no GPU): "
                                 "use --heal-device cpu or auto")
    return choice


def heal(model, teacher, sequences: np.ndarray, steps: int, *, learning_rate: float = DEFAULT_HEAL_LR,
         device: str = "auto", progress: bool = True, seed: int = 0) -> dict:
    """Distil ``model`` towards ``teacher`` on ``sequences [n, T]`` for ``steps`` Adam steps (peak ``learning_rate``,
    one sequence of :data:`HEAL_SEQ_LEN` tokens per step, cycling) on ``device`` (:func:`healing_device`; both
    models are back on the CPU afterwards). Returns the healing record."""
    import torch
    from tqdm.auto import tqdm

    device = healing_device(device)
    started = time.perf_counter()
    chunks = sequences[:, :sequences.shape[1] // HEAL_SEQ_LEN * HEAL_SEQ_LEN] if sequences.shape[1] >= HEAL_SEQ_LEN \
        else sequences
    chunks = torch.from_numpy(np.ascontiguousarray(chunks).reshape(-1, min(HEAL_SEQ_LEN, sequences.shape[1])))
    chunks = chunks.to(device)
    model.to(device)
    teacher.to(device)
    held = chunks[: min(2, len(chunks))]  # loss_before / loss_after are measured on these (training data)

    params = stored_parameters(model)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)

    def held_loss() -> float:
        with torch.no_grad():
            return float(np.mean([_kl(model(c[None], use_cache=False).logits,
                                      teacher(c[None], use_cache=False).logits).item() for c in held]))

    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(params, lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    was_training = model.training
    start = [p.detach().clone() for p in params]
    try:
        before = held_loss()
        with tqdm(range(steps), desc="healing (KL to the dense model)", unit="step", disable=not progress) as bar:
            for step in bar:
                batch = chunks[step % len(chunks)][None]
                with torch.no_grad():
                    target = teacher(batch, use_cache=False).logits
                loss = _kl(model(batch, use_cache=False).logits, target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.set_postfix(kl=f"{loss.item():.4f}")
        after = held_loss()
        kept = after < before
        if not kept:  # healing overshot (measured at 0.8 with these defaults): keep the values it started from
            with torch.no_grad():
                for param, value in zip(params, start):
                    param.copy_(value)
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.train(was_training)
        model.eval()
        model.to("cpu")
        teacher.to("cpu")
    return {"tokens": int(chunks.numel()), "steps": steps, "seconds": round(time.perf_counter() - started, 1),
            "loss_before": before, "loss_after": after, "kept": kept, "loss": "KL(dense || compressed) per token on the first two healing sequences",
            "learning_rate": learning_rate, "device": device, "seq_len": int(chunks.shape[1]),
            "passes": round(steps / len(chunks), 2)}
