"""Healing recipes on a compressed checkpoint: KL to the dense model on held-out text as healing proceeds.

Distils the checkpoint's stored values (``healing.stored_parameters``: every factor) against the dense model with
Adam (peak --lr, cosine over --steps), each step the mean gradient of --batch calibration sequences of 256 tokens
in a shuffled order (the default Python docstrings, the last four sequences held out), and records, at every
quarter of the run, the KL(dense || compressed) per token on 1,024 tokens each of two held-out texts (legal:
GPL-3; narrative: Debian's project history) and on the four held-out calibration sequences. One recipe per run;
results merge into --out keyed by recipe.

    lestd-export compress --modules mlp --mlp-fraction 0.9 -o artifacts/int4-genai/checkpoint-0.9-mlp
    python benchmarks/heal_recipes.py artifacts/int4-genai/checkpoint-0.9-mlp --lr 1e-4 --batch 4 --steps 20
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from int4_rounding import TEXTS
from lestd_export.calibration import load_calibration
from lestd_export.healing import accumulate_kl_gradient, healing_split, mean_kl, stored_parameters
from lestd_export.loading import load_model
from lestd_export.text import tokenize

from int4_genai import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a compressed checkpoint (lestd-export compress -o DIR)")
    parser.add_argument("--model", default=None, help="the dense model it was compressed from (default: the default "
                        "model)")
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/heal_recipes.json"))
    args = parser.parse_args()

    student = load_model(str(args.checkpoint))
    teacher = load_model(args.model)
    model, dense = student.model.eval(), teacher.model.eval()
    sequences = load_calibration("default", dense, teacher.tokenizer, 65536).sequences
    train, calibration_held, _ = healing_split(sequences)  # what `heal` trains on and checks on
    held = {name: torch.tensor(tokenize(teacher.tokenizer, TEXTS[name](), max_tokens=1024)[:1024]).reshape(4, 256)
            for name in ("narrative", "legal")}
    held["calibration"] = calibration_held

    params = stored_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    curve = [{"step": 0, **{name: mean_kl(model, dense, batch) for name, batch in held.items()}}]
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        optimizer.zero_grad()
        accumulate_kl_gradient(model, dense, train, (step - 1) * args.batch, args.batch)
        optimizer.step()
        schedule.step()
        if step % max(1, args.steps // 4) == 0:
            curve.append({"step": step, **{name: mean_kl(model, dense, batch) for name, batch in held.items()},
                          "seconds": round(time.perf_counter() - started)})
            print(curve[-1], flush=True)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"machine": machine(), "recipes": {}}
    results["recipes"][f"lr{args.lr:g}-batch{args.batch}-steps{args.steps}"] = {
        "checkpoint": str(args.checkpoint), "lr": args.lr, "batch": args.batch, "steps": args.steps,
        "kl": "KL(dense || compressed) per token", "curve": curve}
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
