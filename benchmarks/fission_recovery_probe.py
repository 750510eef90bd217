"""Can a calculator policy recover from its own first invalid action, and what does Fission's feedback do to it?

Samples 4 episodes on each of 256 train questions (horizon `--max-turns`), keeps the failed ones whose first invalid
action left a turn after it (Fission's candidates), and samples 4 recovery rollouts from the state after the error
for the first 40 of them (Fission's `Start`: the prefix given, the snapshot restored) with three feedbacks: none
(the env's error text only, `feedback: env`), the task's hint after the error text (`feedback: hint`, the piece's
placement) and the hint before it (where the warm start's `hint_fraction` demonstrations put it). Prints the
recovery success of each, and two recovery rollouts per feedback.

    python benchmarks/fission_recovery_probe.py runs/warm_calc_hint --max-turns 8
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from outrider.data import Start
from outrider.envs import ENVS
from outrider.explore.rollout import rollout
from outrider.explore.step_check import first_invalid
from outrider.policy.model import Policy
from outrider.policy.sampler import SamplingParams

TASK = {"name": "calculator", "digits": 2, "terms": 2, "ops": ["*"], "style": "expression", "format": "compact",
        "eval_size": 128, "recovery_fraction": 0.2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--max-turns", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    policy = Policy.load(args.checkpoint)
    entry, cfg = ENVS.build(dict(TASK, max_turns=args.max_turns), "task")
    task = entry.fn(cfg)
    make = lambda: task.make_env("train")  # noqa: E731
    params = SamplingParams(max_new_tokens=16, temperature=1.0)
    starts = [Start(seed=s, group_id=s) for s in range(256) for _ in range(4)]
    episodes = rollout(policy, make, starts, params, torch.Generator().manual_seed(0), max_turns=task.max_turns,
                       snapshots=True)
    erred = [(e, k) for e in episodes if (k := first_invalid(e)) is not None]
    print(f"success {sum(e.success for e in episodes) / len(episodes):.3f}; episodes with an invalid action "
          f"{len(erred)} of {len(episodes)}, of which succeeded anyway {sum(e.success for e, _ in erred)}")
    candidates = [(e, k) for e, k in erred if not e.success and k + 1 < len(e.turns)]
    at = Counter(k for _, k in candidates)
    print(f"fission candidates {len(candidates)}, first error at turn: "
          + ", ".join(f"{k}: {n}" for k, n in sorted(at.items())))
    candidates = candidates[:40]
    for label, place in (("env text only", None), ("hint after the error text", "after_observation"),
                         ("hint before the error text", "before_observation")):
        recovery = []
        for e, k in candidates:
            context = None
            if place is not None:
                env = make()
                env.restore(e.turns[k + 1].snapshot)
                context = f"Hint: {task.hint(env)}\n"
            recovery += [Start(seed=e.seed, group_id=0, prefix=e.turns[:k + 1], snapshot=e.turns[k + 1].snapshot,
                               context=context, keep_context=True, origin="retry",
                               context_at=place or "after_observation") for _ in range(4)]
        out = rollout(policy, make, recovery, params, torch.Generator().manual_seed(1), max_turns=task.max_turns)
        print(f"{label}: {len(candidates)} cut episodes, {len(out)} recovery rollouts, success "
              f"{sum(r.success for r in out) / max(len(out), 1):.3f}")
        for r in out[:8:4]:
            print("   ", " | ".join(f"{t.observation.strip()} -> {t.action}" for t in r.turns[len(r.turns) - 3:]))


if __name__ == "__main__":
    main()
