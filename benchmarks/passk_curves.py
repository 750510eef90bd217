"""pass@k curves (k = 1..n) of the base model and of each recipe's final checkpoint, from an `outrider compare`
directory (docs/exploration.md, "RepExp: pass@k curves"). Each seed's newest checkpoint is evaluated again on the
held-out prompts with the run's own eval seed (the same draws as its last logged evaluation), giving each prompt's
correct count of n; the base curve comes from each seed's `eval_base.json`. Prints pass@k at a few k and the
crossover k* (smallest k where the base's pass@k ≥ the model's) per seed and mean with a 95% bootstrap interval
over seeds; writes a plot (mean curve over seeds, band: min to max over seeds) and a JSON of the curves.

    python benchmarks/passk_curves.py runs/repexp_compare --out docs/bonuses/repexp_passk.png
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from outrider.checkpoint import list_checkpoints, newest_intact  # noqa: E402
from outrider.observe.diagnostics import crossover_k, pass_at_k_curve  # noqa: E402
from outrider.observe.evaluate import evaluate_detailed  # noqa: E402
from outrider.policy.model import Policy  # noqa: E402
from outrider.recipe import load_recipe  # noqa: E402
from outrider.trainer import build_task, sampling_params  # noqa: E402

KS = (1, 2, 4, 8, 16, 32, 64)


def final_correct(run: Path) -> tuple[list[int], int, float]:
    """Each held-out prompt's correct count at the run's newest checkpoint, the samples per prompt, and pass@1."""
    rec = load_recipe(run / "recipe.yaml")
    _, policy = newest_intact(list_checkpoints(run), partial(Policy.load, chat_template=rec.policy.chat_template,
                                                             where="checkpoint"), "evaluating")
    o = rec.observe
    metrics, record = evaluate_detailed(policy, build_task(rec), o.eval_prompts, o.eval_samples, [1],
                                        sampling_params(rec, o.eval_temperature), seed=rec.train.seed,
                                        diagnostics=False)
    return record.correct, record.samples, metrics["pass@1"]


def interval(values: list[float], draws: int = 2000) -> tuple[float, float, float]:
    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(0)
    means = v[rng.integers(0, len(v), (draws, len(v)))].mean(1)
    return float(v.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("compare_dir", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    curves: dict[str, list[list[float]]] = {"base": []}
    kstar: dict[str, list[int]] = {}
    for recipe in sorted(p for p in args.compare_dir.iterdir() if p.is_dir()):
        curves[recipe.name], kstar[recipe.name] = [], []
        for run in sorted(recipe.glob("seed*")):
            correct, n, p1 = final_correct(run)
            base = json.loads((run / "eval_base.json").read_text())
            curves[recipe.name].append(pass_at_k_curve(correct, n))
            if len(curves["base"]) < len(list(recipe.glob("seed*"))):
                curves["base"].append(pass_at_k_curve(base["correct"], n))
            k = crossover_k(base["correct"], correct, n)
            kstar[recipe.name].append(k if k is not None else n + 1)
            print(f"{recipe.name}/{run.name}: pass@1 {p1:.3f}, k* {kstar[recipe.name][-1]}")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    summary: dict[str, dict] = {}
    for i, (name, cs) in enumerate(curves.items()):
        arr = np.array(cs)
        ks = np.arange(1, arr.shape[1] + 1)
        ax.plot(ks, arr.mean(0), color="k" if name == "base" else f"C{i}", label=name)
        ax.fill_between(ks, arr.min(0), arr.max(0), color="k" if name == "base" else f"C{i}", alpha=0.15)
        summary[name] = {f"pass@{k}": interval(list(arr[:, k - 1])) for k in KS if k <= arr.shape[1]}
        if name in kstar:
            summary[name]["k*"] = interval(kstar[name])
            summary[name]["k* per seed"] = kstar[name]
            # the crossover of the seed-mean curves (n + 1: never below the base)
            base_mean = np.array(curves["base"]).mean(0)
            summary[name]["k* of mean curves"] = next(
                (k + 1 for k, (b, c) in enumerate(zip(base_mean, arr.mean(0))) if b >= c - 1e-12), arr.shape[1] + 1)
        print(name, "  ".join(f"{k} {m:.3f} [{lo:.3f}, {hi:.3f}]" for k, v in summary[name].items()
                              if isinstance(v, tuple) for m, lo, hi in [v]),
              "  k* per seed", summary[name].get("k* per seed"), " k* of mean curves",
              summary[name].get("k* of mean curves"))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("held-out pass@k")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    args.out.with_suffix(".json").write_text(json.dumps({"curves": {k: np.array(v).mean(0).tolist()
                                                                    for k, v in curves.items()},
                                                         "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
