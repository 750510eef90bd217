"""How well an implicit PRM [159] finds the first wrong step on stepsum: the AUROC of its step scores.

For each run directory (a PRIME run: a score component with ``phi`` and ``reference`` in its checkpointed state),
the newest checkpoint's PRM scores responses sampled on the held-out split: by the run's frozen reference (the
warm start: the same responses for every run of one warm start) or by the run's trained policy (``--sampler
policy``). Each response is cut into steps (`stepsum.split_steps`, a token per character), a step's score is the
sum of its tokens' ``β·log πφ/πref`` (the implicit Q's increment), and the step checker (`check_steps`) labels
steps: the first wrong one is positive; steps before it (all steps of a right response) are negative; steps after
it are left out (they may carry the error). AUROC = P(score of a positive < score of a negative) (ties count ½).
Two references: the same with the PRM's reference in place of φ (every score 0: 0.5), and the sampler's own
surprise, the step's summed −log πref.

    python benchmarks/implicit_prm_auroc.py runs/prime/prime_stepsum/seed0 ... --out docs/rewards/auroc.json
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch

from outrider.checkpoint import list_checkpoints, read_state
from outrider.data import Start, pack
from outrider.envs.stepsum import check_steps, split_steps
from outrider.explore.rollout import rollout
from outrider.observe.report import bootstrap_stats
from outrider.policy.model import Policy
from outrider.recipe import load_recipe
from outrider.trainer import build_task, sampling_params


def auroc(positive: list[float], negative: list[float]) -> float:
    """P(a positive scores above a negative), ties ½ (the Mann–Whitney U over |P|·|N|)."""
    if not positive or not negative:
        return float("nan")
    p, n = np.asarray(positive)[:, None], np.asarray(negative)[None, :]
    return float(((p > n).sum() + 0.5 * (p == n).sum()) / (p.size * n.size))


def load_prm(run: Path) -> tuple[Policy, Policy, Policy, float, object]:
    """(policy, φ, reference, β, recipe) of a run's newest checkpoint."""
    recipe = load_recipe(run / "recipe.yaml")
    ckpt = list_checkpoints(run)[-1]
    policy = Policy.load(ckpt)
    state = read_state(ckpt)
    where, prm = next((k, v) for k, v in state["pieces"].items() if isinstance(v, dict) and "phi" in v)
    beta = recipe.score[int(where[len("score["):-1])]["beta"]
    phi, ref = copy.deepcopy(policy), copy.deepcopy(policy)
    phi.load_state_dict(prm["phi"])
    ref.load_state_dict(prm["reference"])
    return policy, phi.eval(), ref.eval(), beta, recipe


def sample(sampler: Policy, task, recipe, split: str, prompts: int, samples: int, seed: int) -> list:
    """`samples` responses to each of the split's first `prompts` problems, at the recipe's sampling settings."""
    starts = [Start(seed=p, group_id=p) for p in range(prompts) for _ in range(samples)]
    return rollout(sampler, lambda: task.make_env(split), starts, sampling_params(recipe),
                   torch.Generator().manual_seed(seed), 1)


@torch.no_grad()
def step_table(episodes: list, phi: Policy, ref: Policy, beta: float, task, split: str) -> dict[str, list]:
    """Every labelled step of `episodes` (see the module docstring) with its PRM score and surprise."""
    batch = pack(episodes, ref.pad_id, ref.bos_id)
    lp_phi = phi.score(batch.input_ids, batch.attention_mask).logprobs
    lp_ref = ref.score(batch.input_ids, batch.attention_mask).logprobs
    out: dict[str, list] = {"prm": [], "nll": [], "label": [], "correct": []}
    for i, e in enumerate(episodes):
        m = batch.action_mask[i] > 0
        q = (beta * (lp_phi[i] - lp_ref[i]))[m].tolist()
        nll = (-lp_ref[i])[m].tolist()
        text = e.turns[0].action
        ends = np.cumsum([len(s) for s in split_steps(text)]).tolist()
        ends[-1] = len(q)  # the end-of-sequence token belongs to the answer step
        check = check_steps(task.problem(split, e.seed)["metadata"]["terms"], text)
        last = len(ends) if check.first_wrong is None else check.first_wrong + 1
        start = 0
        for k, end in enumerate(ends[:last]):
            out["prm"].append(float(sum(q[start:end])))
            out["nll"].append(float(sum(nll[start:end])))
            out["label"].append(int(k == check.first_wrong))
            start = end
        out["correct"].append(bool(e.success))
    return out


def step_labels_and_scores(run: Path, prompts: int, samples: int, sampler: str, seed: int) -> dict[str, list]:
    policy, phi, ref, beta, recipe = load_prm(run)
    task = build_task(recipe)
    episodes = sample(ref if sampler == "reference" else policy, task, recipe, "eval", prompts, samples, seed)
    return step_table(episodes, phi, ref, beta, task, "eval")


def aurocs(d: dict[str, list]) -> tuple[float, float]:
    """(AUROC of −PRM step reward, AUROC of the step's surprise) for "first wrong step"."""
    label, score, nll = np.asarray(d["label"]), -np.asarray(d["prm"]), np.asarray(d["nll"])
    return (auroc(score[label == 1].tolist(), score[label == 0].tolist()),
            auroc(nll[label == 1].tolist(), nll[label == 0].tolist()))


def plot(pooled: list[tuple[np.ndarray, np.ndarray, np.ndarray]], path: Path) -> None:
    """Histograms of −(PRM step reward) and of the step's −log πref, first wrong steps against right ones, all
    runs pooled."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = np.concatenate([p[0] for p in pooled])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, (k, name) in zip(axes, ((1, "−(implicit PRM step reward)"), (2, "step surprise −log πref"))):
        values = np.concatenate([p[k] for p in pooled])
        bins = np.linspace(values.min(), values.max(), 40)
        ax.hist(values[label == 0], bins=bins, alpha=0.6, density=True, label="steps before the first wrong one")
        ax.hist(values[label == 1], bins=bins, alpha=0.6, density=True, label="first wrong step")
        ax.set_xlabel(name)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--sampler", choices=["reference", "policy"], default="reference")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--plot", type=Path, help="PNG: step-score histograms, first wrong steps vs right steps")
    args = ap.parse_args()
    rows, pooled = [], []
    for run in args.runs:
        d = step_labels_and_scores(run, args.prompts, args.samples, args.sampler, args.seed)
        label = np.asarray(d["label"])
        score = -np.asarray(d["prm"])  # a low process reward flags a wrong step
        nll = np.asarray(d["nll"])
        a_prm, a_nll = aurocs(d)
        row = {"run": str(run), "auroc_prm": a_prm, "auroc_nll": a_nll,
               "positives": int(label.sum()), "negatives": int((label == 0).sum()),
               "response_accuracy": float(np.mean(d["correct"]))}
        rows.append(row)
        pooled.append((label, score, nll))
        print(json.dumps(row))
    values = np.asarray([[r["auroc_prm"], r["auroc_nll"]] for r in rows])
    low, high = bootstrap_stats(values)
    summary = {"runs": rows, "sampler": args.sampler, "prompts": args.prompts, "samples": args.samples,
               "auroc_prm": [float(values[:, 0].mean()), float(low[0]), float(high[0])],
               "auroc_nll": [float(values[:, 1].mean()), float(low[1]), float(high[1])]}
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))
    if args.plot:
        plot(pooled, args.plot)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
