"""Is a stepsum hard bucket out of the warm start's reach, and can a teacher reach it? For a model directory (a warm
start) or a run's checkpoint, under a recipe's task (with `--set` overrides, e.g. more terms than the warm start's
demonstrations had): sample `--group` answers to each of `--prompts` held-out prompts and report, per number of
terms, the prompts, the solve rate and the share of prompts solved by none of the samples (the all-fail share), and
the mean probability per token the policy gives the worked solution (the teacher path of `teachers:
[demonstrations]`), each worked solution played through the env and checked. Also checks that no held-out problem
occurs among the first `--train-check` training problems.

    python benchmarks/hard_bucket_probe.py recipes/grpo_stepsum.yaml runs/warm_hb34 --set task.max_terms=6
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch

from outrider.api import load_recipe
from outrider.checkpoint import list_checkpoints
from outrider.data import Start
from outrider.envs.stepsum import trace
from outrider.explore.rollout import rollout
from outrider.policy.continuation import continuation_logprobs
from outrider.policy.model import Policy
from outrider.trainer import build_task, sampling_params


def model_dir(path: Path) -> Path:
    """A model directory as given, or a run directory's newest checkpoint."""
    return path if (path / "config.json").exists() else list_checkpoints(path)[-1]


def teacher_prob(policy: Policy, prompt: str, solution: str) -> float:
    """Mean probability per token the policy gives `solution` after `prompt` (with the end token)."""
    context = ([policy.bos_id] if policy.bos_id is not None else []) + policy.encode_observation(prompt, True)
    lp = continuation_logprobs(policy, [(context, policy.encode(solution) + [policy.eos_id])])[0]
    return float(torch.tensor(lp).exp().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("model", type=Path)
    ap.add_argument("--set", dest="set_", action="append", default=[])
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--split", default="eval")
    ap.add_argument("--train-check", type=int, default=20000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    recipe = load_recipe(args.recipe, args.set_)
    task, policy = build_task(recipe), Policy.load(model_dir(args.model))
    starts = [Start(seed=p, group_id=p) for p in range(args.prompts) for _ in range(args.group)]
    eps = rollout(policy, lambda: task.make_env(args.split), starts, sampling_params(recipe),
                  torch.Generator().manual_seed(777), task.max_turns)
    by_n: dict[int, list] = defaultdict(list)
    env = task.make_env(args.split)
    for p in range(args.prompts):
        prob = task.problem(args.split, p)
        terms = prob["metadata"]["terms"]
        hits = [e.success for e in eps[p * args.group:(p + 1) * args.group]]
        env.reset(p)
        _, reward, *_ = env.step(trace(terms, "short"))
        by_n[len(terms)].append((sum(hits), reward, teacher_prob(policy, task.prompt(prob), trace(terms, "short"))))
    print("terms | prompts | solve rate | all-fail share | worked solution verified | its mean p/token")
    for n in sorted(by_n):
        v = by_n[n]
        print(f"{n} | {len(v)} | {sum(h for h, _, _ in v) / (len(v) * args.group):.3f} | "
              f"{sum(h == 0 for h, _, _ in v) / len(v):.3f} | {sum(r == 1.0 for _, r, _ in v) / len(v):.3f} | "
              f"{sum(q for _, _, q in v) / len(v):.3f}")
    if args.split == "eval" and args.train_check:
        held = {task.problem("eval", p)["question"] for p in range(args.prompts)}
        overlap = sum(task.problem("train", s)["question"] in held for s in range(args.train_check))
        print(f"held-out problems among the first {args.train_check} training problems: {overlap}")
    some = eps[:3 * args.group:args.group]
    for e in some:
        print("sample:", repr(task.problem(args.split, e.seed)["question"]), "->", repr(e.response), e.success)


if __name__ == "__main__":
    main()
