"""Head-to-head under an intransitive preference oracle: the final policies of DNO and of GRPO on a Bradley–Terry
reward model (`outrider compare` runs of dno_cyclic_multisol.yaml and rm_cyclic_multisol.yaml), and their shared
warm start, play each other under the recipes' `cyclic` oracle on the held-out prompts.

For each seed every policy samples `--samples` responses to each of the first `--prompts` held-out problems
(temperature 1, the same prompts for all). The win rate of A against B is the oracle's mean ``P(a ≻ b)`` over every
(a, b) of A's and B's samples of a prompt, averaged over prompts (½: a draw; a policy against itself is ½). Also per
policy: accuracy, the share of each cycle class among its *right* answers (the cycle only decides between right
ones) and that distribution's total-variation distance from uniform (0 at the mixed equilibrium, 2/3 when collapsed
on one class). Means over seeds with 95% bootstrap intervals; OUT/head2head.json and OUT/head2head.png.

    python benchmarks/cyclic_head2head.py runs/cyclic --warm runs/sft_multisol --out docs/preference/cyclic
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from implicit_prm_auroc import sample  # noqa: E402
from outrider.checkpoint import list_checkpoints  # noqa: E402
from outrider.explore import EXPLORE  # noqa: E402
from outrider.observe.report import stat_of  # noqa: E402
from outrider.policy.model import Policy  # noqa: E402
from outrider.recipe import load_recipe  # noqa: E402
from outrider.score.preference import PREFERENCES, response_class  # noqa: E402
from outrider.trainer import build_task  # noqa: E402

ARMS = {"dno": "dno_cyclic_multisol", "bt_rm_grpo": "rm_cyclic_multisol"}


def win_rate(oracle, a: list, b: list) -> float:
    """Mean P(a ≻ b) over A's and B's samples of one prompt."""
    p = oracle(a + b)
    return float(p[: len(a), len(a):].mean())


def class_shares(episodes: list, n: int) -> list[float]:
    right = [response_class(e, n) for e in episodes if e.success]
    return [right.count(c) / len(right) if right else float("nan") for c in range(n)]


def play_seed(root: Path, warm: Path, seed: int, args: argparse.Namespace) -> dict:
    recipe = load_recipe(root / ARMS["dno"] / f"seed{seed}" / "recipe.yaml")
    _, ex = EXPLORE.build(recipe.explore, "explore")
    oracle = PREFERENCES.create(ex.oracle)
    n = ex.oracle.get("classes", 3)
    task = build_task(recipe)
    paths = {"warm_start": warm, **{arm: list_checkpoints(root / stem / f"seed{seed}")[-1]
                                    for arm, stem in ARMS.items()}}
    groups = {}
    for name, path in paths.items():
        torch.manual_seed(seed)
        eps = sample(Policy.load(path).eval(), task, recipe, "eval", args.prompts, args.samples, 1000 + seed)
        by_prompt: dict[int, list] = {}
        for e in eps:
            by_prompt.setdefault(e.group_id, []).append(e)
        groups[name] = by_prompt
    out: dict = {"policies": {}, "wins": {}}
    for name, by_prompt in groups.items():
        eps = [e for g in by_prompt.values() for e in g]
        shares = class_shares(eps, n)
        out["policies"][name] = {"accuracy": sum(e.success for e in eps) / len(eps), "class_shares": shares,
                                 "tv_from_uniform": 0.5 * sum(abs(s - 1 / n) for s in shares)}
    for a in groups:
        for b in groups:
            if a != b:
                out["wins"][f"{a}>{b}"] = float(np.mean([win_rate(oracle, groups[a][k], groups[b][k])
                                                         for k in groups[a]]))
    return out


def stat_dict(values: list[float]) -> dict:
    """Mean and 95% interval over seeds of the finite values; all None when there are none (a policy without a
    right answer has no class shares)."""
    stat = stat_of(values)
    return vars(stat) if stat is not None else {"mean": None, "ci_low": None, "ci_high": None, "n": 0, "values": []}


def summarise(per_seed: dict[int, dict]) -> dict:
    first = next(iter(per_seed.values()))
    out: dict = {"policies": {}, "wins": {}}
    for name, row in first["policies"].items():
        out["policies"][name] = {k: stat_dict([s["policies"][name][k] for s in per_seed.values()])
                                 for k in ("accuracy", "tv_from_uniform")}
        out["policies"][name]["class_shares"] = [
            stat_dict([s["policies"][name]["class_shares"][c] for s in per_seed.values()])
            for c in range(len(row["class_shares"]))]
    for key in first["wins"]:
        out["wins"][key] = stat_dict([s["wins"][key] for s in per_seed.values()])
    return out


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["policies"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    n = len(summary["policies"][names[0]]["class_shares"])
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        shares = summary["policies"][name]["class_shares"]
        if any(s["mean"] is None for s in shares):
            continue  # no right answer in any seed: no shares to draw
        means = [s["mean"] for s in shares]
        err = [[s["mean"] - s["ci_low"] for s in shares], [s["ci_high"] - s["mean"] for s in shares]]
        ax1.bar(np.arange(n) + i * width, means, width, yerr=err, capsize=3, label=name)
    ax1.axhline(1 / n, color="gray", ls="--", lw=1, label="equilibrium (uniform)")
    ax1.set_xticks(np.arange(n) + 0.4 - width / 2, [f"class {c}" for c in range(n)])
    ax1.set_ylabel("share of right answers")
    ax1.set_title("cycle classes of right answers (held out)")
    ax1.legend(fontsize=8)
    grid = np.array([[0.5 if a == b else summary["wins"][f"{a}>{b}"]["mean"] for b in names] for a in names])
    im = ax2.imshow(grid, vmin=0, vmax=1, cmap="RdBu")
    for i in range(len(names)):
        for j in range(len(names)):
            ax2.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center")
    ax2.set_xticks(range(len(names)), names, fontsize=8)
    ax2.set_yticks(range(len(names)), names, fontsize=8)
    ax2.set_title("P(row ≻ column) under the oracle")
    fig.colorbar(im, ax=ax2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="the outrider compare output directory")
    ap.add_argument("--warm", type=Path, required=True, help="the shared warm start (a model directory)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    per_seed = {k: play_seed(args.root, args.warm, k, args) for k in range(args.seeds)}
    summary = summarise(per_seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "head2head.json").write_text(json.dumps({"per_seed": per_seed, "summary": summary,
                                                         "args": {k: str(v) for k, v in vars(args).items()}},
                                                        indent=1))
    plot(summary, args.out / "head2head.png")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
