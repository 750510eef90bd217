"""STARC [99] toy: which reward distance predicts the regret of optimising the wrong reward?

Per pair: a random MDP (`--states` × `--actions`, Dirichlet(1) transitions, uniform μ0, γ `--gamma`), a reward
R1 ~ N(0, 1) per (s, a, s′), and R2 = potential-shaped(a·R1 + σ·N, Φ): a positive rescale a ~ LogU(0.1, 10), noise
of scale σ ~ LogU(0.01, 10) (how different the two really are), a potential Φ ~ N(0, κ²) with κ ~ LogU(0.01, 10)
(what should not matter). Regret: the mean of the two directions, each ``(J1(π1*) − J1(π2*)) / (J1(π1*) −
J1(π_worst))`` under μ0 (`starc.regret`). Per seed: Pearson and Spearman correlations of each distance with the
regret over `--pairs` pairs; mean and 95% bootstrap interval over seeds.

    python benchmarks/starc_toy.py --seeds 3 --pairs 300 --out docs/rewards/starc.json --plot docs/rewards/starc.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr

from outrider.observe.report import bootstrap_stats
from outrider.score.starc import (epic_distance, l2_distance, potential_shaped, random_mdp, regret,
                                  starc_distance)

DISTANCES = ("l2", "epic", "starc_epic", "starc_val")


def log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def one_seed(seed: int, pairs: int, n_s: int, n_a: int, gamma: float) -> dict[str, list[float]]:
    rng = np.random.default_rng(seed)
    rows: dict[str, list[float]] = {k: [] for k in (*DISTANCES, "regret")}
    for _ in range(pairs):
        T, mu0 = random_mdp(n_s, n_a, rng)
        R1 = rng.normal(size=(n_s, n_a, n_s))
        noisy = log_uniform(rng, 0.1, 10) * R1 + log_uniform(rng, 0.01, 10) * rng.normal(size=R1.shape)
        R2 = potential_shaped(noisy, log_uniform(rng, 0.01, 10) * rng.normal(size=n_s), gamma)
        rows["l2"].append(l2_distance(R1, R2))
        rows["epic"].append(epic_distance(R1, R2, gamma))
        rows["starc_epic"].append(starc_distance(R1, R2, T, gamma, "epic"))
        rows["starc_val"].append(starc_distance(R1, R2, T, gamma, "val"))
        rows["regret"].append(0.5 * (regret(R1, R2, T, gamma, mu0) + regret(R2, R1, T, gamma, mu0)))
    return rows


def plot(all_rows: list[dict[str, list[float]]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DISTANCES), figsize=(12, 3), sharey=True)
    regret_ = np.concatenate([r["regret"] for r in all_rows])
    for ax, k in zip(axes, DISTANCES):
        ax.scatter(np.concatenate([r[k] for r in all_rows]), regret_, s=3, alpha=0.4)
        ax.set_xlabel(f"{k} distance")
    axes[0].set_ylabel("regret (normalised, both directions)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--states", type=int, default=6)
    ap.add_argument("--actions", type=int, default=3)
    ap.add_argument("--gamma", type=float, default=0.9)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    t0 = time.perf_counter()
    all_rows, corr = [], {f"{m}_{k}": [] for m in ("pearson", "spearman") for k in DISTANCES}
    for seed in range(args.seeds):
        rows = one_seed(seed, args.pairs, args.states, args.actions, args.gamma)
        all_rows.append(rows)
        for k in DISTANCES:
            corr[f"pearson_{k}"].append(float(pearsonr(rows[k], rows["regret"])[0]))
            corr[f"spearman_{k}"].append(float(spearmanr(rows[k], rows["regret"])[0]))
    values = np.asarray([corr[k] for k in corr]).T
    low, high = bootstrap_stats(values)
    summary = {"args": {k: v for k, v in vars(args).items() if k not in ("out", "plot")},
               "seconds": time.perf_counter() - t0,
               "correlation": {k: [float(values[:, j].mean()), float(low[j]), float(high[j]), corr[k]]
                               for j, k in enumerate(corr)},
               "mean_regret": float(np.mean([np.mean(r["regret"]) for r in all_rows]))}
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    if args.plot:
        plot(all_rows, args.plot)


if __name__ == "__main__":
    main()
