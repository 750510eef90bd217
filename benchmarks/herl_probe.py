"""Does the hindsight experience help? On a run's warm-started policy (a step-0 checkpoint of herl_stepsum),
sample `--group` answers to each of `--prompts` train prompts at the run's temperature, then resample every failed
one once at HeRL's guided temperature three ways: with its experience in context (the failed response and the
task's feedback), with no context, and with another failure's experience (a wrong one). Success rates of the three,
and how often a guided answer equals its failed response.

    python benchmarks/herl_probe.py runs/herl_hard_bucket/herl_stepsum/seed0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from outrider.api import load_recipe
from outrider.checkpoint import list_checkpoints
from outrider.data import Start
from outrider.explore.rollout import rollout
from outrider.policy.model import Policy
from outrider.policy.sampler import SamplingParams
from outrider.trainer import build_task, sampling_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--group", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    recipe = load_recipe(args.run / "recipe.yaml")
    task, policy = build_task(recipe), Policy.load(list_checkpoints(args.run)[0])
    from outrider.explore.hindsight import HindsightConfig

    herl = HindsightConfig(**{k: v for k, v in recipe.explore.items() if k != "name"})
    template, temp = herl.template, herl.guided_temperature
    env_of = lambda: task.make_env("train")  # noqa: E731
    starts = [Start(seed=p, group_id=p) for p in range(args.prompts) for _ in range(args.group)]
    first = rollout(policy, env_of, starts, sampling_params(recipe), torch.Generator().manual_seed(1), 1)
    failed = [e for e in first if not e.success]
    env = task.make_env("train")
    texts = []
    for e in failed:
        env.reset(e.seed)
        texts.append(template.format(response=e.response, feedback=task.feedback(env, e.turns[0].action)))
    shifted = texts[len(texts) // 2:] + texts[:len(texts) // 2]  # another failure's experience
    params = SamplingParams(temperature=temp, max_new_tokens=herl.max_new_tokens)
    print(f"first attempts: {len(first)}, success {sum(e.success for e in first) / len(first):.3f}; "
          f"failed: {len(failed)}; guided temperature {temp}")
    for name, ctx in (("experience", texts), ("no context", [None] * len(texts)), ("wrong experience", shifted)):
        again = rollout(policy, env_of, [Start(seed=e.seed, group_id=0, context=c) for e, c in zip(failed, ctx)],
                        params, torch.Generator().manual_seed(2), 1)
        same = sum(a.response == e.response for a, e in zip(again, failed)) / len(failed)
        ended = sum(a.turns[0].action_ids[-1:] == [policy.eos_id] for a in again) / len(failed)
        print(f"{name:17s} success {sum(a.success for a in again) / len(again):.3f}   same as the failed answer "
              f"{same:.3f}   ended with EOS {ended:.3f}")


if __name__ == "__main__":
    main()
