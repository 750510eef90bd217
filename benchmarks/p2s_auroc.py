"""How well P2S's path-faithfulness reward [39] finds the first wrong step on stepsum: the AUROC of −PFR_k.

A model directory (the warm start, or a run's checkpoint) samples `--samples` responses to each of the first
`--prompts` held-out problems at the recipe's sampling settings; the `p2s` piece (the recipe's options, `combine:
step`) scores each response's intermediate steps under that same model, with the eval problem's short trace as the
gold CoT. The step checker (`check_steps`) labels the scored steps: the first wrong one is positive, the steps
before it (all scored steps of a right response) negative, later ones left out. AUROC = P(PFR of a first wrong step
< PFR of a right step) (ties ½); also the mean PFR of right, first-wrong and after-wrong steps, and the scoring time.

    python benchmarks/p2s_auroc.py recipes/p2s_stepsum.yaml --model runs/sft_stepsum --out docs/rewards/p2s_auroc.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from outrider.data import Start
from outrider.envs.stepsum import check_steps, trace
from outrider.explore.rollout import rollout
from outrider.policy.model import Policy
from outrider.recipe import load_recipe
from outrider.registry import BuildContext
from outrider.score import SCORE
from outrider.score.p2s import boundaries
from outrider.trainer import build_task, sampling_params


def auroc(positive: list[float], negative: list[float]) -> float:
    """P(a positive scores above a negative), ties ½."""
    if not positive or not negative:
        return float("nan")
    p, n = np.asarray(positive)[:, None], np.asarray(negative)[None, :]
    return float(((p > n).sum() + 0.5 * (p == n).sum()) / (p.size * n.size))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", help="PFR variant instead of the recipe's (mean_p, geo_p, p, ...)")
    ap.add_argument("--set", action="append", default=[], help="recipe override KEY.PATH=VALUE (repeatable)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    recipe = load_recipe(args.recipe, args.set)
    task = build_task(recipe)
    policy = Policy.load(args.model).eval()
    options = next(s for s in recipe.score if s["name"] == "p2s")
    options = {**{k: v for k, v in options.items() if k != "weight"}, "combine": "step"}
    entry, cfg = SCORE.build({**options, **({"variant": args.variant} if args.variant else {})}, "score")
    piece = entry.create(cfg, BuildContext(task=task, policy=policy, where="score"))
    terms = {p: task.problem("eval", p)["metadata"]["terms"] for p in range(args.prompts)}
    piece.gold_of = lambda e: trace(terms[e.seed], "short")
    starts = [Start(seed=p, group_id=p) for p in range(args.prompts) for _ in range(args.samples)]
    with torch.no_grad():
        episodes = rollout(policy, lambda: task.make_env("eval"), starts, sampling_params(recipe),
                           torch.Generator().manual_seed(args.seed), 1)
    t0 = time.perf_counter()
    dense = piece(episodes)
    seconds = time.perf_counter() - t0
    right, first_wrong, after = [], [], []
    for e, values in zip(episodes, dense):
        ids = e.turns[-1].action_ids
        ends = boundaries([policy.decode([i]) for i in ids], cfg.delimiter)[: len(terms[e.seed]) - 1]
        verdict = check_steps(terms[e.seed], e.turns[-1].action)
        for k, end in enumerate(ends):
            pfr = values[ends[k - 1] if k else 0]
            wrong = verdict.first_wrong
            (right if wrong is None or k < wrong else first_wrong if k == wrong else after).append(pfr)
    result = {"model": str(args.model), "variant": cfg.variant, "prompts": args.prompts, "samples": args.samples,
              "pass": float(np.mean([e.success for e in episodes])),
              "steps": {"right": len(right), "first_wrong": len(first_wrong), "after_wrong": len(after)},
              "pfr_mean": {"right": float(np.mean(right)) if right else None,
                           "first_wrong": float(np.mean(first_wrong)) if first_wrong else None,
                           "after_wrong": float(np.mean(after)) if after else None},
              "auroc_first_wrong": auroc([-v for v in first_wrong], [-v for v in right]),
              "score_seconds": seconds, "episodes": len(episodes), **piece.step_metrics()}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
