"""Healing (DESIGN.md 2.5): distil the compressed model against the dense one (logit KL), updating
only the stored values of the compressed modules (attention: ``U1``, ``U2``, core blocks; MLP and a
factored token table or lm_head: both factors of every weight, or its TT cores and sparse values) with the
sparsity structure (kept rows, ranks) fixed. Adam, cosine-decayed learning rate, the gradient of ``batch``
sequences per step, sequences in a shuffled order fixed by the seed: the same inputs give the same healed model.
A few calibration sequences are held out of training; when the KL on them ends higher than it started, the
starting values are restored (``kept: false`` in the record).
"""

from __future__ import annotations

import time

import numpy as np

from .config import DEFAULT_HEAL_BATCH, DEFAULT_HEAL_LR
from .errors import InvalidConfigError

HEAL_SEQ_LEN = 256  # shorter sequences: more steps of fresh data per minute on a CPU
HELD_OUT_SEQUENCES = 4  # never trained on: the keep-or-restore check reads them (when there are enough sequences)


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


def logit_kl(student_logits, teacher_logits):
    """KL(teacher || student) of the next-token distributions, per token (logits ``[..., V]``)."""
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


def healing_split(sequences: np.ndarray, seed: int = 0):
    """``(train [m, T'], held [h, T'], held_out)``: ``sequences [n, T]`` cut into :data:`HEAL_SEQ_LEN`-token pieces in
    an order shuffled by ``seed``; the last :data:`HELD_OUT_SEQUENCES` pieces are held out of training when there
    are at least four times as many (``held_out``), else the check reads the first two training pieces."""
    import torch

    width = sequences.shape[1]
    pieces = sequences[:, :width // HEAL_SEQ_LEN * HEAL_SEQ_LEN] if width >= HEAL_SEQ_LEN else sequences
    pieces = torch.from_numpy(np.ascontiguousarray(pieces).reshape(-1, min(HEAL_SEQ_LEN, width)))
    pieces = pieces[torch.randperm(len(pieces), generator=torch.Generator().manual_seed(seed))]
    if len(pieces) >= 4 * HELD_OUT_SEQUENCES:
        return pieces[:-HELD_OUT_SEQUENCES], pieces[-HELD_OUT_SEQUENCES:], True
    return pieces, pieces[:2], False


def mean_kl(model, teacher, sequences) -> float:
    """The mean :func:`logit_kl` of ``model`` against ``teacher`` over ``sequences [n, T]``, one at a time."""
    import torch

    with torch.no_grad():
        return float(np.mean([logit_kl(model(s[None], use_cache=False).logits,
                                       teacher(s[None], use_cache=False).logits).item() for s in sequences]))


def accumulate_kl_gradient(model, teacher, train, first: int, count: int) -> float:
    """Add to the gradients the mean :func:`logit_kl` gradient of ``count`` training sequences from index ``first``
    (cycling through ``train [m, T]``), one at a time; returns that mean KL."""
    import torch

    total = 0.0
    for index in range(first, first + count):
        sequence = train[index % len(train)][None]  # [1, T]
        with torch.no_grad():
            target = teacher(sequence, use_cache=False).logits
        loss = logit_kl(model(sequence, use_cache=False).logits, target) / count
        loss.backward()
        total += loss.item()
    return total


def heal(model, teacher, sequences: np.ndarray, steps: int, *, learning_rate: float = DEFAULT_HEAL_LR,
         batch: int = DEFAULT_HEAL_BATCH, device: str = "auto", progress: bool = True, seed: int = 0) -> dict:
    """Distil ``model`` towards ``teacher`` on ``sequences [n, T]`` for ``steps`` Adam steps (peak ``learning_rate``,
    each step the mean gradient of ``batch`` sequences of :data:`HEAL_SEQ_LEN` tokens, cycling through a shuffled
    order) on ``device`` (:func:`healing_device`; both models are back on the CPU afterwards). Returns the healing
    record."""
    import torch
    from tqdm.auto import tqdm

    device = healing_device(device)
    started = time.perf_counter()
    train, held, held_out = healing_split(sequences, seed)
    train, held = train.to(device), held.to(device)
    model.to(device)
    teacher.to(device)

    params = stored_parameters(model)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)

    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(params, lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    start = [p.detach().clone() for p in params]
    try:
        before = mean_kl(model, teacher, held)
        with tqdm(range(steps), desc="healing (KL to the dense model)", unit="step", disable=not progress) as bar:
            for step in bar:
                optimizer.zero_grad(set_to_none=True)
                total = accumulate_kl_gradient(model, teacher, train, step * batch, batch)
                optimizer.step()
                schedule.step()
                bar.set_postfix(kl=f"{total:.4f}")
        after = mean_kl(model, teacher, held)
        kept = after < before
        if not kept:  # healing overshot: keep the values it started from
            with torch.no_grad():
                for param, value in zip(params, start):
                    param.copy_(value)
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.eval()
        model.to("cpu")
        teacher.to("cpu")
    measured_on = f"{len(held)} held-out calibration sequences" if held_out else "the first two healing sequences"
    return {"tokens": int(train.numel()), "steps": steps, "batch": batch,
            "seconds": round(time.perf_counter() - started, 1), "loss_before": before, "loss_after": after,
            "kept": kept, "loss": f"KL(dense || compressed) per token on {measured_on}",
            "learning_rate": learning_rate, "device": device, "seq_len": int(train.shape[1]),
            "passes": round(steps * batch / len(train), 2)}
