"""The SPA-RL [59] table of docs/rewards.md from an `outrider compare` directory (runs under
<dir>/<recipe>/seed<k>/metrics.jsonl): per recipe, the mean over seeds with a 95% percentile-bootstrap interval
(and the per-seed values) of held-out success and invalid actions at the start and the end, training success
and invalid-action rate over the last steps, the `spa` estimator's diagnostics (its fit to the return and its
ranking of the progress turns, measured on each batch before it trains on it) and the time per step; then the
paired difference of each recipe against the first.

    python benchmarks/spa_table.py runs/spa_cmp --recipes ppo_doorkey5 spa_doorkey5 --out docs/rewards/spa_table.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from outrider.observe.report import bootstrap_stats

EVAL = {"held-out success (pass@1)": "eval/pass@1", "held-out episodes with an invalid action": "eval/invalid_rate",
        "held-out invalid actions per turn": "eval/invalid_action_rate"}
MEANS = {"train success": "episode/accuracy", "train invalid actions per turn": "episode/invalid_action_rate",
         "spa/event_auroc": "spa/event_auroc", "spa/event_corr": "spa/event_corr", "spa/sum_corr": "spa/sum_corr",
         "spa/mse": "spa/mse", "spa/c_event": "spa/c_event", "spa/c_other": "spa/c_other",
         "time/step_s": "time/step_s", "time/score/spa_s": "time/score/spa_s", "time/sample_s": "time/sample_s"}


def run_numbers(rows: list[dict], last: int) -> dict[str, float]:
    evals = [r for r in rows if "eval/pass@1" in r]
    out = {}
    for name, key in EVAL.items():
        out[f"{name}, start"] = evals[0][key]
        out[f"{name}, end"] = evals[-1][key]
    steps = [r for r in rows if r["step"] > 0]
    for name, key in MEANS.items():
        window = steps[-last:] if name.startswith("train") else steps[1:] if key == "time/score/spa_s" else steps
        vals = [r[key] for r in window if key in r]
        if vals:
            out[name + (f", last {last} steps" if name.startswith("train") else ", mean over steps")] = \
                float(np.mean(vals))
    first = steps[0] if steps else {}
    if "time/score/spa_s" in first:
        out["time/score/spa_s at step 1 (with the warm-up)"] = first["time/score/spa_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=Path)
    ap.add_argument("--recipes", nargs="+", required=True)
    ap.add_argument("--last", type=int, default=5)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    per: dict[str, dict[str, list[float]]] = {}
    for recipe in a.recipes:
        for run in sorted((a.dir / recipe).glob("seed*")):
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
            for k, v in run_numbers(rows, a.last).items():
                per.setdefault(recipe, {}).setdefault(k, []).append(v)
    table: dict[str, dict] = {}
    for recipe, numbers in per.items():
        table[recipe] = {}
        for k, vals in numbers.items():
            lo, hi = bootstrap_stats(np.asarray(vals)[:, None])
            table[recipe][k] = {"mean": float(np.mean(vals)), "ci": [float(lo[0]), float(hi[0])], "seeds": vals}
    base = a.recipes[0]
    for recipe in a.recipes[1:]:
        diff = {}
        for k in per[base]:
            if k in per[recipe] and len(per[recipe][k]) == len(per[base][k]):
                d = np.asarray(per[recipe][k]) - np.asarray(per[base][k])
                lo, hi = bootstrap_stats(d[:, None])
                diff[k] = {"mean": float(d.mean()), "ci": [float(lo[0]), float(hi[0])], "seeds": d.tolist()}
        table[f"{recipe} - {base} (paired by seed)"] = diff
    for name, rows in table.items():
        print(f"\n{name}")
        for k, v in rows.items():
            print(f"  {k}: {v['mean']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}] "
                  f"({', '.join(f'{x:.3f}' for x in v['seeds'])})")
    if a.out:
        a.out.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
