"""The tables of docs/exploration.md ("Retries") from `outrider compare` directories: per recipe, held-out metrics at
the start and the end (mean over seeds with its 95% bootstrap interval), the paired end-minus-GRPO difference per
seed, and each method's cost per RL step (env steps, sampled tokens, step time).

    python benchmarks/retries_table.py runs/r3l_calc [more compare dirs] [--baseline grpo_calculator]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from outrider.observe.report import stat_of

EVAL = ("pass@1", "pass@4", "pass@8", "invalid_rate", "env_recovered", "invalid_after_error_rate", "repeat_error_rate",
        "distinct_correct", "distinct_states")


def fmt(values: list[float]) -> str:
    s = stat_of(values)
    return "-" if s is None else f"{s.mean:.3f} [{s.ci_low:.3f}, {s.ci_high:.3f}]"


def run_costs(run: Path) -> dict[str, float]:
    """Mean per RL step: env steps, sampled tokens, step time (a group strategy logs no cost: its episodes' turns
    and action tokens times the episodes sampled)."""
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    episodes = recipe["explore"]["prompts_per_step"] * recipe["explore"]["group_size"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("step", 0) > 0 and "time/step_s" in r]
    def mean(key: str, fallback: str | None = None, scale: float = 1.0) -> float:
        vals = [r[key] if key in r else r[fallback] * scale for r in rows]
        return sum(vals) / len(vals)
    return {"env_steps": mean("explore/env_steps", "episode/turns", episodes),
            "tokens": mean("explore/sampled_tokens", "episode/response_length", episodes),
            "step_s": mean("time/step_s"), "sample_s": mean("time/sample_s"), "train_s": mean("time/train_s")}


def recovery_totals(run: Path) -> tuple[float, float, float] | None:
    """A fission run's totals at its last step: fissions, recovery rollouts, successful ones (None otherwise)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "explore/fissions_total" in r]
    if not rows:
        return None
    recovery_rollouts = sum(r["explore/fissions"] for r in rows)  # each fission: recovery_group_size rollouts
    size = yaml.safe_load((run / "recipe.yaml").read_text())["explore"].get("recovery_group_size", 8)
    return rows[-1]["explore/fissions_total"], recovery_rollouts * size, rows[-1]["explore/recovered_total"]


RETRY = ("explore/first_success", "explore/retry_success", "explore/retries", "origin/retry/iw_mean")


def retry_means(run: Path) -> dict[str, float]:
    """Per-step means of R³L's retry metrics ({} for a run without retries); the retry success and importance
    weight over the steps that had retries."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "explore/retries" in r]
    out = {}
    for key in RETRY:
        vals = [r[key] for r in rows if key in r and (key == "explore/first_success" or r["explore/retries"] > 0)]
        if vals:
            out[key] = sum(vals) / len(vals)
    return out if len(out) == len(RETRY) else {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--baseline", default="grpo_calculator")
    args = ap.parse_args()
    recipes: dict[str, dict[int, Path]] = {}
    for d in args.dirs:
        for run in sorted(d.glob("*/seed*")):
            if (run / "summary.json").exists():
                recipes.setdefault(run.parent.name, {})[int(run.name[4:])] = run
    summaries = {name: {s: json.loads((r / "summary.json").read_text()) for s, r in runs.items()}
                 for name, runs in recipes.items()}
    base = summaries.get(args.baseline, {})
    for key in EVAL:
        print(f"\n{key}: recipe | seeds | start | end | end - {args.baseline} (paired by seed)")
        for name, runs in summaries.items():
            if key not in next(iter(runs.values()))["eval_end"]:
                continue
            start = [s["eval_start"][key] for s in runs.values()]
            end = [s["eval_end"][key] for s in runs.values()]
            diff = [runs[s]["eval_end"][key] - base[s]["eval_end"][key] for s in runs if s in base]
            print(f"| {name} | {len(runs)} | {fmt(start)} | {fmt(end)} | {fmt(diff) if name != args.baseline else ''} |")
    print("\nfission recoveries: recipe | fissions | recovery rollouts | succeeded | success rate (per seed)")
    for name, runs in recipes.items():
        ends = [recovery_totals(r) for r in runs.values()]
        if all(e is not None for e in ends):
            rates = [e[2] / max(e[1], 1) for e in ends]
            print(f"| {name} | " + " | ".join(" / ".join(f"{e[i]:.0f}" for e in ends) for i in range(3))
                  + f" | {fmt(rates)} ({' / '.join(f'{r:.3f}' for r in rates)}) |")
    print("\nretries, mean over steps: recipe | first-attempt success | retry success | retries a step | "
          "retries' importance weight")
    for name, runs in recipes.items():
        means = [retry_means(r) for r in runs.values()]
        if all(m for m in means):
            print(f"| {name} | " + " | ".join(fmt([m[k] for m in means]) for k in RETRY) + " |")
    print("\ncost per RL step: recipe | env steps | sampled tokens | step s | sample s | train s")
    for name, runs in recipes.items():
        costs = [run_costs(r) for r in runs.values()]
        cols = [fmt([c[k] for c in costs]) for k in ("env_steps", "tokens", "step_s", "sample_s", "train_s")]
        print(f"| {name} | " + " | ".join(cols) + " |")


if __name__ == "__main__":
    main()
