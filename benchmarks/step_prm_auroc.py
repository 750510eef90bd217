"""A step PRM's first-wrong-step AUROC on a held-out step-labels file (`benchmarks/rm_pairs.py --split eval
--steps FILE`), the protocol of `implicit_prm_auroc.py`: per response, the first step the checker marks wrong is a
positive, the right steps before it negatives, later steps left out; AUROC = P(a first wrong step has a lower
p = σ(z) than a right step before it). The interval is a 95% percentile bootstrap over responses (2000 draws).

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("prm", type=Path, nargs="+")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    result = {}
    for path in args.prm:
        rm = RewardModel.load(path)
        delimiter = rm.meta.get("delimiter", ",")
        kind, rows = read_examples(str(args.data), delimiter)
        assert kind == "steps", f"{args.data} holds {kind}, not step labels"
        parts = per_response(rm, rows, delimiter)
        rng = np.random.default_rng(args.seed)
        draws = []
        for _ in range(2000):
            pick = rng.integers(0, len(parts), len(parts))
            draws.append(auroc([p for i in pick for p in parts[i][0]], [n for i in pick for n in parts[i][1]]))
        metrics = evaluate_steps(rm, rows, delimiter)
        metrics["first_wrong_auroc_ci"] = [float(np.nanpercentile(draws, 2.5)), float(np.nanpercentile(draws, 97.5))]
        metrics["responses"] = len(rows)
        metrics["trained_heldout"] = rm.meta.get("heldout")
        result[str(path)] = metrics
        print(path, json.dumps({k: v for k, v in metrics.items() if k != "trained_heldout"}))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
