"""Tables of docs/exploration.md ("Bonuses and budgets") from `outrider compare` directories: per recipe, the mean
over seeds and its 95% bootstrap interval of (a) held-out metrics at the warm start (step 0) and at the last step,
and of their difference per seed, (b) training metrics averaged over all steps, (c) with --states, the states a
run visited in training: the distinct env states in its `state_count` piece's counts at the final checkpoint.

    python benchmarks/bonus_table.py runs/outcome_compare --eval eval/pass@1 eval/pass@16 eval/distinct_answers \
        eval/distinct_correct --train episode/zero_variance_group_frac time/step_s
    python benchmarks/bonus_table.py runs/flip_random --eval eval/pass@1 eval/distinct_states \
        --train episode/accuracy episode/distinct_states --states
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from outrider.checkpoint import STATE_FILE
from outrider.observe.report import stat_of


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def states_visited(run: Path) -> float | None:
    """Distinct keys of the first `counts` table (state_count's N over the run) in the run's last checkpoint."""
    steps = sorted(run.glob("checkpoints/step_*"), key=lambda d: int(d.name.split("_")[1]))
    if not steps:
        return None
    pieces = torch.load(steps[-1] / STATE_FILE, weights_only=False).get("pieces", {})
    for piece in (pieces.values() if isinstance(pieces, dict) else []):
        if isinstance(piece, dict) and isinstance(piece.get("counts"), dict):
            return float(len(piece["counts"]))
    return None


def fmt(values: list[float]) -> str:
    s = stat_of(values)
    return "—" if s is None else f"{s.mean:.3f} [{s.ci_low:.3f}, {s.ci_high:.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("compare_dir", type=Path)
    ap.add_argument("--eval", nargs="*", default=[])
    ap.add_argument("--train", nargs="*", default=[])
    ap.add_argument("--states", action="store_true", help="also the states visited (state_count's table)")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    ap.add_argument("--train-from", type=int, default=1, help="average training metrics over steps >= this")
    args = ap.parse_args()
    out: dict[str, dict[str, str]] = {}
    for recipe in sorted(p for p in args.compare_dir.iterdir() if p.is_dir()):
        runs = sorted(recipe.glob("seed*"))
        if not runs:
            continue
        per_seed = [rows_of(r) for r in runs]
        row: dict[str, str] = {"seeds": str(len(runs))}
        for key in args.eval:
            evals = [[r for r in rows if key in r] for rows in per_seed]
            start, end = [e[0][key] for e in evals if e], [e[-1][key] for e in evals if e]
            row[f"{key} start"], row[f"{key} end"] = fmt(start), fmt(end)
            row[f"{key} change"] = fmt([b - a for a, b in zip(start, end)])
        for key in args.train:
            means = []
            for rows in per_seed:
                vals = [r[key] for r in rows if key in r and r.get("step", 0) >= max(args.train_from, 1)]
                if vals:
                    means.append(sum(vals) / len(vals))
            since = f" >= {args.train_from}" if args.train_from > 1 else ""
            row[f"{key} (mean over steps{since})"] = fmt(means)
        if args.states:
            visited = [v for v in map(states_visited, runs) if v is not None]
            row["states visited (train)"] = fmt(visited) + " (" + " / ".join(f"{v:.0f}" for v in visited) + ")"
        out[recipe.name] = row
    for name, row in out.items():
        print(f"## {name}")
        for k, v in row.items():
            print(f"  {k}: {v}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
