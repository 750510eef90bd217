"""Supervised warm start on a task's demonstrations (optionally with a controlled share of wrong ones, so the
warm-started policy is imperfect and RL has something to do)."""

from __future__ import annotations

import math
import random
from typing import Callable

import torch
from pydantic import Field

from outrider.data import Episode, Turn, pack
from outrider.envs.base import Demonstration, Task, close_env
from outrider.errors import OutriderError
from outrider.policy.model import Policy
from outrider.registry import Options

DEMO_SEED_OFFSET = 10**8  # demonstrations use train indices from 1e8 on; RL draws random indices in [0, 2^31)


class WarmStartConfig(Options):
    steps: int = Field(0, ge=0, description="SFT optimiser steps on demonstrations before RL (0: none).")
    batch_size: int = Field(64, ge=1, description="Demonstrations per SFT step.")
    lr: float = Field(1e-3, gt=0, description="SFT learning rate (AdamW, 10-step linear warm-up).")
    wrong_fraction: float = Field(0.0, ge=0, le=1, description="Share of demonstrations whose action is taken "
                                                               "from another problem (usually wrong).")
    seed: int = Field(0, description="Seed of the choice of which demonstrations get a wrong answer (the demonstrations themselves are fixed train problems; model init follows train.seed).")
    hint_fraction: float = Field(0.0, ge=0, le=1, description="Share of demonstrations in which one turn's "
                                                              "observation is preceded by a hint naming the "
                                                              "demonstrated action (hint_template), so the policy "
                                                              "learns to follow a hint shown in context, as a "
                                                              "retry's reflection is (explore: reflect_retry).")
    hint_template: str = Field("Hint: {hint}\n", description="The hint text; {hint} is the demonstrated action. "
                                                             "Use the explore piece's template.")
    hint_cut: float = Field(1.0, gt=0, le=1, description="The hint shows the first ⌈cut·L⌉ characters of the "
                                                         "action (L its length): 1 the whole action; below 1 a "
                                                         "partial reference the policy learns to continue (set "
                                                         "it to loop bstar's hint_fraction for ReGFT [104]).")
    hint_decoy_fraction: float = Field(0.0, ge=0, le=1, description="Share of the hinted demonstrations whose "
                                       "hinted action is another demonstration's action at that turn (usually "
                                       "wrong for this problem), named by the hint, the demonstration ending there: "
                                       "only the hint predicts that action, so the policy learns to act on a hint "
                                       "even where the observation suggests otherwise (hints that merely repeat "
                                       "what the observation implies are ignored by a tiny model). Needs "
                                       "hint_fraction > 0.")
    feedback_fraction: float = Field(0.0, ge=0, le=1, description="Share of demonstrations whose first observation "
                                                                  "is preceded by a hindsight experience: another "
                                                                  "demonstration's (usually wrong) response and the "
                                                                  "task's feedback on it (feedback_template), so the "
                                                                  "policy learns to read one (explore: herl). Needs "
                                                                  "the task's feedback hook.")
    feedback_template: str = Field("Failed: {response}\nUnmet: {feedback}\n",
                                   description="The experience text: {response} and {feedback}. Use the explore "
                                               "piece's template.")


def demo_episode(policy: Policy, demo: Demonstration, group_id: int) -> Episode:
    """A demonstration as an episode; every action ends with EOS, as sampled actions do, and observations are
    encoded as the rollout encodes them. Turns that would not fit in the model's context are left out (the
    rollout ends an episode a little earlier: when the observation plus a full `max_new_tokens` action would not
    fit)."""
    ep = Episode(group_id=group_id, seed=group_id)
    length = int(policy.bos_id is not None)
    for k, (obs, action) in enumerate(demo.turns):
        turn = Turn(observation=obs, observation_ids=policy.encode_observation(obs, first=k == 0), action=action,
                    action_ids=policy.encode(action) + [policy.eos_id])
        length += len(turn.observation_ids) + len(turn.action_ids)
        if length > policy.max_length:
            break
        ep.turns.append(turn)
    return ep


def partial_hint(answer: str, fraction: float) -> str:
    """The first ``⌈fraction · len(answer)⌉`` characters of a reference answer (ReGFT's partial reference
    [104])."""
    return answer[: math.ceil(fraction * len(answer))]


