"""Tokens-to-success curves for docs/exploration.md ("Retries"): on-policy training success from the start state (GRPO's
episode/accuracy; a retry piece's explore/first_success, its first attempts, no hint) and a metric of choice,
against cumulative sampled tokens and against RL steps, mean over seeds (thin lines: each seed).

    python benchmarks/retries_plot.py runs/r3l_calc [more compare dirs] --out docs/img/r3l_calculator.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402


def normal_success(row: dict, episodes: int, recovery_group_size: int) -> float:
    """Success of the episodes sampled from the start state: a retry piece's first attempts; for Fission the
    batch accuracy less its recovery rollouts (R = fissions x group size, success rate explore/recovery_success)."""
    if "explore/first_success" in row:
        return row["explore/first_success"]
    recoveries = row.get("explore/fissions", 0) * recovery_group_size
    return (row["episode/accuracy"] * (episodes + recoveries)
            - row.get("explore/recovery_success", 0.0) * recoveries) / episodes


def series(run: Path, smooth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, cumulative sampled tokens, smoothed on-policy success) of one run."""
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    episodes = recipe["explore"]["prompts_per_step"] * recipe["explore"]["group_size"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("step", 0) > 0 and "time/step_s" in r]
    steps = np.array([r["step"] for r in rows])
    tokens = np.cumsum([r.get("explore/sampled_tokens", r["episode/response_length"] * episodes) for r in rows])
    size = recipe["explore"].get("recovery_group_size", 0)
    success = np.array([normal_success(r, episodes, size) for r in rows])
    kernel = np.ones(smooth) / smooth
    smoothed = np.convolve(np.pad(success, (smooth - 1, 0), mode="edge"), kernel, mode="valid")
    return steps, tokens, smoothed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smooth", type=int, default=5)
    ap.add_argument("--only", nargs="*", default=None, help="recipe names to plot (default: all)")
    args = ap.parse_args()
    recipes: dict[str, list[Path]] = {}
    for d in args.dirs:
        for run in sorted(d.glob("*/seed*")):
            if (run / "summary.json").exists() and (args.only is None or run.parent.name in args.only):
                recipes.setdefault(run.parent.name, []).append(run)
    fig, (ax_steps, ax_tokens) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, runs) in enumerate(sorted(recipes.items())):
        color = f"C{i}"
        data = [series(r, args.smooth) for r in runs]
        n = min(len(d[0]) for d in data)
        for steps, tokens, succ in data:
            ax_steps.plot(steps[:n], succ[:n], color=color, alpha=0.25, lw=0.8)
            ax_tokens.plot(tokens[:n] / 1000, succ[:n], color=color, alpha=0.25, lw=0.8)
        mean = np.mean([d[2][:n] for d in data], axis=0)
        ax_steps.plot(data[0][0][:n], mean, color=color, lw=2, label=f"{name} ({len(runs)} seeds)")
        ax_tokens.plot(np.mean([d[1][:n] for d in data], axis=0) / 1000, mean, color=color, lw=2, label=name)
    ax_steps.set(xlabel="RL step", ylabel=f"on-policy train success (mean of {args.smooth} steps)")
    ax_tokens.set(xlabel="sampled tokens (thousands, cumulative)")
    ax_steps.legend(fontsize=8)
    for ax in (ax_steps, ax_tokens):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
