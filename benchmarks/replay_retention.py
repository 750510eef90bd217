"""The retention experiment of docs/exploration.md ("Replay and self-imitation") from `outrider compare` directories
whose recipes use the `spear` explore piece with a prompt pool (spear_calculator.yaml, grpo_pool_calculator.yaml).

For each run: the training prompts ever solved (a group with a success) during training, from the final
checkpoint's piece state, are played again by the final policy, `--samples` times each on the train split;
"retained" is the share of them it still solves at least once, "success" its mean success on them. Seeds that
name the same problem (a pool larger than a task's train split, as multisol's 161 train pairs) count once. When
the runs start from a shared warm start (`policy.model` a directory, `warm_start.steps: 0`), the warm start plays
the same prompts with the same samples ("retained_warm", "success_warm"): what RL lost below the start. With held-out
pass@1, the entropy band (min / mean / max of the training token entropy), the train success of the on-policy rows
and the cost per step. Means over seeds with 95% bootstrap intervals, and the paired difference to `--baseline`.
Writes a JSON summary and a two-panel figure (retained share along training, token entropy; mean over
seeds, band min to max).

    python benchmarks/replay_retention.py runs/retention --baseline grpo_pool_calculator --out docs/replay
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from outrider.api import load_recipe
from outrider.checkpoint import list_checkpoints, read_state
from outrider.data import Start
from outrider.explore.rollout import rollout
from outrider.observe.report import stat_of
from outrider.policy.model import Policy
from outrider.trainer import build_task, sampling_params

STEP_KEYS = ("time/step_s", "time/sample_s", "time/train_s")


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def distinct_problems(task, seeds: list[int]) -> list[int]:
    """The first seed of each distinct train problem among `seeds` (all of them when the task cannot say)."""
    if not hasattr(task, "problem"):
        return seeds
    first: dict[str, int] = {}
    for s in seeds:
        first.setdefault(str(task.problem("train", s)["question"]), s)
    return sorted(first.values())


def solve_rates(policy: Policy, task, recipe, seeds: list[int], samples: int) -> np.ndarray:
    starts = [Start(seed=s, group_id=i) for i, s in enumerate(seeds) for _ in range(samples)]
    episodes = rollout(policy, lambda: task.make_env("train"), starts, sampling_params(recipe),
                       torch.Generator().manual_seed(12345), task.max_turns)
    return np.array([e.success for e in episodes], dtype=float).reshape(len(seeds), samples)


def replay_end(run: Path, samples: int) -> dict[str, float]:
    """The final policy (and a shared warm start, if any) on the training prompts ever solved: share still solved
    (>= 1 of `samples`), mean success."""
    recipe = load_recipe(run / "recipe.yaml")
    checkpoint = list_checkpoints(run)[-1]
    task = build_task(recipe)
    ever = sorted(int(s) for s in read_state(checkpoint)["pieces"]["explore"]["first_solved"])
    solved = distinct_problems(task, ever)
    torch.set_num_threads(1)
    hits = solve_rates(Policy.load(checkpoint), task, recipe, solved, samples)
    out = {"ever_solved": float(len(solved)), "retained": float((hits.max(1) > 0).mean()),
           "retained_success": float(hits.mean())}
    if hasattr(task, "problem"):  # held-out problems must be disjoint from the pool: count the ones that are not
        held_out = {str(task.problem("eval", i)["question"]) for i in range(task.eval_size)}
        pool = {str(task.problem("train", s)["question"]) for s in range(recipe.explore.get("pool") or 0)}
        out["heldout_in_pool"] = float(len(held_out & pool))
    if recipe.policy.warm_start.steps == 0 and Path(recipe.policy.model).is_dir():
        warm = solve_rates(Policy.load(recipe.policy.model), task, recipe, solved, samples)
        out.update({"retained_warm": float((warm.max(1) > 0).mean()), "success_warm": float(warm.mean())})
    return out


def run_numbers(run: Path, samples: int) -> dict[str, float]:
    rows = rows_of(run)
    steps = [r for r in rows if "time/step_s" in r]
    evals = [r for r in rows if "eval/pass@1" in r]
    entropy = [r["policy/entropy"] for r in steps]
    out = replay_end(run, samples)
    out.update({"pass@1_start": evals[0]["eval/pass@1"], "pass@1_end": evals[-1]["eval/pass@1"],
                "pass@8_end": evals[-1].get("eval/pass@8", float("nan")),
                "entropy_min": min(entropy), "entropy_mean": float(np.mean(entropy)), "entropy_max": max(entropy),
                "train_success_last10": float(np.mean([r.get("origin/on_policy/accuracy", r.get("reward/verifier"))
                                                       for r in steps[-10:]])),
                "retained_frac_training": steps[-1].get("explore/retained_frac", float("nan"))})
    out.update({k.split("/")[1]: float(np.mean([r[k] for r in steps])) for k in STEP_KEYS})
    out.update(value_and_sil(run, steps))
    return out


def value_and_sil(run: Path, steps: list[dict]) -> dict[str, float]:
    """With a value head: the mean value loss (``loss/value``); with the ``sil`` term: its rows' share of the batch,
    the share of its tokens with R > V, and its part of the loss, ``coef·sil/loss + β·sil/value_loss``, against the
    sum of the parts' magnitudes (``|loss/policy| + vf_coef·loss/value + |sil part|``), all means over the steps."""
    out: dict[str, float] = {}
    if not any("loss/value" in r for r in steps):
        return out
    out["value_loss"] = float(np.mean([r["loss/value"] for r in steps if "loss/value" in r]))
    update = load_recipe(run / "recipe.yaml").update
    sil = next((t for t in (update.terms or []) if t.get("name") == "sil"), None)
    if sil is None:
        return out
    coef, beta = sil.get("coef", 1.0), sil.get("value_coef", 0.01)
    part = [coef * r.get("sil/loss", 0.0) + beta * r.get("sil/value_loss", 0.0) for r in steps]
    whole = [abs(r.get("loss/policy", 0.0)) + update.vf_coef * r.get("loss/value", 0.0) + abs(x)
             for r, x in zip(steps, part)]
    out.update({"sil_rows": float(np.mean([r.get("sil/rows", 0.0) for r in steps])),
                "sil_valid_frac": float(np.mean([r["sil/valid_frac"] for r in steps if "sil/valid_frac" in r] or [0])),
                "sil_loss": float(np.mean(part)),
                "sil_share": float(np.mean([abs(x) / w if w else 0.0 for x, w in zip(part, whole)]))})
    return out


