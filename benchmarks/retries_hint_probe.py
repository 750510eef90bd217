"""Does a warm-started calculator policy follow a hint shown before its observation (as R³L's reflection is)?
128 train questions, one episode each, with no hint, the oracle's hint (`Hint: <oracle action>`) and a wrong hint
(`Hint: calc: 11*11`): success, and how often the first action is the oracle's or the wrong hint's.

    python benchmarks/retries_hint_probe.py RUN/checkpoints/step_0
"""

from __future__ import annotations

import sys

import torch

from outrider.data import Start
from outrider.envs import ENVS
from outrider.explore.rollout import rollout
from outrider.policy.model import Policy
from outrider.policy.sampler import SamplingParams

TASK = {"name": "calculator", "digits": 2, "terms": 2, "ops": ["*"], "style": "expression", "format": "compact",
        "max_turns": 4, "eval_size": 128}
WRONG = "calc: 11*11"


def main(checkpoint: str) -> None:
    policy = Policy.load(checkpoint)
    entry, cfg = ENVS.build(TASK, "task")
    task = entry.fn(cfg)
    seeds = list(range(1000, 1128))
    oracle = []
    for s in seeds:
        env = task.make_env("train")
        env.reset(s)
        oracle.append(task.oracle_step(env))
    for label, hints in (("no hint", [None] * len(seeds)), ("oracle hint", [f"Hint: {o}\n" for o in oracle]),
                         ("wrong hint", [f"Hint: {WRONG}\n"] * len(seeds))):
        starts = [Start(seed=s, group_id=0, context=h, context_at="before_observation") for s, h in zip(seeds, hints)]
        eps = rollout(policy, lambda: task.make_env("train"), starts, SamplingParams(max_new_tokens=16),
                      torch.Generator().manual_seed(0), max_turns=task.max_turns)
        first = [e.turns[0].action.strip() for e in eps]
        n = len(eps)
        print(f"{label}: success {sum(e.success for e in eps) / n:.3f}, first action = oracle's "
              f"{sum(a == o for a, o in zip(first, oracle)) / n:.3f}, = the wrong hint {first.count(WRONG) / n:.3f}")


if __name__ == "__main__":
    main(sys.argv[1])
