"""The robustification table of docs/exploration.md from an `outrider compare` directory of Go-Explore [19] runs
(runs under <dir>/<recipe>/seed<k>/metrics.jsonl): per recipe, the mean over seeds with a 95% percentile-bootstrap
interval of success from the start state (training episodes that start there, `explore/start_success`), held-out
success, cells, the step of the first solution, the backward algorithm's start point and each step's costs.

    python benchmarks/robustify_table.py runs/fixed_robustify --last 10 --at-env-steps 20000

`--at-env-steps N` also reports cells discovered and mean start success up to N cumulative env steps, so methods
that take different env steps per RL step compare at the same env budget.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from outrider.observe.report import bootstrap_stats


def load(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run_numbers(rows: list[dict], last: int, at_env: float | None) -> dict[str, float]:
    """One run's numbers (NaN where a run has no value, e.g. no solution found)."""
    steps = [r for r in rows if r.get("step", 0) > 0 and "explore/env_steps" in r]
    env = np.cumsum([r["explore/env_steps"] for r in steps])
    succ = [r.get("explore/start_success", np.nan) for r in steps]
    solved = [r["step"] for r in steps if r.get("explore/solved_layouts", 0) > 0]
    first = solved[0] if solved else np.nan
    evals = {r["step"]: r["eval/pass@1"] for r in rows if "eval/pass@1" in r}
    out = {"env steps": float(env[-1]), "cells": steps[-1]["explore/archive_cells"],
           "solved seeds": steps[-1].get("explore/solved_layouts", 0.0), "first solution step": float(first),
           f"start success, last {last} steps": float(np.nanmean(succ[-last:])),
           "start success, all steps": float(np.nanmean(succ))}
    if solved:
        out["start success after the first solution"] = float(np.nanmean(succ[solved[0]:])) if len(succ) > solved[
            0] else np.nan
    for step in sorted(evals):
        out[f"held-out pass@1 at step {step}"] = evals[step]
    if at_env is not None:
        k = int(np.searchsorted(env, at_env, side="right"))
        out[f"cells at <= {at_env:.0f} env steps"] = steps[k - 1]["explore/archive_cells"] if k else np.nan
        out[f"start success up to {at_env:.0f} env steps"] = float(np.nanmean(succ[:k])) if k else np.nan
    for key in ("explore/backward_position", "explore/backward_at_start"):
        vals = [r[key] for r in steps if key in r]
        if vals:
            out[f"{key.split('/')[-1]} at the end"] = vals[-1]
    for key in ("time/step_s", "time/sample_s", "time/explore/archive_s", "explore/env_steps", "explore/restores",
                "explore/replayed_steps", "explore/sampled_tokens", "explore/demos"):
        vals = [r[key] for r in steps if key in r]
        if vals:
            out[f"{key} per step"] = float(np.mean(vals))
    out["learner and the rest (step - sample) per step"] = float(np.mean([r["time/step_s"] - r["time/sample_s"]
                                                                         for r in steps]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("compare_dir", type=Path)
    ap.add_argument("--last", type=int, default=10)
    ap.add_argument("--at-env-steps", type=float, default=None)
    args = ap.parse_args()
    for recipe in sorted(p for p in args.compare_dir.iterdir() if p.is_dir()):
        runs = [run_numbers(load(r), args.last, args.at_env_steps) for r in sorted(recipe.glob("seed*"))
                if (r / "metrics.jsonl").exists()]
        if not runs:
            continue
        print(f"== {recipe.name} ({len(runs)} seeds)")
        for key in dict.fromkeys(k for r in runs for k in r):
            vals = np.array([r.get(key, np.nan) for r in runs], dtype=float)
            seen = vals[~np.isnan(vals)]
            if not len(seen):
                continue
            low, high = bootstrap_stats(seen[:, None])
            print(f"  {key:48s} {seen.mean():9.3f} [{low[0]:.3f}, {high[0]:.3f}]  per seed "
                  + " / ".join("-" if np.isnan(v) else f"{v:.3f}" for v in vals))


if __name__ == "__main__":
    main()
