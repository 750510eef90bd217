"""Does the implicit PRM [159] find first wrong steps when it is trained offline, on many outcome-labelled
responses of one fixed policy, as the implicit-PRM paper trains it? The online PRIME runs see a drifting policy
and each batch once; this trains φ (a copy of the warm start) on a fixed set of the warm start's own responses
on train problems for several epochs, with the same cross-entropy (`implicit_ce_loss`), and reports after each
epoch the outcome accuracy of ``sign(β·Σ_t log πφ/πref)`` and the step AUROC on held-out responses (the
protocol of `implicit_prm_auroc.py`).

    python benchmarks/implicit_prm_offline.py recipes/grpo_stepsum.yaml --model runs/sft_stepsum \
        --beta 0.5 --lr 1e-3 --epochs 6 --out docs/rewards/offline_beta0.5.json
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch

from implicit_prm_auroc import aurocs, sample, step_table
from outrider.data import pack
from outrider.policy.model import Policy
from outrider.recipe import load_recipe
from outrider.score.implicit_prm import implicit_ce_loss
from outrider.trainer import build_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--model", type=Path, required=True, help="the warm start (a saved model directory)")
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--train-prompts", type=int, default=256)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    recipe = load_recipe(args.recipe)
    task = build_task(recipe)
    ref = Policy.load(args.model).eval()
    phi = copy.deepcopy(ref)
    train = sample(ref, task, recipe, "train", args.train_prompts, args.samples, args.seed)
    held = sample(ref, task, recipe, "eval", args.eval_prompts, args.samples, args.seed + 1)
    batch = pack(train, ref.pad_id, ref.bos_id)
    labels = torch.tensor([float(e.success) for e in train])
    with torch.no_grad():
        lp_ref = ref.score(batch.input_ids, batch.attention_mask).logprobs
    opt = torch.optim.Adam(phi.parameters(), lr=args.lr)
    rng = np.random.default_rng(args.seed)
    curve = []
    for epoch in range(args.epochs + 1):
        d = step_table(held, phi, ref, args.beta, task, "eval")
        a_prm, a_nll = aurocs(d)
        with torch.no_grad():
            hb = pack(held, ref.pad_id, ref.bos_id)
            q = (phi.score(hb.input_ids, hb.attention_mask).logprobs
                 - ref.score(hb.input_ids, hb.attention_mask).logprobs) * hb.action_mask
            outcome_acc = float(((q.sum(-1) > 0).float() == torch.tensor([float(e.success) for e in held])).float()
                                .mean())
        curve.append({"epoch": epoch, "auroc_prm": a_prm, "auroc_nll": a_nll, "held_out_outcome_acc": outcome_acc})
        print(json.dumps(curve[-1]), flush=True)
        if epoch == args.epochs:
            break
        for rows in np.array_split(rng.permutation(len(train)), max(1, len(train) // args.batch)):
            idx = torch.as_tensor(rows)
            sub = batch.select(idx)
            lp_phi = phi.score(sub.input_ids, sub.attention_mask).logprobs
            loss = implicit_ce_loss(lp_phi, lp_ref[idx], sub.action_mask, labels[idx], args.beta)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(phi.parameters(), 1.0)
            opt.step()
    summary = {"beta": args.beta, "lr": args.lr, "train_responses": len(train),
               "train_accuracy": float(labels.mean()), "curve": curve}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
