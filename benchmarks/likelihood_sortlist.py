"""The likelihood-reward table and plot of docs/rewards.md: `outrider compare` directories of the sortlist arms, one
per answer length, each given as LENGTH=DIR. Per arm and length, the mean over seeds and a 95% bootstrap interval of
held-out pass@1 (first and last evaluation), the train accuracy and the within-group std of the trained reward
(``episode/group_reward_std``; mean of the first and last `--window` steps), the step time and the likelihood pass's
own time per step. The plot draws pass@1 and the reward std against the answer length.

    python benchmarks/likelihood_sortlist.py 5=runs/lik_len5 11=runs/lik_len11 --out docs/rewards/likelihood.json \
        --plot docs/rewards/likelihood_length.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from outrider.observe.report import bootstrap_stats

WINDOWED = ["episode/group_reward_std", "episode/accuracy", "reward/total", "episode/response_length"]
MEANS = ["time/step_s", "time/score/likelihood_s", "time/score/sar_s", "time/sample_s"]


def run_values(run: Path, window: int) -> dict[str, float]:
    """One seed's numbers: held-out pass@1 at its first and last evaluation, windowed train metrics, mean times."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [r for r in rows if "eval/pass@1" in r]
    train = [r for r in rows if r["step"] > 0 and "time/step_s" in r]
    out = {"eval/pass@1 first": evals[0]["eval/pass@1"], "eval/pass@1 last": evals[-1]["eval/pass@1"]}
    for key in WINDOWED:
        vals = [r[key] for r in train if key in r]
        out[f"{key} first"], out[f"{key} last"] = float(np.mean(vals[:window])), float(np.mean(vals[-window:]))
    out.update({key: float(np.mean([r[key] for r in train])) for key in MEANS if key in train[0]})
    return out


def summarise(recipe_dir: Path, window: int) -> dict[str, list[float]]:
    """Per metric: [mean, low, high, per-seed values...] over the recipe's seed runs."""
    seeds = [run_values(run, window) for run in sorted(recipe_dir.glob("seed*"))]
    keys = sorted(set.intersection(*(set(s) for s in seeds)))
    values = np.asarray([[s[k] for k in keys] for s in seeds])
    low, high = bootstrap_stats(values)
    return {k: [float(values[:, i].mean()), float(low[i]), float(high[i]), *values[:, i].round(4).tolist()]
            for i, k in enumerate(keys)}


def plot(table: dict[str, dict[str, dict[str, list[float]]]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted(table, key=float)
    arms = sorted({arm for length in lengths for arm in table[length]})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = [("eval/pass@1 last", "held-out pass@1 (last eval)"),
              ("episode/group_reward_std last", "within-group std of the trained reward"),
              ("episode/accuracy last", "train exact match (last steps)")]
    for ax, (key, title) in zip(axes, panels):
        for k, arm in enumerate(arms):
            xs = [float(length) + 0.08 * (k - len(arms) / 2) for length in lengths if arm in table[length]]
            rows = [table[length][arm][key] for length in lengths if arm in table[length]]
            mean = np.array([r[0] for r in rows])
            err = np.array([[r[0] - r[1] for r in rows], [r[2] - r[0] for r in rows]])
            ax.errorbar(xs, mean, yerr=err, marker="o", capsize=3, label=arm)
        ax.set_xlabel("answer length (letters, mean)")
        ax.set_title(title)
        ax.set_xticks([float(x) for x in lengths])
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+", help="LENGTH=COMPARE_DIR, one per answer length")
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    table: dict[str, dict[str, dict[str, list[float]]]] = {}
    for spec in args.dirs:
        length, directory = spec.split("=", 1)
        table[length] = {p.name: summarise(p, args.window) for p in sorted(Path(directory).iterdir())
                         if p.is_dir() and list(p.glob("seed*"))}
    for length, arms in table.items():
        for arm, rows in arms.items():
            print(f"length {length}  {arm}")
            for k, (m, lo, hi, *per) in rows.items():
                print(f"  {k:36s} {m:8.3f} [{lo:.3f}, {hi:.3f}]  {per}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(table, indent=1))
    if args.plot:
        plot(table, args.plot)


if __name__ == "__main__":
    main()
