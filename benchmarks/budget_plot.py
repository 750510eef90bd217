"""Uniform vs Knapsack rollout budgets (docs/exploration.md, "Bonuses and budgets"): the share of groups with a
non-zero GRPO gradient per step (rolling mean over 10 steps) and held-out pass@1, mean over seeds (thin lines:
each seed), for each recipe of an `outrider compare` directory.

    python benchmarks/budget_plot.py runs/budget_compare --out docs/bonuses/budget_multisol.png

``--rollouts-per-step N`` puts total rollouts (N·step) on the x axis instead of the step; several compare
directories may be given (their recipes share the axes, e.g. an ablation run as its own compare).

Other metrics: ``--metrics KEY[:rolling] ...`` (e.g. the curriculum's ``explore/curriculum/share_random_labels:rolling
eval/pass@1``), one panel each, titled by the key.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def series(run: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts], dtype=float)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("compare_dir", type=Path, nargs="+")
    ap.add_argument("--rollouts-per-step", type=int, default=0, help="x axis: total rollouts (N·step)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--metrics", nargs="*", default=None, help="KEY or KEY:rolling per panel (default: informative "
                                                               "groups, rolling, and held-out pass@1)")
    args = ap.parse_args()
    panels = [(m.split(":")[0], m.endswith(":rolling")) for m in args.metrics or
              ["explore/informative_groups:rolling", "eval/pass@1"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    axes = axes[0]
    recipes = [p for d in args.compare_dir for p in sorted(d.iterdir()) if p.is_dir()]
    scale = args.rollouts_per_step or 1
    for i, recipe in enumerate(recipes):
        color = f"C{i}"
        for ax, (key, smooth) in zip(axes, panels):
            curves = []
            for run in sorted(recipe.glob("seed*")):
                x, y = series(run, key)
                if smooth:
                    y = np.convolve(y, np.ones(args.window) / args.window, mode="valid")
                    x = x[args.window - 1:]
                x = x * scale
                ax.plot(x, y, color=color, alpha=0.25, lw=0.8)
                curves.append((x, y))
            n = min(len(c[1]) for c in curves)
            name = recipe.name if len(args.compare_dir) == 1 else f"{recipe.parent.name}/{recipe.name}"
            ax.plot(curves[0][0][:n], np.mean([c[1][:n] for c in curves], 0), color=color, lw=2,
                    label=f"{name} (n={len(curves)})")
    if args.metrics is None:
        axes[0].set_title(f"groups with a non-zero gradient (rolling {args.window})")
        axes[1].set_title("held-out pass@1")
    else:
        for ax, (key, smooth) in zip(axes, panels):
            ax.set_title(key + (f" (rolling {args.window})" if smooth else ""), fontsize=9)
    for ax in axes:
        ax.set_xlabel("total rollouts" if args.rollouts_per_step else "step")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
