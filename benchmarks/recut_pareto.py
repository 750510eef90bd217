"""ReCUT [108] on stepsum: accuracy and mean response length of the warm start, GRPO with a length penalty, the two
DPO models (accuracy, brevity) and their parameter interpolation across mixing weights, per seed; the weight is
chosen on the validation split (`choose_weight`), the numbers reported on the test split. Writes
OUT/results.json and OUT/recut_pareto.png (means over seeds with 95% bootstrap intervals).

    python benchmarks/recut_pareto.py --out runs/recut --seeds 3

`outrider sft` once (the warm start every seed shares), then per seed `outrider train` of recut_accuracy.yaml,
recut_brevity.yaml and grpo_stepsum_length.yaml from it, then `merge` of the two DPO models at each weight
(`--merge-method dare_ties --density 0.25`: the authors' merge; runs already in OUT are reused, not retrained).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from outrider.checkpoint import list_checkpoints
from outrider.loops.recut import choose_weight
from outrider.merge import merge
from outrider.observe.evaluate import evaluate
from outrider.observe.report import stat_of
from outrider.policy.model import Policy
from outrider.recipe import load_recipe
from outrider.trainer import build_task, sampling_params

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
OUTRIDER = [sys.executable, "-m", "outrider.cli"]
ARMS = {"accuracy": "recut_accuracy.yaml", "brevity": "recut_brevity.yaml", "grpo_length": "grpo_stepsum_length.yaml"}


def cli(*args: str) -> None:
    subprocess.run([*OUTRIDER, *map(str, args)], check=True)


def sets(args: argparse.Namespace) -> list[str]:
    return [x for s in args.set for x in ("--set", s)]


def evaluate_model(path: Path, holdout: str, args: argparse.Namespace) -> dict[str, float]:
    recipe = load_recipe(RECIPES / ARMS["accuracy"], [*args.set, f"task.holdout={holdout}"])
    policy = Policy.load(path)
    result = evaluate(policy, build_task(recipe), args.prompts, args.samples, [1], sampling_params(recipe, 1.0),
                      seed=12345)
    return {"accuracy": result["accuracy"], "length": result["response_length"]}


def run_seed(seed: int, out: Path, args: argparse.Namespace) -> dict[str, dict]:
    root = out / f"seed{seed}"
    t0 = time.perf_counter()
    # one warm start (model init seed 0) shared by every seed, as ReCUT starts from one given model; the seeds vary
    # the trials, the training and GRPO's samples
    warm = out / "warm_start"
    if not (warm / "config.json").exists():
        cli("sft", RECIPES / ARMS["accuracy"], "--out", warm, "--set", "train.seed=0", "--overwrite", *sets(args))
    models = {"warm_start": warm}
    for arm, recipe in ARMS.items():
        run = root / arm
        if not (run / "summary.json").exists():
            cli("train", RECIPES / recipe, "--out", run, "--quiet", "--overwrite", "--set", f"train.seed={seed}",
                "--set", f"policy.model={warm}", "--set", "policy.warm_start.steps=0",
                "--set", f"train.steps={args.grpo_steps if arm == 'grpo_length' and args.grpo_steps else args.steps}",
                *sets(args),
                *(x for o in (args.dpo_set if arm != "grpo_length" else []) for x in ("--set", o)))
        models[arm] = list_checkpoints(run)[-1]
    for w in args.weights:
        merged = root / f"merged_{w:g}"
        if args.merge_method == "linear":
            merge(models["accuracy"], models["brevity"], merged, w)
        else:  # on the task vectors against the shared warm start, as the authors' DARE-TIES config
            merge(models["accuracy"], models["brevity"], merged, w, base=warm, method=args.merge_method,
                  density=args.density, seed=seed, scale=args.scale)
        models[f"merged_{w:g}"] = merged
    results = {name: {"test": evaluate_model(path, "test", args)} for name, path in models.items()
               if not args.merged_only or name.startswith("merged_")}
    validation = {w: evaluate_model(models[f"merged_{w:g}"], "validation", args) for w in args.weights}
    chosen = choose_weight(validation, args.tolerance)
    results["recut_chosen"] = {"test": results[f"merged_{chosen:g}"]["test"], "weight": chosen,
                               "validation": {f"{w:g}": v for w, v in validation.items()}}
    trials = json.loads((root / "accuracy" / "metrics.jsonl").read_text().splitlines()[1])
    results["cost"] = {"trial_tokens": trials.get("recut/trial_tokens"), "wall_s": time.perf_counter() - t0,
                       "accuracy_pairs": trials.get("recut/pairs"),
                       "brevity_pairs": json.loads((root / "brevity" / "metrics.jsonl").read_text().splitlines()[1])
                       .get("recut/pairs")}
    return results


def summarise(per_seed: dict[int, dict], names: list[str]) -> dict[str, dict]:
    out = {}
    for name in names:
        rows = [r[name]["test"] for r in per_seed.values() if name in r]
        out[name] = {k: vars(stat_of([row[k] for row in rows])) for k in ("accuracy", "length")}
    out["chosen_weights"] = [r["recut_chosen"]["weight"] for r in per_seed.values()]
    return out


def plot(summary: dict[str, dict], weights: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    xs = [summary[f"merged_{w:g}"]["length"]["mean"] for w in weights]
    ys = [summary[f"merged_{w:g}"]["accuracy"]["mean"] for w in weights]
    ax.plot(xs, ys, "-o", color="gray", label="merged (w = brevity share)")
    for w, x, y in zip(weights, xs, ys):
        ax.annotate(f"{w:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for name, marker in (("warm_start", "s"), ("accuracy", "^"), ("brevity", "v"), ("grpo_length", "D"),
                         ("recut_chosen", "*")):
        s = summary[name]
        ax.errorbar(s["length"]["mean"], s["accuracy"]["mean"],
                    xerr=[[s["length"]["mean"] - s["length"]["ci_low"]], [s["length"]["ci_high"] - s["length"]["mean"]]],
                    yerr=[[s["accuracy"]["mean"] - s["accuracy"]["ci_low"]],
                          [s["accuracy"]["ci_high"] - s["accuracy"]["mean"]]],
                    fmt=marker, markersize=9 if name == "recut_chosen" else 7, capsize=3, label=name)
    ax.set_xlabel("mean response length (tokens), test split")
    ax.set_ylabel("accuracy (pass@1), test split")
    ax.set_title("ReCUT on stepsum (mean over seeds, 95% intervals)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/recut"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--grpo-steps", type=int, default=0, help="steps of the GRPO arm (0: --steps), e.g. to match "
                    "the sampled tokens of ReCUT's trials")
    ap.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--merge-method", choices=["linear", "ties", "dare_ties"], default="linear",
                    help="how the two DPO models are merged (ties / dare_ties: against the warm start)")
    ap.add_argument("--density", type=float, default=1.0, help="ties / dare_ties: share of task-vector entries kept")
    ap.add_argument("--scale", type=float, default=1.0, help="ties / dare_ties: λ on the merged task vector")
    ap.add_argument("--tolerance", type=float, default=0.02, help="validation accuracy a shorter merge may lose")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--set", action="append", default=[], help="override for the sft, every train and the evaluations "
                    "(repeatable), e.g. task.stratify_terms=true")
    ap.add_argument("--merged-only", action="store_true", help="evaluate only the merged models (and choose the "
                    "weight): enough to re-check the choice on runs already in OUT")
    ap.add_argument("--dpo-set", action="append", default=[], help="override for the two DPO runs only (repeatable)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    per_seed = {}
    for seed in range(args.seeds):
        per_seed[seed] = run_seed(seed, args.out, args)
        names = [*([] if args.merged_only else ["warm_start", *ARMS]), *(f"merged_{w:g}" for w in args.weights),
                 "recut_chosen"]
        summary = summarise(per_seed, names)
        (args.out / "results.json").write_text(json.dumps({"per_seed": per_seed, "summary": summary,
                                                           "args": {k: str(v) for k, v in vars(args).items()}},
                                                          indent=1))
        if not args.merged_only:
            plot(summary, args.weights, args.out / "recut_pareto.png")
        print(f"seed {seed} done: " + ", ".join(f"{n} {summary[n]['accuracy']['mean']:.3f}/"
                                                f"{summary[n]['length']['mean']:.1f}" for n in names), flush=True)


if __name__ == "__main__":
    main()
