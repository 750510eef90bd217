"""A saved reward model's accuracy on a pairs file (`{prompt, chosen, rejected}`): the share of pairs whose chosen
response it scores higher (a tie counts as wrong). For an RM trained on flipped labels, scored on clean pairs of
held-out problems (docs/rewards.md, P3O vs a BT RM under noisy labels):

    python benchmarks/rm_pairs.py recipes/grpo_stepsum.yaml --model runs/sft_stepsum --prompts 256 --samples 8 \
        --split eval --out runs/rm_data/pairs_eval.jsonl
    python benchmarks/rm_pair_accuracy.py runs/rm_flip0.2 runs/rm_data/pairs_eval.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from outrider.score.reward_model import RewardModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("rm", type=Path, help="a saved reward model directory")
    ap.add_argument("pairs", type=Path, help="JSONL pairs {prompt, chosen, rejected}")
    args = ap.parse_args()
    rm = RewardModel.load(args.rm)
    pairs = [json.loads(x) for x in args.pairs.read_text().splitlines() if x.strip()]
    prompts = [p["prompt"] for p in pairs]
    chosen = rm.rewards(prompts, [p["chosen"] for p in pairs])
    rejected = rm.rewards(prompts, [p["rejected"] for p in pairs])
    right = sum(c > r for c, r in zip(chosen, rejected))
    print(json.dumps({"rm": str(args.rm), "pairs": len(pairs), "accuracy": right / max(len(pairs), 1)}))


if __name__ == "__main__":
    main()
