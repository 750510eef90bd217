"""Held-out evaluation: unbiased pass@k over `samples` draws per prompt [Chen et al. 2021, Codex], with the
exploration diagnostics of `outrider.observe.diagnostics` (entropy, answer diversity, effective rank, and —
given the base model's record — support change and the pass@k crossover [37])."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from outrider.data import Episode, Start, pack
from outrider.envs.base import Task
from outrider.envs.time_limit import DEFAULT_STEP_TIMEOUT_S
from outrider.envs.workers import WorkerPool
from outrider.explore.rollout import rollout
from outrider.observe.diagnostics import (answer_diversity, correct_support, crossover_k, effective_rank,
                                          pass_at_k, support_change, token_entropy_stats)
from outrider.observe.metrics import agent_metrics
from outrider.policy.model import Policy
from outrider.policy.sampler import SamplingParams

__all__ = ["EvalRecord", "eval_episodes", "evaluate", "evaluate_detailed", "pass_at_k"]

RANK_PROMPTS = 32  # prompts whose responses get a hidden-state forward for the effective rank (bounded cost)


@dataclass
class EvalRecord:
    """What a later evaluation compares against: per-prompt correct counts and the correct-answer support."""

    samples: int
    correct: list[int]
    support: list[list] = field(default_factory=list)  # [prompt index, canonical answer] pairs (JSON-friendly)

    def support_set(self) -> set:
        return {(p, a) for p, a in self.support}


def canonical_answer(episode: Episode):
    """The env's canonical answer for diversity counting (falls back to the parsed answer; None if unparseable)."""
    info = episode.turns[-1].info if episode.turns else {}
    return info.get("canonical", info.get("answer"))


def evaluate(policy: Policy, task: Task, prompts: int, samples: int, ks: list[int], params: SamplingParams,
             seed: int, chunk: int = 1024, diagnostics: bool = False,
             on_episodes: Callable[[int], None] | None = None) -> dict[str, float]:
    """pass@k for each k, mean accuracy, invalid-answer rate and response length on the first `prompts` held-out
    problems (plus diagnostics on request). The same seed gives the same draws, so evaluations along a run
    share their randomness. ``on_episodes(n)``: n more of the ``prompts · samples`` episodes are over."""
    return evaluate_detailed(policy, task, prompts, samples, ks, params, seed, chunk, diagnostics,
                             on_episodes=on_episodes)[0]


def eval_episodes(task: Task, prompts: int, samples: int) -> int:
    """How many episodes an evaluation plays (the total of its progress display)."""
    return min(prompts, task.eval_size) * samples


def evaluate_detailed(policy: Policy, task: Task, prompts: int, samples: int, ks: list[int], params: SamplingParams,
                      seed: int, chunk: int = 1024, diagnostics: bool = True,
                      base: EvalRecord | None = None,
                      on_episodes: Callable[[int], None] | None = None,
                      env_workers: WorkerPool | None = None) -> tuple[dict[str, float], EvalRecord]:
    """`evaluate` and the `EvalRecord` of this evaluation; with `base`, also support shrinkage/expansion and the
    crossover k* against it (only when both used the same number of samples per prompt; k* = samples + 1 means
    the current model is ahead at every k ≤ samples). With `env_workers` the envs are stepped in those processes
    (the same episodes)."""
    generator = torch.Generator(device=policy.device).manual_seed(seed)
    prompts = min(prompts, task.eval_size)
    starts = [Start(seed=p, group_id=p) for p in range(prompts) for _ in range(samples)]
    episodes: list[Episode] = []
    for first in range(0, len(starts), chunk):
        source = env_workers.split("eval") if env_workers is not None else lambda: task.make_env("eval")
        episodes += rollout(policy, source, starts[first:first + chunk], params, generator,
                            task.max_turns, step_timeout_s=getattr(task, "step_timeout_s", DEFAULT_STEP_TIMEOUT_S),
                            on_finished=on_episodes)
    correct = [0] * prompts
    for e in episodes:
        correct[e.group_id] += int(e.success)
    out = {f"pass@{k}": sum(pass_at_k(samples, c, k) for c in correct) / prompts for k in ks}
    out["accuracy"] = sum(correct) / (prompts * samples)
    out["invalid_rate"] = sum(any(t.info.get("invalid") for t in e.turns) for e in episodes) / len(episodes)
    out["response_length"] = sum(e.num_action_tokens for e in episodes) / len(episodes)
    if task.max_turns > 1:
        out["turns"] = sum(len(e.turns) for e in episodes) / len(episodes)
        out.update({k.split("/", 1)[1] if k.startswith("episode/") else k.replace("/", "_"): v
                    for k, v in agent_metrics(episodes).items()})
    groups: list[list] = [[] for _ in range(prompts)]
    for e in episodes:
        groups[e.group_id].append((canonical_answer(e), bool(e.success)))
    record = EvalRecord(samples, correct, [[p, a] for p, a in sorted(correct_support(groups), key=str)])
    if not diagnostics:
        return out, record
    out.update(token_entropy_stats([h for e in episodes for t in e.turns for h in t.behaviour_entropy]))
    out.update(answer_diversity(groups))
    out["effective_rank"] = _mean_group_rank(policy, episodes, min(prompts, RANK_PROMPTS))
    if base is not None and base.samples == samples and len(base.correct) == prompts:
        out.update(support_change(base.support_set(), record.support_set()))
        k_star = crossover_k(base.correct, correct, samples)
        out["crossover_k"] = float(k_star) if k_star is not None else float(samples + 1)
    return out, record


@torch.no_grad()
def _mean_group_rank(policy: Policy, episodes: list[Episode], prompts: int, chunk: int = 32) -> float:
    """Mean over prompts of the effective rank of the stacked mean-pooled last-layer states of its responses [9]
    (how spread the group's responses are in representation space, not only in surface text). Runs the
    transformer body only (no LM head: a [B, T, vocab] logits tensor would not fit for large vocabularies), in
    chunks of `chunk` responses."""
    chosen = [e for e in episodes if e.group_id < prompts and e.num_action_tokens > 0]
    if not chosen:
        return 0.0
    was_training = policy.training
    policy.eval()
    body = policy.model.get_decoder() if hasattr(policy.model, "get_decoder") else policy.model.base_model
    pooled = []
    for start in range(0, len(chosen), chunk):
        batch = pack(chosen[start:start + chunk], policy.pad_id, policy.bos_id).to(policy.device)
        hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        m = batch.action_mask.unsqueeze(-1).to(hidden.dtype)
        pooled.append(((hidden * m).sum(1) / m.sum(1).clamp(min=1)).float())
    policy.train(was_training)
    states = torch.cat(pooled)
    ranks = []
    for g in sorted({e.group_id for e in chosen}):
        rows = [i for i, e in enumerate(chosen) if e.group_id == g]
        ranks.append(effective_rank(states[rows]))
    return sum(ranks) / len(ranks)
