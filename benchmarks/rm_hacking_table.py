"""The reward-hacking table of docs/rewards.md from `outrider compare` directories: per recipe, the mean over seeds
and a 95% bootstrap interval of held-out pass@1 at each evaluation, the monitor's proxy, gold, proxy–gold
correlation and length (first and last `--window` steps; a recipe without the monitor reads the verifier's train
reward as its gold), the step time and the reward model's own time per step.

    python benchmarks/rm_hacking_table.py runs/rm_compare runs/rm_online_compare --out docs/rewards/rm_table.json

Other metrics with --window-keys / --mean-keys (the rubric table of docs/rewards.md reads rubric/*).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from outrider.observe.report import bootstrap_stats

WINDOW_KEYS = ["monitor/proxy", "monitor/gold", "monitor/correlation", "monitor/length", "rm/accuracy"]
MEAN_KEYS = ["time/step_s", "time/score/reward_model_s"]


def seed_values(run: Path, window: int, window_keys: list[str] = WINDOW_KEYS,
                mean_keys: list[str] = MEAN_KEYS) -> dict[str, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in rows if r["step"] > 0 and "time/step_s" in r]
    out: dict[str, float] = {}
    for r in rows:
        if "eval/pass@1" in r:
            out[f"eval/pass@1 step {r['step']}"] = r["eval/pass@1"]
    for key in window_keys + ["reward/verifier"]:
        vals = [r[key] for r in train if key in r]
        if vals:
            name = "monitor/gold" if key == "reward/verifier" else key
            out[f"{name} first"] = float(np.mean(vals[:window]))
            out[f"{name} last"] = float(np.mean(vals[-window:]))
    for key in mean_keys:
        vals = [r[key] for r in train if key in r]
        if vals:
            out[key] = float(np.mean(vals))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("compare_dirs", type=Path, nargs="+")
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--window-keys", default=",".join(WINDOW_KEYS), help="metrics read at the first/last window")
    ap.add_argument("--mean-keys", default=",".join(MEAN_KEYS), help="metrics averaged over all steps")
    ap.add_argument("--by-dir", action="store_true", help="name rows <compare dir>/<recipe> (one recipe run in "
                                                          "several compares with other --set options)")
    args = ap.parse_args()
    window_keys, mean_keys = args.window_keys.split(","), args.mean_keys.split(",")
    table: dict[str, dict[str, list[float]]] = {}
    for d in args.compare_dirs:
        for recipe in sorted(p for p in d.iterdir() if p.is_dir()):
            seeds = [seed_values(run, args.window, window_keys, mean_keys) for run in sorted(recipe.glob("seed*"))]
            keys = sorted(set.intersection(*(set(s) for s in seeds)))
            values = np.asarray([[s[k] for k in keys] for s in seeds])
            low, high = bootstrap_stats(values)
            table[f"{d.name}/{recipe.name}" if args.by_dir else recipe.name] = {k: [float(values[:, i].mean()), float(low[i]), float(high[i]),
                                      *values[:, i].round(4).tolist()] for i, k in enumerate(keys)}
    for name, rows in table.items():
        print(name)
        for k, (m, lo, hi, *per) in rows.items():
            print(f"  {k:36s} {m:8.3f} [{lo:.3f}, {hi:.3f}]  {per}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
