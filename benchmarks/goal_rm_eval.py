"""Goal-conditioned contrastive RM [87] on stepsum: scoring partial solutions and early abort in majority voting,
against the plain Bradley–Terry RM trained on the same pairs with the same seeds.

The warm start samples `--samples` responses to each of the first `--prompts` held-out problems (the same
responses for every RM). One forward of each RM over a whole response gives its last-layer hidden state h_t at
every response position (the prefix ending at t, by causality); from it two prefix scores: the RM's own reward
head ``r(prefix) = head(h_t)`` and ``Q(prefix) = cos(h_t, g)`` with g the RM's goal state (the contrastive RM's
saved one; for the plain RM the same mean over its own train pairs' preferred final states, computed here).

(a) Partial solutions. AUROC of a score, from the prefix at half the response's tokens, for "the response ends
right"; and for "this step is the first wrong one" (the score after each step up to the first wrong step, as
`implicit_prm_auroc.py` labels steps: a low score flags the step). (b) Early abort [87]: a sample is dropped when
its score falls below a threshold at a position within its first `--abort-steps` steps (its tokens from there
on are saved); the kept samples vote (all of them if none is kept). Thresholds are quantiles of the samples'
minimum score over that window (no labels used), so each quantile drops about that share of samples: over all
samples (one absolute threshold, as the authors' filter) or within each prompt's group (``*_group``: relative to
the samples generated beside it); a random drop of the same share at the window's end is the reference.

    python benchmarks/goal_rm_eval.py recipes/grpo_stepsum.yaml --model runs/sft_stepsum \
        --pairs runs/rm_data/pairs2k.jsonl --bt runs/rm_bt_s{0,1,2} --gc runs/rm_gc_s{0,1,2} \
        --out docs/rewards/goal_rm.json --plot docs/rewards/goal_rm_vote.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from implicit_prm_auroc import auroc, sample  # noqa: E402
from outrider.envs.stepsum import check_steps, split_steps  # noqa: E402
from outrider.observe.report import bootstrap_stats  # noqa: E402
from outrider.policy.model import Policy  # noqa: E402
from outrider.recipe import load_recipe  # noqa: E402
from outrider.score.goal_rm import early_abort_vote, q_values  # noqa: E402
from outrider.score.reward_model import RewardModel, read_examples  # noqa: E402
from outrider.score.rm_training import goal_state, split_by_prompt  # noqa: E402
from outrider.trainer import build_task  # noqa: E402

QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


@torch.no_grad()
def prefix_scores(rm: RewardModel, goal: torch.Tensor, prompts: list[str], responses: list[str],
                  batch_size: int = 64) -> list[dict[str, np.ndarray]]:
    """Per response: ``r`` and ``Q`` at each response position (its tokens, then the EOS)."""
    rm.policy.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        xs, ys = prompts[i:i + batch_size], responses[i:i + batch_size]
        _, hidden, last = rm.forward_hidden([rm.encode(x, y) for x, y in zip(xs, ys)])
        r = rm.policy.value_head(hidden).squeeze(-1)
        q = q_values(hidden, goal)
        for b, y in enumerate(ys):
            n = len(rm.policy.encode(y)) + 1
            sl = slice(int(last[b]) - n + 1, int(last[b]) + 1)
            out.append({"r": r[b, sl].numpy(), "q": q[b, sl].numpy()})
    return out


def step_ends(rm: RewardModel, response: str) -> list[int]:
    """Each step's last response position (token index), the answer step's at the EOS."""
    ends, at = [], 0
    for s in split_steps(response):
        at += len(s)
        ends.append(len(rm.policy.encode(response[:at])) - 1)
    ends[-1] = len(rm.policy.encode(response))
    return ends


def evaluate(rm: RewardModel, goal: torch.Tensor, episodes: list, task, abort_steps: list[int],
             seed: int) -> dict:
    prompts = [e.turns[0].observation for e in episodes]
    responses = [e.response for e in episodes]
    scores = prefix_scores(rm, goal, prompts, responses)
    out: dict = {}
    correct = np.asarray([bool(e.success) for e in episodes])
    for key in ("r", "q"):
        half = np.asarray([s[key][(len(s[key]) - 1) // 2] for s in scores])
        final = np.asarray([s[key][-1] for s in scores])
        steps_pos, steps_neg = [], []
        for e, s, y in zip(episodes, scores, responses):
            check = check_steps(task.problem("eval", e.seed)["metadata"]["terms"], y)
            ends = step_ends(rm, y)
            upto = len(ends) if check.first_wrong is None else check.first_wrong + 1
            for k in range(upto):
                (steps_pos if k == check.first_wrong else steps_neg).append(-float(s[key][ends[k]]))
        out[f"auroc_half_{key}"] = auroc(half[correct].tolist(), half[~correct].tolist())
        out[f"auroc_final_{key}"] = auroc(final[correct].tolist(), final[~correct].tolist())
        out[f"auroc_first_wrong_{key}"] = auroc(steps_pos, steps_neg)
    # (b) early abort: the window is each response's first `k` steps, for each k of `abort_steps`
    groups: dict[int, list[int]] = {}
    for i, e in enumerate(episodes):
        groups.setdefault(e.group_id, []).append(i)
    answers = [task.parse(y) for y in responses]
    truth = {g: task.problem("eval", episodes[rows[0]].seed)["answer"] for g, rows in groups.items()}
    out["vote_all"] = float(np.mean([early_abort_vote([answers[i] for i in rows], [scores[i]["q"] for i in rows],
                                                      -np.inf, [1] * len(rows))[0] == truth[g]
                                     for g, rows in groups.items()]))
    rng = np.random.default_rng(seed)
    for k_steps in abort_steps:
        windows = [step_ends(rm, y)[min(k_steps, len(split_steps(y))) - 1] + 1 for y in responses]
        for key in ("r", "q", "r_group", "q_group", "random"):
            out[f"vote_{key}_w{k_steps}"] = vote_curve(scores, key, windows, groups, answers, truth, rng)
    return out


def vote_curve(scores: list, key: str, windows: list[int], groups: dict, answers: list, truth: dict,
               rng: np.random.Generator) -> list[dict]:
    """Vote accuracy, share of tokens saved and share of samples dropped at each threshold quantile."""
    curve = []
    for quant in QUANTILES:
        if key == "random":
            # a random share `quant` is dropped at the window's end: its score is below the threshold there
            seqs = [np.where(np.arange(len(s["q"])) == windows[i] - 1, -1.0, 1.0) if rng.random() < quant
                    else np.ones(len(s["q"])) for i, s in enumerate(scores)]
            threshold = 0.0
        else:
            seqs = [s[key.removesuffix("_group")] for s in scores]
            threshold = float(np.quantile([seqs[i][:windows[i]].min() for i in range(len(seqs))], quant))
        right, saved, total, dropped = [], 0, 0, 0
        for g, rows in groups.items():
            if key.endswith("_group"):
                # relative to the group's samples at the same point (they are generated side by side)
                threshold = float(np.quantile([seqs[i][:windows[i]].min() for i in rows], quant))
            vote, s_, t_ = early_abort_vote([answers[i] for i in rows], [seqs[i] for i in rows], threshold,
                                            [windows[i] for i in rows])
            right.append(vote == truth[g])
            saved, total = saved + s_, total + t_
            dropped += sum(seqs[i][:windows[i]].min() < threshold for i in rows)
        curve.append({"quantile": quant, "vote": float(np.mean(right)), "tokens_saved": saved / total,
                      "dropped": dropped / sum(len(r) for r in groups.values())})
    return curve


def load(path: Path, pairs: list) -> tuple[RewardModel, torch.Tensor]:
    """A saved RM and its goal state (saved by the contrastive option, else the same mean over its train pairs)."""
    rm = RewardModel.load(path)
    if "goal_state" in rm.meta:
        return rm, torch.tensor(rm.meta["goal_state"])
    train_rows, _ = split_by_prompt(pairs, rm.meta.get("heldout_share", 0.1), rm.meta["seed"])
    return rm, goal_state(rm, train_rows)


def summarise(rows: list[dict]) -> dict:
    """Mean and 95% bootstrap interval over seeds of every scalar and of every curve point."""
    out = {}
    for k, v in rows[0].items():
        if isinstance(v, float):
            vals = np.asarray([[r[k]] for r in rows])
            lo, hi = bootstrap_stats(vals)
            out[k] = [float(vals.mean()), float(lo[0]), float(hi[0])]
        elif isinstance(v, list):
            out[k] = []
            for j, point in enumerate(v):
                vals = np.asarray([[r[k][j]["vote"], r[k][j]["tokens_saved"], r[k][j]["dropped"]] for r in rows])
                lo, hi = bootstrap_stats(vals)
                out[k].append({"quantile": point["quantile"], **{
                    name: [float(vals[:, c].mean()), float(lo[c]), float(hi[c])]
                    for c, name in enumerate(("vote", "tokens_saved", "dropped"))}})
    return out


def plot(summary: dict, path: Path, window: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for arm, key, label in (("gc", "vote_q_group", "contrastive RM, Q (within group)"),
                            ("gc", "vote_q", "contrastive RM, Q (absolute)"),
                            ("bt", "vote_r_group", "BT RM, r (within group)"), ("bt", "vote_r", "BT RM, r (absolute)"),
                            ("bt", "vote_random", "random drop")):
        pts = summary[arm][f"{key}_w{window}"]
        x = [p["tokens_saved"][0] for p in pts]
        y = [p["vote"][0] for p in pts]
        err = [[p["vote"][0] - p["vote"][1] for p in pts], [p["vote"][2] - p["vote"][0] for p in pts]]
        ax.errorbar(x, y, yerr=err, marker="o", ms=3, capsize=2, label=label)
    ax.axhline(summary["bt"]["vote_all"][0], color="k", lw=0.8, ls="--", label="vote of all samples")
    ax.set_xlabel(f"share of tokens saved (filter over the first {window} step(s))")
    ax.set_ylabel("majority-vote accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--model", type=Path, required=True, help="the warm start that samples the responses")
    ap.add_argument("--pairs", type=Path, required=True, help="the RMs' training pairs (for the BT RM's goal)")
    ap.add_argument("--bt", nargs="+", type=Path, required=True, help="plain Bradley–Terry RMs, one per seed")
    ap.add_argument("--gc", nargs="+", type=Path, required=True, help="contrastive RMs, one per seed")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--abort-steps", type=int, nargs="+", default=[1, 2], help="windows: the first k steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    recipe = load_recipe(args.recipe)
    task = build_task(recipe)
    episodes = sample(Policy.load(args.model).eval(), task, recipe, "eval", args.prompts, args.samples, args.seed)
    pairs = read_examples(str(args.pairs))[1]
    summary: dict = {"prompts": args.prompts, "samples": args.samples, "abort_steps": args.abort_steps,
                     "sample_accuracy": float(np.mean([e.success for e in episodes]))}
    for arm, paths in (("bt", args.bt), ("gc", args.gc)):
        rows = []
        for p in paths:
            rm, goal = load(p, pairs)
            row = evaluate(rm, goal, episodes, task, args.abort_steps, args.seed)
            row["heldout_pair_accuracy"] = float(rm.meta["heldout"]["accuracy"])
            rows.append(row)
            print(json.dumps({"rm": str(p), **{k: v for k, v in row.items() if isinstance(v, float)}}), flush=True)
        summary[arm] = summarise(rows)
        summary[arm]["per_seed"] = rows
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1))
    if args.plot:
        plot(summary, args.plot, args.abort_steps[0])


if __name__ == "__main__":
    main()
