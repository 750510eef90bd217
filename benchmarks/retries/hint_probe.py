"""Does a warm-started policy act on a hint shown at an R³L retry's pivot? On a recipe's task (any task with the
`hint` and `step_ok` hooks): sample one first attempt per train seed with no hint; for every failed one, find its
pivot (the first step the task's checker rejects, R³L's `pivot: [checker]`) and retry it from there, as
`explore: reflect_retry` does (prefix replayed, the hint shown before the pivot's observation), three ways: with no
hint, with the task's hint (`task.hint(env)` at the pivot: the oracle's next action), and with a wrong hint (an
action of the task's action set the checker rejects at the pivot, where one is given). Prints, per way, the retries'
success and how often the pivot action equals the hint's action (the oracle's, or the wrong one). First, with
--wrong, the mean probability of a random action `a` of that set at a demonstration turn (the first 3 turns of
40 demonstrations) with and without `Hint: a` before the observation: whether the policy reads a hint at all.

    python benchmarks/retries/hint_probe.py RECIPE MODEL_DIR [--seeds 128] [--wrong l,r,f,p,d,t]

Where a hint helps, the oracle row's success is above the no-hint row's: the condition for R³L's language-guided
retry to add anything over an on-policy restart from the pivot (docs/exploration.md, Retries).
"""

from __future__ import annotations

import argparse
import math
import random

import torch

from outrider.data import Start
from outrider.envs.base import close_env
from outrider.explore.rollout import rollout
from outrider.explore.step_check import env_at, first_wrong_step, time_limit
from outrider.policy.model import Policy
from outrider.policy.sampler import SamplingParams
from outrider.recipe import load_recipe
from outrider.trainer import build_task

TEMPLATE = "Hint: {hint}\n"  # reflect_retry's default hint template


def hint_lift(policy: Policy, task: object, actions: list[str], rng: random.Random) -> tuple[float, float, int]:
    """Mean p(a | observation) and p(a | hint naming a, observation) for a random `a` of `actions` at the first 3
    turns of 40 demonstrations, and the number of turns."""
    def prob(ids: list[int], action: str) -> float:
        a = policy.encode(action)
        x = torch.tensor([ids + a])
        with torch.no_grad():
            lp = torch.log_softmax(policy.model(x).logits[0].float(), -1)
        return math.exp(sum(lp[len(ids) - 1 + i, t].item() for i, t in enumerate(a)))
    base = hinted = 0.0
    n = 0
    for demo in task.demonstrations(list(range(7000, 7040))):  # type: ignore[attr-defined]
        ctx = [policy.bos_id] if policy.bos_id is not None else []
        for j, (obs, action) in enumerate(demo.turns[:3]):
            a = rng.choice(actions)
            base += prob(ctx + policy.encode_observation(obs, first=j == 0), a)
            hinted += prob(ctx + policy.encode_observation(TEMPLATE.format(hint=a) + obs, first=j == 0), a)
            n += 1
            ctx += policy.encode_observation(obs, first=j == 0) + policy.encode(action) + [policy.eos_id]
    return base / max(n, 1), hinted / max(n, 1), n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("model")
    ap.add_argument("--seeds", type=int, default=128)
    ap.add_argument("--wrong", default="", help="comma-separated actions to draw a wrong hint from (empty: none)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rec = load_recipe(args.recipe, [])
    task = build_task(rec)
    policy = Policy.load(args.model)
    params = SamplingParams(temperature=rec.explore.get("temperature", 1.0),
                            max_new_tokens=rec.explore["max_new_tokens"])
    make = lambda: task.make_env("train")  # noqa: E731
    wrong_pool = [a for a in args.wrong.split(",") if a]
    if wrong_pool:
        policy.eval()
        base, hinted, n = hint_lift(policy, task, wrong_pool, random.Random(0))
        print(f"p(a) of a random action at {n} demonstration turns: {base:.3f} without a hint, {hinted:.3f} with "
              f"'{TEMPLATE.strip().format(hint='a')}'")
    seeds = list(range(5000, 5000 + args.seeds))
    first = rollout(policy, make, [Start(seed=s, group_id=i) for i, s in enumerate(seeds)], params,
                    torch.Generator().manual_seed(0), max_turns=task.max_turns)
    rng = random.Random(0)
    retries = []  # (parent, k, oracle hint, wrong hint)
    for ep in first:
        if ep.success:
            continue
        k, _ = first_wrong_step(task, ep)
        if k is None:
            continue
        with time_limit(task) as clock:
            env, _ = env_at(task, ep, k, clock)
        try:
            oracle = task.hint(env)
            wrong = [a for a in wrong_pool if a != oracle and not task.step_ok(env, a)]
        finally:
            close_env(env)
        retries.append((ep, k, oracle, rng.choice(wrong) if wrong else None))
    print(f"first attempts: {len(first)}, success {sum(e.success for e in first) / len(first):.3f}; "
          f"failed with a pivot: {len(retries)} (mean pivot turn "
          f"{sum(k for _, k, _, _ in retries) / max(len(retries), 1):.2f})")
    ways = [("no hint", lambda o, w: None), ("oracle hint", lambda o, w: o)]
    if wrong_pool:
        ways.append(("wrong hint", lambda o, w: w))
    for label, pick in ways:
        rows = [(ep, k, o, w, pick(o, w)) for ep, k, o, w in retries]
        if label == "wrong hint":
            rows = [r for r in rows if r[4] is not None]
        starts = [Start(seed=ep.seed, group_id=i, prefix=ep.turns[:k],
                        context=TEMPLATE.format(hint=h) if h is not None else None,
                        context_at="before_observation", origin="retry")
                  for i, (ep, k, _, _, h) in enumerate(rows)]
        eps = rollout(policy, make, starts, params, torch.Generator().manual_seed(1), max_turns=task.max_turns)
        n = max(len(eps), 1)
        at_pivot = [e.turns[k].action.strip() if k < len(e.turns) else "" for e, (_, k, _, _, _) in zip(eps, rows)]
        print(f"{label}: retries {len(eps)}, success {sum(e.success for e in eps) / n:.3f}, pivot action = "
              f"oracle's {sum(a == o for a, (_, _, o, _, _) in zip(at_pivot, rows)) / n:.3f}"
              + (f", = the wrong hint {sum(a == w for a, (_, _, _, w, _) in zip(at_pivot, rows)) / n:.3f}"
                 if label == "wrong hint" else ""))


if __name__ == "__main__":
    main()
