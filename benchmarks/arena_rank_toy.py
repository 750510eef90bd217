"""ArenaRL's toy [40]: how well do a noisy pointwise judge and a noisy pairwise judge (in a single-elimination
tournament, O(N) matches, or a round robin, O(N²)) rank a group against its gold qualities?

Each group has N members with gold qualities q ~ U(0, 1). A judgement reads a quality with Gaussian noise σ:
the pointwise judge scores each member once, ``q + σ·z``, on a scale of K levels (``round((K − 1)·clip(·, 0, 1))``:
the coarse scores of an LLM judge, which tie — ArenaRL's "discrimination collapse"; K = 0: unrounded); the pairwise
judge compares two members afresh in each match, ``q_a + σ·z_a > q_b + σ·z_b``. Tournament scores are the rounds
survived (`outrider.credit.arena.tournament`), round-robin scores the wins. The measure: Kendall's τ-b between a
judge's scores and the gold within each group (ties count against it), mean over groups with a 95% bootstrap
interval, and the comparisons each judge needed.

    python benchmarks/arena_rank_toy.py --groups 2000 --size 8 --out docs/rewards/arena_toy.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau

from outrider.credit.arena import tournament


def pointwise(q: list[float], sigma: float, levels: int, rng: random.Random) -> list[float]:
    out = []
    for v in q:
        x = v + rng.gauss(0.0, sigma)
        out.append(float(round((levels - 1) * min(max(x, 0.0), 1.0))) if levels else x)
    return out


def noisy_judge(q: list[float], sigma: float):
    return lambda a, b, rng: q[a] + rng.gauss(0.0, sigma) > q[b] + rng.gauss(0.0, sigma)


def round_robin(q: list[float], sigma: float, rng: random.Random) -> tuple[list[float], int]:
    judge, wins, n = noisy_judge(q, sigma), [0.0] * len(q), 0
    for a in range(len(q)):
        for b in range(a + 1, len(q)):
            n += 1
            wins[a if judge(a, b, rng) else b] += 1
    return wins, n


def tau(scores: list[float], gold: list[float]) -> float:
    t = kendalltau(scores, gold).statistic  # tau-b; NaN when the judge ties everything
    return 0.0 if np.isnan(t) else float(t)


def interval(x: list[float], rng: np.random.Generator) -> list[float]:
    a = np.asarray(x)
    boots = rng.choice(a, size=(2000, len(a))).mean(1)
    return [float(a.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=2000)
    ap.add_argument("--size", type=int, default=8)
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.05, 0.15, 0.3])
    ap.add_argument("--levels", type=int, nargs="+", default=[3, 5, 10, 0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = []
    for sigma in args.sigmas:
        rng, boot = random.Random(args.seed), np.random.default_rng(args.seed)
        taus: dict[str, list[float]] = {f"pointwise_K{k}" if k else "pointwise_exact": [] for k in args.levels}
        taus.update(tournament=[], round_robin=[])
        matches = {"tournament": 0, "round_robin": 0}
        for _ in range(args.groups):
            q = [rng.random() for _ in range(args.size)]
            for k in args.levels:
                taus[f"pointwise_K{k}" if k else "pointwise_exact"].append(tau(pointwise(q, sigma, k, rng), q))
            s, m = tournament(q, rng, judge=noisy_judge(q, sigma))
            taus["tournament"].append(tau(s, q))
            matches["tournament"] += m
            w, m = round_robin(q, sigma, rng)
            taus["round_robin"].append(tau(w, q))
            matches["round_robin"] += m
        for name, t in taus.items():
            judgements = matches.get(name, args.groups * args.size) / args.groups
            rows.append({"sigma": sigma, "judge": name, "tau_b": interval(t, boot), "judgements_per_group": judgements})
            print(f"sigma {sigma:.2f}  {name:16s} tau-b {rows[-1]['tau_b'][0]:.3f} "
                  f"[{rows[-1]['tau_b'][1]:.3f}, {rows[-1]['tau_b'][2]:.3f}]  judgements/group {judgements:.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"groups": args.groups, "size": args.size, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
