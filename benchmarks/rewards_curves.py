"""Per-step curves (mean over seeds, 95% bootstrap band) of training metrics for every recipe of an `outrider
compare` directory, one panel per metric: the proxy, gold and length view of docs/rewards.md.

    python benchmarks/rewards_curves.py runs/prime_compare100 --metrics reward/verifier,reward/implicit_prm,\
episode/response_length --out docs/rewards/curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from outrider.observe.report import bootstrap_stats


def curves(recipe_dir: Path, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, low, high) of `key` over the seeds of one recipe (steps where every seed logged it)."""
    per_seed = []
    for run in sorted(recipe_dir.glob("seed*")):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        per_seed.append({r["step"]: r[key] for r in rows if key in r})
    steps = sorted(set.intersection(*(set(s) for s in per_seed)))
    values = np.asarray([[s[t] for t in steps] for s in per_seed])
    low, high = bootstrap_stats(values)
    return np.asarray(steps), values.mean(0), low, high


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("compare_dir", type=Path)
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--smooth", type=int, default=5, help="moving-average window over steps")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = args.metrics.split(",")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2))
    for ax, key in zip(np.atleast_1d(axes), keys):
        for i, recipe in enumerate(sorted(p for p in args.compare_dir.iterdir() if p.is_dir())):
            try:
                steps, mean, low, high = curves(recipe, key)
            except (TypeError, KeyError):  # a recipe that does not log this metric
                continue
            if not len(steps):
                continue
            k = np.ones(min(args.smooth, len(steps))) / min(args.smooth, len(steps))
            smooth = lambda x: np.convolve(x, k, mode="valid")  # noqa: E731
            x = steps[len(steps) - len(smooth(mean)):]
            ax.plot(x, smooth(mean), label=recipe.name, color=f"C{i}")  # one colour per recipe in every panel
            ax.fill_between(x, smooth(low), smooth(high), alpha=0.2, color=f"C{i}")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
