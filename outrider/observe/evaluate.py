"""Held-out evaluation: unbiased pass@k over `samples` draws per prompt [Chen et al. 2021, Codex]."""

from __future__ import annotations

from math import comb

import torch

from outrider.envs.base import Task
from outrider.explore.rollout import rollout
from outrider.policy.model import Policy
from outrider.policy.sampler import SamplingParams


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 − C(n−c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def evaluate(policy: Policy, task: Task, prompts: int, samples: int, ks: list[int], params: SamplingParams,
             seed: int, chunk: int = 1024) -> dict[str, float]:
    """pass@k for each k, mean accuracy, invalid-answer rate and response length on the first `prompts` held-out
    problems. The same seed gives the same draws, so evaluations along a run share their randomness."""
    generator = torch.Generator(device=policy.device).manual_seed(seed)
    prompts = min(prompts, task.eval_size)
    pairs = [(p, p) for p in range(prompts) for _ in range(samples)]
    episodes = []
    for start in range(0, len(pairs), chunk):
        part = pairs[start:start + chunk]
        episodes += rollout(policy, lambda: task.make_env("eval"), [s for s, _ in part], [g for _, g in part],
                            params, generator, task.max_turns)
    correct = [0] * prompts
    for e in episodes:
        correct[e.group_id] += int(e.success)
    out = {f"pass@{k}": sum(pass_at_k(samples, c, k) for c in correct) / prompts for k in ks}
    out["accuracy"] = sum(correct) / (prompts * samples)
    out["invalid_rate"] = sum(any(t.info.get("invalid") for t in e.turns) for e in episodes) / len(episodes)
    out["response_length"] = sum(e.num_action_tokens for e in episodes) / len(episodes)
    return out