def add_hints(demos: list[Demonstration], fraction: float, template: str, rng: random.Random, cut: float = 1.0,
              decoy: float = 0.0, decoy_rng: random.Random | None = None) -> list[Demonstration]:
    """In `fraction` of the demonstrations, prefix one random turn's observation with `template` naming that
    turn's action, or its first ⌈cut·L⌉ characters (a tiny model learns to follow a hint only if it has seen
    one). In `decoy` of those (drawn from `decoy_rng`, so the hints' own draws do not change), the hinted action is
    a random other demonstration's action at that turn (its last, if shorter) and the demonstration ends with it:
    there the hint, not the observation, is what predicts the action."""
    out = []
    for d in demos:
        if d.turns and rng.random() < fraction:
            turns = list(d.turns)
            j = rng.randrange(len(turns))
            obs, action = turns[j]
            if decoy and decoy_rng is not None and len(demos) > 1 and decoy_rng.random() < decoy:
                donor = decoy_rng.choice([o for o in demos if o is not d and o.turns] or [d])
                action = donor.turns[min(j, len(donor.turns) - 1)][1]
                turns = turns[:j + 1]  # what follows was played after the demonstrated action, not this one
            turns[j] = (template.format(hint=partial_hint(action, cut)) + obs, action)
            out.append(Demonstration(turns))
        else:
            out.append(d)
    return out


def add_feedback(task: Task, demos: list[Demonstration], seeds: list[int], fraction: float, template: str,
                 rng: random.Random) -> list[Demonstration]:
    """In `fraction` of the demonstrations, prefix the first observation with `template` showing a random other
    demonstration's first action and the task's feedback on it for this problem (a tiny model reads a hindsight
    experience only if it has seen one); a donor that happens to be right is skipped."""
    out = []
    for d, seed in zip(demos, seeds):
        if d.turns and len(demos) > 1 and rng.random() < fraction:
            wrong = rng.choice(demos).turns[0][1]
            env = task.make_env("train")
            try:
                env.reset(seed)
                unmet = task.feedback(env, wrong)  # type: ignore[attr-defined]
            finally:
                close_env(env)
            if unmet:
                obs, action = d.turns[0]
                d = Demonstration([(template.format(response=wrong, feedback=unmet) + obs, action)] + list(d.turns[1:]))
        out.append(d)
    return out


def corrupt(demos: list[Demonstration], fraction: float, rng: random.Random) -> list[Demonstration]:
    """Replace the actions of `fraction` of the demonstrations by those of a random other demonstration."""
    out = []
    for d in demos:
        if rng.random() < fraction and len(demos) > 1:
            donor = rng.choice(demos)
            turns = [(obs, donor.turns[min(k, len(donor.turns) - 1)][1]) for k, (obs, _) in enumerate(d.turns)]
            out.append(Demonstration(turns))
        else:
            out.append(d)
    return out


def warm_start(policy: Policy, task: Task, cfg: WarmStartConfig,
               on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train `policy` on demonstrations with token cross-entropy on action tokens; returns the loss per step."""
    if cfg.steps == 0:
        return []
    rng = random.Random(cfg.seed)
    hint_rng = random.Random(f"hints:{cfg.seed}")  # its own stream: runs without hints draw exactly as before
    feedback_rng = random.Random(f"feedback:{cfg.seed}")
    decoy_rng = random.Random(f"hint-decoys:{cfg.seed}")
    if cfg.hint_decoy_fraction and not cfg.hint_fraction:
        raise OutriderError("policy.warm_start.hint_decoy_fraction: needs hint_fraction > 0 (decoys are a share "
                            "of the hinted demonstrations)")
    if cfg.feedback_fraction and not callable(getattr(task, "feedback", None)):
        raise OutriderError(f"policy.warm_start.feedback_fraction: needs the task's feedback(env, action) hook, "
                            f"which {type(task).__name__} does not have (built-in tasks with it: stepsum)")
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    policy.train()
    losses = []
    for step in range(cfg.steps):
        seeds = [DEMO_SEED_OFFSET + step * cfg.batch_size + i for i in range(cfg.batch_size)]
        demos = corrupt(task.demonstrations(seeds), cfg.wrong_fraction, rng)
        if cfg.hint_fraction:
            demos = add_hints(demos, cfg.hint_fraction, cfg.hint_template, hint_rng, cfg.hint_cut,
                              cfg.hint_decoy_fraction, decoy_rng)
        if cfg.feedback_fraction:
            demos = add_feedback(task, demos, seeds, cfg.feedback_fraction, cfg.feedback_template, feedback_rng)
        batch = pack([demo_episode(policy, d, i) for i, d in enumerate(demos)], policy.pad_id, policy.bos_id)
        batch = batch.to(policy.device)
        lp = policy.score(batch.input_ids, batch.attention_mask).logprobs
        loss = -(lp * batch.action_mask).sum() / batch.action_mask.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if on_step:
            on_step(step, losses[-1])
    return losses
