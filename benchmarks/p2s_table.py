"""The P2S [39] comparison table: per arm (an `outrider compare` run directory ``DIR/<recipe>/seed<k>/``, named
``label=DIR/recipe``), held-out pass@1 and pass@8 at the last evaluation with 95% percentile-bootstrap
intervals of the mean over seeds, mean pass@1 at the earlier evaluations, the train accuracy over the last 5
steps (`episode/accuracy`: the verifier's verdict, whatever its weight), the mean PFR and the times per step (the
whole step, sampling, and P2S's scoring passes), and each arm's per-seed difference to the first arm (same seed).

    python benchmarks/p2s_table.py grpo=runs/p2s_compare/grpo_stepsum p2s=runs/p2s_compare/p2s_stepsum \
        --out docs/rewards/p2s_table.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from outrider.observe.report import bootstrap_stats


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def interval(values: list[float]) -> dict:
    low, high = bootstrap_stats(np.asarray(values, dtype=float)[:, None])
    return {"mean": float(np.mean(values)), "ci_low": float(low[0]), "ci_high": float(high[0]), "values": values}


def arm(path: Path) -> dict:
    seeds = sorted(path.glob("seed*"))
    per_seed = [rows(s) for s in seeds]
    out: dict = {"seeds": [s.name for s in seeds]}
    evals = [[r for r in rs if "eval/pass@1" in r] for rs in per_seed]
    for key in ("eval/pass@1", "eval/pass@8"):
        out[key] = interval([e[-1][key] for e in evals])
    out["pass@1_by_step"] = {str(r["step"]): float(np.mean([e[i]["eval/pass@1"] for e in evals]))
                             for i, r in enumerate(evals[0])}
    steps = [[r for r in rs if "time/step_s" in r] for rs in per_seed]

    def mean_of(key: str, last: int | None = None) -> float | None:
        vals = [r[key] for st in steps for r in (st[-last:] if last else st) if key in r]
        return float(np.mean(vals)) if vals else None

    out["train_accuracy_last5"] = mean_of("episode/accuracy", 5)
    for key in ("time/step_s", "time/sample_s", "time/score/p2s_s", "time/score/likelihood_s", "time/train_s",
                "p2s/pfr", "p2s/steps_per_episode", "p2s/rows", "p2s/tokens", "credit/dense_abs",
                "episode/response_length"):
        out[key] = mean_of(key)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("arms", nargs="+", help="label=DIR/recipe")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    table = {label: arm(Path(p)) for label, p in (a.split("=", 1) for a in args.arms)}
    result = {"interval": "percentile bootstrap of the mean over seeds (outrider.observe.report.bootstrap_stats)",
              "table": table}
    first = next(iter(table.values()))["eval/pass@1"]["values"]
    for t in table.values():
        t["pass@1_minus_first_arm"] = interval([a - b for a, b in zip(t["eval/pass@1"]["values"], first)])
    for label, t in table.items():
        p1 = t["eval/pass@1"]
        print(f"{label:>14}: pass@1 {p1['mean']:.3f} [{p1['ci_low']:.3f}, {p1['ci_high']:.3f}] "
              f"({', '.join(f'{v:.3f}' for v in p1['values'])})  pass@8 {t['eval/pass@8']['mean']:.3f}  "
              f"by step {t['pass@1_by_step']}  step {t['time/step_s']:.2f}s  p2s {t['time/score/p2s_s'] or 0:.2f}s")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
