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
    chunks = sequences[:, :sequences.shape[1] // HEAL_SEQ_LEN * HEAL_SEQ_LEN] if sequences.shape[1] >= HEAL_SEQ_LEN \
        else sequences
    chunks = torch.from_numpy(np.ascontiguousarray(chunks).reshape(-1, min(HEAL_SEQ_LEN, sequences.shape[1])))
    chunks = chunks[torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed))].to(device)
    held_out = len(chunks) >= 4 * HELD_OUT_SEQUENCES  # else the check reads the first two training sequences
    held, train = (chunks[-HELD_OUT_SEQUENCES:], chunks[:-HELD_OUT_SEQUENCES]) if held_out else (chunks[:2], chunks)
    model.to(device)
    teacher.to(device)

    params = stored_parameters(model)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)

    def held_loss() -> float:
        with torch.no_grad():
            return float(np.mean([logit_kl(model(c[None], use_cache=False).logits,
                                           teacher(c[None], use_cache=False).logits).item() for c in held]))

    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(params, lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    start = [p.detach().clone() for p in params]
    try:
        before = held_loss()
        with tqdm(range(steps), desc="healing (KL to the dense model)", unit="step", disable=not progress) as bar:
            for step in bar:
                optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for index in range(step * batch, (step + 1) * batch):
                    sequence = train[index % len(train)][None]  # [1, T]
                    with torch.no_grad():
                        target = teacher(sequence, use_cache=False).logits
                    loss = logit_kl(model(sequence, use_cache=False).logits, target) / batch
                    loss.backward()
                    total += loss.item()
                optimizer.step()
                schedule.step()
                bar.set_postfix(kl=f"{total:.4f}")
        after = held_loss()
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
            "learning_rate": learning_rate, "device": device, "seq_len": int(chunks.shape[1]),
            "passes": round(steps * batch / len(train), 2)}
