"""Does XRPO's in-context seeding [134] help a policy on its all-fail prompts? (docs/exploration.md, "XRPO")

Samples ``--samples`` answers for each of ``--prompts`` train prompts of 2–7-digit multisol; on the prompts where
none succeeded, samples again with and without two solved exemplars (other prompts' successes, prompt and answer,
one per line) shown before the prompt, as ``budget``'s ``allocation: xrpo`` does, and prints both success rates.

    python benchmarks/xrpo_seeding_probe.py runs/warm_mixed
"""

from __future__ import annotations

import argparse

import torch

from outrider.data import Start
from outrider.envs import ENVS
from outrider.explore.rollout import rollout
from outrider.policy.model import Policy
from outrider.policy.sampler import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--samples", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    entry, cfg = ENVS.build({"name": "multisol", "min_digits": 2, "max_digits": 7, "min_solutions": 4,
                             "eval_fraction": 0.3, "template": "{question} ->"}, "task")
    task = entry.fn(cfg)
    policy = Policy.load(args.model)
    params = SamplingParams(max_new_tokens=8, temperature=1.0)

    def make():
        return task.make_env("train")

    seeds = list(range(args.prompts))
    base = rollout(policy, make, [Start(seed=s, group_id=s) for s in seeds for _ in range(args.samples)], params,
                   torch.Generator().manual_seed(0))
    solved: dict[int, str] = {}
    for e in base:
        if e.success:
            solved.setdefault(e.seed, e.turns[0].observation + e.response)
    fails = [s for s in seeds if not any(e.success for e in base if e.seed == s)]

    def exemplars(seed: int) -> str:
        return "".join([t + "\n" for k, t in solved.items() if k != seed][:2])

    print(f"prompts solved at least once: {len(solved)}, all-fail: {len(fails)}; a context: {exemplars(-1)!r}")
    for name, seeded in (("plain", False), ("with exemplars", True)):
        starts = [Start(seed=s, group_id=s, context=exemplars(s) if seeded else None, context_at="before_observation")
                  for s in fails for _ in range(args.samples)]
        eps = rollout(policy, make, starts, params, torch.Generator().manual_seed(1))
        print(f"{name}: success on the all-fail prompts {sum(e.success for e in eps) / max(len(eps), 1):.3f}, "
              f"answers {[e.response for e in eps[:6]]}")


if __name__ == "__main__":
    main()
