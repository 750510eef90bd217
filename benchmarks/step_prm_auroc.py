"""A step PRM's first-wrong-step AUROC on a held-out step-labels file (`benchmarks/rm_pairs.py --split eval
--steps FILE`), the protocol of `implicit_prm_auroc.py`: per response, the first step the checker marks wrong is a
positive, the right steps before it negatives, later steps left out; AUROC = P(a first wrong step has a lower
p = σ(z) than a right step before it). The interval is a 95% percentile bootstrap over responses (2000 draws).
With `--sampler DIR` the same AUROC of a score that needs no training: the step's surprise under that model (the
warm start that sampled the file), Σ −log π over the step's tokens.

    python benchmarks/step_prm_auroc.py runs/prm_long --data runs/rm_data/long_steps_test.jsonl \\
        --out docs/rewards/step_prm_auroc.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from outrider.score.reward_model import RewardModel, read_examples
from outrider.score.step_rm import auroc, encode_rows, evaluate_steps, first_wrong_split, step_logits


@torch.no_grad()
def per_response(rm: RewardModel, rows: list, delimiter: str) -> list[tuple[list[float], list[float]]]:
    """(positives, negatives) of each response, scored by −z (a high score flags a wrong step)."""
    rm.policy.eval()
    out = []
    for i in range(0, len(rows), 64):
        seqs, ends, labels = encode_rows(rm, rows[i:i + 64], delimiter)
        for z, y in zip(step_logits(rm, seqs, ends), labels):
            out.append(first_wrong_split((-z).tolist(), y))
    return out


@torch.no_grad()
def surprise(policy, rows: list, delimiter: str) -> list[tuple[list[float], list[float]]]:
    """(positives, negatives) of each response scored by the step's summed −log π of its tokens under `policy`."""
    from outrider.score.step_rm import step_tokens

    policy.eval()
    out = []
    for r in rows:
        ids, ends = step_tokens(policy, r.prompt, r.response, delimiter)
        shift = 1 if policy.bos_id is not None else 0  # the rollout puts a BOS before the prompt
        ids = [policy.bos_id] * shift + ids
        logits = policy.model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        lp = logits[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]  # lp[t - 1]: log π(ids[t] | ids[<t])
        scores, labels, start = [], [], len(policy.encode_observation(r.prompt, first=True)) + shift
        for e, y in zip(ends, r.step_labels):
            if e is None:
                continue
            scores.append(float(-lp[start - 1:e + shift].sum()))
            labels.append(y)
            start = e + shift + 1
        out.append(first_wrong_split(scores, labels))
    return out


def bootstrap(parts: list, seed: int) -> list[float]:
    """95% percentile interval of the pooled AUROC, responses resampled."""
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(2000):
        pick = rng.integers(0, len(parts), len(parts))
        draws.append(auroc([p for i in pick for p in parts[i][0]], [n for i in pick for n in parts[i][1]]))
    return [float(np.nanpercentile(draws, 2.5)), float(np.nanpercentile(draws, 97.5))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("prm", type=Path, nargs="+")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sampler", type=Path, help="also the AUROC of the step's surprise under this model")
    args = ap.parse_args()
    result = {}
    for path in args.prm:
        rm = RewardModel.load(path)
        delimiter = rm.meta.get("delimiter", ",")
        kind, rows = read_examples(str(args.data), delimiter)
        assert kind == "steps", f"{args.data} holds {kind}, not step labels"
        parts = per_response(rm, rows, delimiter)
        metrics = evaluate_steps(rm, rows, delimiter)
        metrics["first_wrong_auroc_ci"] = bootstrap(parts, args.seed)
        metrics["responses"] = len(rows)
        metrics["trained_heldout"] = rm.meta.get("heldout")
        result[str(path)] = metrics
        print(path, json.dumps({k: v for k, v in metrics.items() if k != "trained_heldout"}))
    if args.sampler:
        from outrider.policy.model import Policy

        _, rows = read_examples(str(args.data))
        parts = surprise(Policy.load(args.sampler), rows, ",")
        pooled = auroc([p for x in parts for p in x[0]], [n for x in parts for n in x[1]])
        result["surprise"] = {"first_wrong_auroc": pooled, "first_wrong_auroc_ci": bootstrap(parts, args.seed),
                              "sampler": str(args.sampler)}
        print("surprise", json.dumps(result["surprise"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