def fmt(values: list[float]) -> str:
    s = stat_of(values)
    return "-" if s is None else f"{s.mean:.3f} [{s.ci_low:.3f}, {s.ci_high:.3f}]"


def plot(groups: dict[str, list[Path]], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for (key, title), ax in zip((("explore/retained_frac", "ever-solved prompts solved at their latest visit"),
                                 ("eval/pass@1", "held-out pass@1"),
                                 ("policy/entropy", "token entropy (training)")), axes):
        for name, runs in groups.items():
            curves = [[(r["step"], r[key]) for r in rows_of(run) if key in r] for run in runs]
            n = min(len(c) for c in curves)
            x = np.array([s for s, _ in curves[0][:n]])
            y = np.array([[v for _, v in c[:n]] for c in curves])
            ax.plot(x, y.mean(0), label=name)
            ax.fill_between(x, y.min(0), y.max(0), alpha=0.2)  # the band: min to max over seeds
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("RL step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--baseline", default="grpo_pool_calculator")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("docs/replay"))
    ap.add_argument("--name", default="retention", help="file name stem of the JSON summary and the figure")
    args = ap.parse_args()
    groups: dict[str, list[Path]] = {}
    for d in args.dirs:
        for recipe_dir in sorted(p for p in d.iterdir() if p.is_dir()):
            runs = sorted(r for r in recipe_dir.glob("seed*") if (r / "summary.json").exists())
            if runs:
                groups[recipe_dir.name if recipe_dir.name not in groups else f"{d.name}/{recipe_dir.name}"] = runs
    numbers = {name: [run_numbers(r, args.samples) for r in runs] for name, runs in groups.items()}
    base = numbers.get(args.baseline)
    keys = list(next(iter(numbers.values()))[0])
    print("| | " + " | ".join(numbers) + " |\n|---|" + "---|" * len(numbers))
    for k in keys:
        print(f"| {k} | " + " | ".join(fmt([x[k] for x in v]) for v in numbers.values()) + " |")
    if base is not None:
        for name, v in numbers.items():
            if name != args.baseline and len(v) == len(base):
                for k in ("retained", "retained_success", "pass@1_end", "step_s", "train_s", "value_loss"):
                    if k not in v[0] or k not in base[0]:
                        continue
                    print(f"paired {name} - {args.baseline} {k}: {fmt([a[k] - b[k] for a, b in zip(v, base)])}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(numbers, indent=1))
    plot(groups, args.out / f"{args.name}.png")


if __name__ == "__main__":
    main()
