"""Preference pairs (and labelled responses) for a Bradley–Terry reward model from a warm start's own samples,
labelled by the task's verifier: `--samples` responses to each of the first `--prompts` train problems; for each
problem with both right and wrong responses, up to `--pairs-per-prompt` (right, wrong) pairs of distinct texts.
With `--oracle` a preference oracle labels the pairs instead (`score.preference.oracle_pairs`: every two distinct
texts of a problem compared once, ties left out), e.g. the intransitive cyclic one:

    python benchmarks/rm_pairs.py recipes/dno_cyclic_multisol.yaml --model runs/sft_multisol --prompts 256 \
        --oracle cyclic --pairs-per-prompt 8 --out runs/rm_data/cyclic_pairs.jsonl

    python benchmarks/rm_pairs.py recipes/grpo_stepsum.yaml --model runs/sft_stepsum --prompts 2048 --samples 8 \
        --out runs/rm_data/pairs.jsonl --labels runs/rm_data/labels.jsonl

With `--flip ε` each pair's label is flipped (chosen and rejected swapped) with probability ε, a noisy pairwise
annotator (the same sampled pairs as without it; docs/rewards.md, P3O vs a BT RM under noisy labels):

    python benchmarks/rm_pairs.py recipes/grpo_stepsum.yaml --model runs/sft_stepsum --prompts 2048 --samples 8 \
        --flip 0.2 --out runs/rm_data/pairs2k_flip20.jsonl

With `--steps` every response is also written with the task's step checker's verdicts (`{prompt, response,
step_labels}`, one label per step cut at `,`: a step PRM's data, `outrider rm train`); `--split eval` samples the
held-out problems instead (a held-out step file for `benchmarks/step_prm_auroc.py`):

    python benchmarks/rm_pairs.py recipes/prm_sum_stepsum.yaml --model runs/sft_long_stepsum --prompts 1024 \
        --out runs/rm_data/long_pairs.jsonl --steps runs/rm_data/long_steps.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from implicit_prm_auroc import sample  # noqa: E402
from outrider.policy.model import Policy  # noqa: E402
from outrider.recipe import load_recipe  # noqa: E402
from outrider.score.preference import PREFERENCES, oracle_pairs  # noqa: E402
from outrider.trainer import build_task  # noqa: E402


def flip_pairs(pairs: list[dict], p: float, seed: int) -> tuple[list[dict], int]:
    """A noisy annotator: each pair's chosen and rejected swapped with probability ``p``; the pairs and how many
    were flipped. The coins are their own stream, so the pairs sampled do not depend on ``p``."""
    rng = random.Random(f"flip:{seed}")
    coins = [rng.random() < p for _ in pairs]
    out = [{**x, "chosen": x["rejected"], "rejected": x["chosen"]} if c else x for x, c in zip(pairs, coins)]
    return out, sum(coins)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--model", type=Path, required=True, help="the warm start (a saved model directory)")
    ap.add_argument("--prompts", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--pairs-per-prompt", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--labels", type=Path, help="also write every response as {prompt, response, label}")
    ap.add_argument("--steps", type=Path, help="also write every response as {prompt, response, step_labels} "
                                               "(the task's check_steps verdicts)")
    ap.add_argument("--split", choices=["train", "eval"], default="train", help="the problems sampled")
    ap.add_argument("--oracle", help="label pairs with this preference oracle (a name or a YAML mapping, e.g. "
                                     "'{name: cyclic, correct_first: false}') instead of the verifier")
    ap.add_argument("--flip", type=float, default=0.0, help="probability that a pair's label is flipped (a noisy "
                                                                "annotator), drawn with --seed")
    args = ap.parse_args()
    if not 0.0 <= args.flip <= 1.0:
        ap.error(f"--flip: a probability in [0, 1], got {args.flip}")
    torch.manual_seed(args.seed)
    recipe = load_recipe(args.recipe)
    task = build_task(recipe)
    policy = Policy.load(args.model).eval()
    t0 = time.perf_counter()
    episodes = sample(policy, task, recipe, args.split, args.prompts, args.samples, args.seed)
    rng = random.Random(args.seed)
    groups: dict[int, list] = {}
    for e in episodes:
        groups.setdefault(e.group_id, []).append(e)
    pairs, labels = [], []
    oracle = None
    if args.oracle:
        spec = yaml.safe_load(args.oracle)
        oracle = PREFERENCES.create(spec if isinstance(spec, dict) else {"name": spec}, None, "--oracle")
    np_rng = np.random.default_rng(args.seed)
    for eps in groups.values():
        prompt = eps[0].turns[0].observation
        labels += [{"prompt": prompt, "response": e.response, "label": float(e.success)} for e in eps]
        if oracle is not None:
            texts = [e.response for e in eps]
            pairs += [{"prompt": prompt, "chosen": texts[i], "rejected": texts[j]}
                      for i, j in oracle_pairs(oracle(eps), texts, np_rng, args.pairs_per_prompt)]
            continue
        right = sorted({e.response for e in eps if e.success})
        wrong = sorted({e.response for e in eps if not e.success})
        combos = [(r, w) for r in right for w in wrong]
        for r, w in rng.sample(combos, min(args.pairs_per_prompt, len(combos))):
            pairs.append({"prompt": prompt, "chosen": r, "rejected": w})
    pairs, flipped = flip_pairs(pairs, args.flip, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    if args.labels:
        args.labels.write_text("".join(json.dumps(x) + "\n" for x in labels))
    if args.steps:
        args.steps.write_text("".join(json.dumps({"prompt": e.turns[0].observation, "response": e.response,
                                                  "step_labels": [float(ok) for ok in task.check_steps(
                                                      task.problem(args.split, e.seed), e.response).correct]}) + "\n"
                                      for e in episodes))
    acc = sum(e.success for e in episodes) / len(episodes)
    print(json.dumps({"responses": len(episodes), "accuracy": acc, "pairs": len(pairs),
                      "prompts_with_pairs": len({p["prompt"] for p in pairs}), "flipped": flipped,
                      "sample_s": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
