"""Own cost per step of the outcome bonuses [26] and the Knapsack allocator [141], isolated from the policy (for
docs/exploration.md, "Bonuses and budgets"): the pieces called on synthetic inputs of a run's size.

    python benchmarks/bonus_overhead.py [--repeats 50]

- outcome_ucb / outcome_batch: one step's 16 prompts × 8 episodes, with counts already holding 62 prompts × 500
  distinct answers (more than a 200-step multisol run collects);
- knapsack allocation: 16 prompts, 64 rollouts, max_n 16 (recipes/knapsack_multisol.yaml), and the authors'
  scale: 256 prompts, 8 rollouts each, max_n 128.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from outrider.data import Episode, Turn
from outrider.explore.budget import allocate
from outrider.registry import BuildContext
from outrider.score import SCORE


def episodes(rng: np.random.Generator, prompts: int = 16, group: int = 8) -> list[Episode]:
    out = []
    for g in range(prompts):
        for _ in range(group):
            answer = str(int(rng.integers(0, 600)))
            out.append(Episode(group_id=g, seed=g, turns=[Turn(f"p{g}", [1], answer, [2], info={"canonical": answer})]))
    return out


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    batch = episodes(rng)
    entry, cfg = SCORE.build({"name": "outcome_ucb"}, "score[1]")
    ucb = entry.create(cfg, BuildContext(where="score[1]"))
    ucb.counts = {f"p{g}": {str(a): 3 for a in range(500)} for g in range(62)}
    entry, cfg = SCORE.build({"name": "outcome_batch"}, "score[1]")
    batch_piece = entry.create(cfg)
    print(f"outcome_ucb, 128 episodes:    {1e3 * best_of(lambda: ucb(batch), args.repeats):.3f} ms")
    print(f"outcome_batch, 128 episodes:  {1e3 * best_of(lambda: batch_piece(batch), args.repeats):.3f} ms")
    for prompts, n, max_n in ((16, 4, 16), (256, 8, 128)):
        rates = [float(rng.choice([0.0, 1.0, rng.integers(1, 16) / 16])) for _ in range(prompts)]
        ms = 1e3 * best_of(lambda: allocate(rates, n, 2, max_n), max(3, args.repeats // 10))
        print(f"knapsack, {prompts} prompts × {n}, max_n {max_n}: {ms:.2f} ms")


if __name__ == "__main__":
    main()
