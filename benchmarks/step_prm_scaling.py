"""AUROC of step PRMs against the number of training responses: a table and a plot from the JSON files of
`benchmarks/step_prm_auroc.py`. Each PRM's own meta (`reward_model.json`, also in the `--save-epochs` snapshots)
gives its data file (responses: the file's line count, 10% of its problems held out by `rm train`), passes, lr,
seed and start (a model directory, or "tiny": a random network); PRMs that differ only in seed are pooled: mean and a 95% t interval over seeds (n < 2: the point alone).

    python benchmarks/step_prm_scaling.py docs/rewards/step_prm_scaling/*.json \\
        --out docs/rewards/step_prm_scaling.json --plot docs/rewards/step_prm_scaling.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import stats


def setting(prm: str) -> tuple[int, int, float, int, str]:
    """(responses in the data file, passes, lr, seed, start: "warm" or "random") of a saved PRM."""
    meta = json.loads((Path(prm) / "reward_model.json").read_text())
    with open(meta["data"]) as f:
        responses = sum(1 for line in f if line.strip())
    start = "random" if meta.get("model") == "tiny" else "warm"
    return responses, int(meta["epochs"]), float(meta["lr"]), int(meta["seed"]), start


def mean_interval(xs: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): a 95% Student-t interval over seeds, cut to AUROC's [0, 1]; one seed gives (x, x, x)."""
    m = float(np.mean(xs))
    if len(xs) < 2:
        return m, m, m
    h = float(stats.t.ppf(0.975, len(xs) - 1) * np.std(xs, ddof=1) / np.sqrt(len(xs)))
    return m, max(m - h, 0.0), min(m + h, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", type=Path, nargs="+", help="step_prm_auroc.py --out files")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    groups: dict[tuple, dict[int, float]] = defaultdict(dict)  # a PRM in several files counts once
    surprise = None
    for path in args.results:
        for prm, m in json.loads(path.read_text()).items():
            if prm == "surprise":
                surprise = m["first_wrong_auroc"]
                continue
            responses, epochs, lr, seed, start = setting(prm)
            groups[(responses, epochs, lr, start)][seed] = m["first_wrong_auroc"]
    rows = []
    for (responses, epochs, lr, start), by_seed in sorted(groups.items()):
        xs = [by_seed[k] for k in sorted(by_seed)]
        mean, low, high = mean_interval(xs)
        rows.append({"responses": responses, "epochs": epochs, "lr": lr, "start": start, "seeds": sorted(by_seed), "auroc": xs,
                     "mean": mean, "ci": [low, high]})
        print(f"{responses:6d} responses  {epochs} passes  lr {lr:.0e}  {start} start  AUROC {mean:.3f} [{low:.3f}, {high:.3f}] "
              f"({', '.join(f'{x:.3f}' for x in xs)})")
    if args.out:
        args.out.write_text(json.dumps({"settings": rows, "surprise": surprise}, indent=1) + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))

        def name(start: str) -> str:
            return ", random init" if start == "random" else ", warm-start init"

        def draw(ax, rs: list[dict], x: str, label: str) -> None:
            err = np.array([[r["mean"] - r["ci"][0] for r in rs], [r["ci"][1] - r["mean"] for r in rs]])
            ax.errorbar([r[x] for r in rs], [r["mean"] for r in rs], yerr=err, marker="o", capsize=3, label=label)

        # left: against the responses, at 2 passes (the documented PRM) and at the most passes run
        most = max(r["epochs"] for r in rows)
        for lr, start in sorted({(r["lr"], r["start"]) for r in rows}):
            for epochs in sorted({2, most}):
                rs = [r for r in rows if (r["lr"], r["start"], r["epochs"]) == (lr, start, epochs)]
                if len(rs) > 1:
                    draw(left, rs, "responses", f"{epochs} passes, lr {lr:.0e}" + name(start))
        left.set_xscale("log", base=2)
        left.set_xlabel("training responses (the file; 10% of its problems held out)")
        # right: against the passes, one line per data size and lr
        for responses, lr, start in sorted({(r["responses"], r["lr"], r["start"]) for r in rows}):
            draw(right, [r for r in rows if (r["responses"], r["lr"], r["start"]) == (responses, lr, start)],
                 "epochs", f"{responses} responses, lr {lr:.0e}" + name(start))
        right.set_xlabel("passes over the data (epochs)")
        for ax in (left, right):
            ax.axhline(0.8, color="k", ls="--", lw=1, label="goal 0.8")
            if surprise is not None:
                ax.axhline(surprise, color="grey", ls=":", lw=1, label=f"warm start's surprise {surprise:.2f}")
            ax.set_ylabel("first-wrong-step AUROC, test problems")
            ax.legend(fontsize=7)
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
