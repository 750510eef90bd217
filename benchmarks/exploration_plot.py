"""Cells discovered, solved layouts and held-out success against cumulative env steps, from an `outrider compare`
directory (runs under <dir>/<recipe>/seed<k>/metrics.jsonl): the sparse-level figure of docs/exploration.md.

    python benchmarks/exploration_plot.py runs/doorkey6_compare --out docs/exploration_doorkey6.png
    python benchmarks/exploration_plot.py runs/fixed_robustify --out docs/exploration/fixed_robustify.png \
        --panels explore/archive_cells=cells explore/start_success:rolling="success from the start state"

`--panels KEY[:rolling]=TITLE ...` picks the panels (default: cells, solved layouts, held-out success);
`:rolling` plots a trailing mean over `--window` logged values (for per-step rates such as start success).

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


def panel(spec: str) -> tuple[str, bool, str]:
    """'KEY[:rolling][=TITLE]' -> (key, rolling, title)."""
    key, _, title = spec.partition("=")
    key, _, mode = key.partition(":")
    return key, mode == "rolling", title or key


def rolling(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last `window` values (fewer at the start)."""
    c = np.cumsum(np.insert(y, 0, 0.0))
    lo = np.maximum(np.arange(1, len(y) + 1) - window, 0)
    return (c[1:] - c[lo]) / (np.arange(1, len(y) + 1) - lo)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("compare_dir", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/exploration_doorkey6.png"))
    ap.add_argument("--panels", nargs="+", default=[f"{k}={t}" for k, t in PANELS])
    ap.add_argument("--window", type=int, default=5)
    args = ap.parse_args()
    panels = [panel(p) for p in args.panels]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = sorted(p for p in args.compare_dir.iterdir() if p.is_dir() and list(p.glob("seed*/metrics.jsonl")))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    axes = axes[0]
    for recipe in recipes:
        runs = [load(r) for r in sorted(recipe.glob("seed*")) if (r / "metrics.jsonl").exists()]
        for ax, (key, smooth, title) in zip(axes, panels):
            curves = [series(rows, key) for rows in runs]
            if smooth:
                curves = [(x, rolling(y, args.window)) for x, y in curves]
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
