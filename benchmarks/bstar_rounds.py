"""B-STaR vs STaR per round, from an `outrider compare` directory (runs under <dir>/<recipe>/seed<k>/metrics.jsonl):
the table and the figure of docs/exploration.md, "B-STaR".

    python benchmarks/bstar_rounds.py runs/bstar --out docs/bstar

Per round (one run step) and recipe: the mean over seeds with its 95% percentile-bootstrap interval (the compare
report's) of the round's own samples' monitors (`bstar/*`, at the round's temperature) and of the held-out
evaluation after the round (`eval/*`, at the evaluation temperature; round 0: the warm start). Then the paired
difference (per seed, same warm start) of each recipe against the first one at the last round, and each recipe's
mean round time and calibration time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from outrider.observe.report import bootstrap_stats

PANELS = (("bstar/unique_correct", "distinct correct per prompt (round's samples)"),
          ("bstar/temperature", "sampling temperature"),
          ("bstar/pass_at_k_s/8", "Pass@16-8 (round's samples)"),
          ("eval/pass@1", "held-out pass@1 (T = 1)"),
          ("eval/distinct_correct", "held-out distinct correct / 16 (T = 1)"),
          ("eval/pass@16", "held-out pass@16 (T = 1)"))
TABLE = ("bstar/temperature", "bstar/unique_correct", "bstar/pass_at_k_s/4", "bstar/pass_at_k_s/8",
         "bstar/selected", "bstar/precision", "eval/pass@1", "eval/distinct_correct", "eval/pass@16")


def load(run: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out: dict[int, dict] = {}
    for r in rows:
        out.setdefault(int(r["step"]), {}).update(r)
    return out


def matrix(runs: list[dict[int, dict]], key: str) -> tuple[list[int], np.ndarray]:
    """(steps, [seeds, steps]) of `key` at the steps every run has it."""
    steps = sorted(set.intersection(*[{s for s, r in run.items() if key in r} for run in runs]))
    return steps, np.array([[run[s][key] for s in steps] for run in runs], dtype=float)


def fmt(mean: float, low: float, high: float) -> str:
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("compare_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="Directory for rounds.png (none: table only).")
    args = ap.parse_args()
    recipes = sorted(p for p in args.compare_dir.iterdir() if p.is_dir() and list(p.glob("seed*/metrics.jsonl")))
    data = {p.name: [load(s) for s in sorted(p.glob("seed*")) if (s / "metrics.jsonl").exists()] for p in recipes}
    names = sorted(data, key=lambda n: (not n.startswith("bstar"), n))
    for key in TABLE:
        print(f"\n{key}")
        for name in names:
            steps, m = matrix(data[name], key)
            if not steps:
                continue
            low, high = bootstrap_stats(m)
            print(f"  {name:22s} " + "  ".join(f"r{s}: {fmt(a, b, c)}" for s, a, b, c in
                                              zip(steps, m.mean(0), low, high)))
    base = names[0]
    print(f"\npaired differences at the last round, against {base} (per seed, 95% bootstrap interval)")
    for name in names[1:]:
        for key in ("bstar/unique_correct", "eval/pass@1", "eval/distinct_correct", "eval/pass@16"):
            _, a = matrix(data[base], key)
            _, b = matrix(data[name], key)
            d = (b[:, -1] - a[:, -1])[:, None]
            low, high = bootstrap_stats(d)
            print(f"  {name} − {base}  {key}: {fmt(float(d.mean()), float(low[0]), float(high[0]))}")
    print("\nmean time per round (s): step, calibration")
    for name in names:
        rows = [r for run in data[name] for s, r in run.items() if s > 0]
        print(f"  {name:22s} {np.mean([r['time/step_s'] for r in rows]):.2f}  "
              f"{np.mean([r.get('time/calibration_s', 0.0) for r in rows]):.2f}")
    if args.out is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, (key, title) in zip(axes.flat, PANELS):
        for name in names:
            steps, m = matrix(data[name], key)
            if not steps:
                continue
            low, high = bootstrap_stats(m)
            ax.plot(steps, m.mean(0), marker="o", label=name)
            ax.fill_between(steps, low, high, alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "rounds.png", dpi=110)
    print(f"wrote {args.out / 'rounds.png'}")


if __name__ == "__main__":
    main()
