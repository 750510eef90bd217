"""Cells discovered, solved layouts and held-out success against cumulative env steps, from an `outrider compare`
directory (runs under <dir>/<recipe>/seed<k>/metrics.jsonl): the sparse-level figure of docs/exploration.md.

    python benchmarks/exploration_plot.py runs/doorkey6_compare --out docs/exploration_doorkey6.png

Curves are means over seeds with 95% percentile-bootstrap bands (the compare report's intervals), each seed's
x the cumulative `explore/env_steps` (env steps taken by rollouts: restores are not steps, replayed prefix turns
are). Prints a table of the same numbers at the last step, and each recipe's mean step time and env steps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from outrider.observe.report import bootstrap_stats

PANELS = (("explore/archive_cells", "cells discovered"), ("explore/solved_layouts", "train layouts solved"),
          ("eval/pass@1", "held-out success from the start state"))


def load(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(cumulative env steps, value) at every row that has `key` (step 0's evaluation at 0 env steps)."""
    env, xs, ys = 0.0, [], []
    for r in rows:
        env += r.get("explore/env_steps", 0.0)
        if key in r:
            xs.append(env)
            ys.append(r[key])
    return np.array(xs), np.array(ys)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("compare_dir", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/exploration_doorkey6.png"))
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = sorted(p for p in args.compare_dir.iterdir() if p.is_dir() and list(p.glob("seed*/metrics.jsonl")))
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for recipe in recipes:
        runs = [load(r) for r in sorted(recipe.glob("seed*")) if (r / "metrics.jsonl").exists()]
        for ax, (key, title) in zip(axes, PANELS):
            curves = [series(rows, key) for rows in runs]
            n = min(len(x) for x, _ in curves)
            if n == 0:
                continue
            x = np.mean([c[0][:n] for c in curves], axis=0)
            ys = np.array([c[1][:n] for c in curves])
            low, high = bootstrap_stats(ys)
            ax.plot(x, ys.mean(axis=0), label=recipe.name, marker="o" if n < 6 else None)
            ax.fill_between(x, low, high, alpha=0.2)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("env steps")
            print(f"{recipe.name:28s} {key:24s} end {ys[:, -1].mean():.3f} [{low[-1]:.3f}, {high[-1]:.3f}] "
                  f"per seed {' / '.join(f'{v:.3f}' for v in ys[:, -1])} at {x[-1]:.0f} env steps")
        steps = [r for rows in runs for r in rows if r.get("step", 0) > 0]
        keys = ("time/step_s", "time/sample_s", "time/explore/archive_s", "explore/env_steps", "explore/restores",
                "explore/replayed_steps", "explore/sampled_tokens")
        print(recipe.name, {k: round(float(np.mean([r[k] for r in steps if k in r])), 4)
                            for k in keys if any(k in r for r in steps)})
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
