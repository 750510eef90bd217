"""The rollout loop: many envs stepped together, one batched sampler call per turn, each episode from its `Start`.

The policy sees the whole conversation so far (observations and its own actions, as token ids, never
re-tokenised; observations go through the model's chat template when it has one); it produces one action per turn
(up to `max_new_tokens`, ending at EOS or a stop string); the env answers; the episode ends when the env says done,
at the horizon, or when the conversation would no longer fit in the model's context. An action the env cannot use
is the env's business: it answers with an error text and ``info["invalid"]``, which is counted, never raised.
Single-turn tasks are the one-turn case of the same loop.

A `Start` may begin mid-trajectory: its prefix turns are in the episode (the model sees them) and its env is put
in their end state by ``restore(snapshot)`` or by replaying their actions; a response prefix is continued; extra
context is shown to the sampler alone unless the start keeps it. Every env is closed when its episode is over.

Every env call (reset, restore, step) runs under the task's time limit (`envs/time_limit.py`): an env that does not
answer within it ends its episode, failed, marked ``info["timed_out"]`` on the turn and ``metadata["timed_out"]``
on the episode, and is closed at once (a pooled interpreter is killed, not re-used); the next episode gets a new
env.

Each turn has two phases: every active episode's action is sampled in one batch, then every env is stepped. The
envs live in this process (stepped one after another) or, with `task.workers: N`, in N worker processes that step
theirs at the same time (`envs/workers.py`); the episodes are the same for the same seeds either way.
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Callable

import numpy as np
import torch

from outrider.data import Episode, Start, Turn
from outrider.envs.base import Env, close_env
from outrider.envs.time_limit import DEFAULT_STEP_TIMEOUT_S, EnvTimeout, TimeLimit
from outrider.envs.env_batch import EnvBatch, Reply, open_envs
from outrider.errors import OutriderError
from outrider.policy.model import Policy
from outrider.policy.sampler import SamplingParams, sample


def _new_turn(reply: Reply, obs: str, ids: list[int]) -> Turn:
    turn = Turn(observation=obs, observation_ids=ids)
    if reply.has_key:
        turn.info["state_key"] = reply.state_key
    turn.snapshot = reply.snapshot
    return turn


def _given_turn(turn: Turn) -> Turn:
    """A copy of a prefix turn whose lists are the episode's own (one prefix may start many episodes)."""
    out = copy.copy(turn)
    out.observation_ids, out.action_ids = list(turn.observation_ids), list(turn.action_ids)
    out.behaviour_logprobs, out.behaviour_entropy = list(turn.behaviour_logprobs), list(turn.behaviour_entropy)
    out.info = dict(turn.info)
    return out


def rollout(policy: Policy, make_env: Callable[[], Env] | Any, starts: list[Start], params: SamplingParams,
            generator: torch.Generator, max_turns: int = 1, snapshots: bool = False,
            step_timeout_s: float | None = DEFAULT_STEP_TIMEOUT_S,
            on_finished: Callable[[int], None] | None = None,
            timers: dict[str, float] | None = None) -> list[Episode]:
    """Play one episode per start and return them, in order, with their turns filled in.

    The horizon `max_turns` counts a start's prefix turns too. With `snapshots`, every new turn keeps the env's
    ``snapshot()`` from before its action (archives of restart points). An episode whose next observation plus a
    full action would exceed the model's context ends there, marked ``metadata["context_full"]`` (not done: its
    success is what the env said so far). An env call past `step_timeout_s` seconds ends its episode as failed,
    marked ``metadata["timed_out"]`` (see the module docstring). ``on_finished(n)`` is told each time n more
    episodes are over (progress displays).

    `make_env` makes one env in this process, or is a split of an `EnvWorkers` pool (``workers.split("train")``:
    the envs live in worker processes, `task.workers`); the episodes are the same either way. With `timers`, the
    seconds spent in env calls (opening, reaching, stepping and closing the envs; with workers, the messages and
    the wait for them) are added to ``timers["env_s"]``: the rollout's time is that plus the sampler's and the
    bookkeeping's."""
    envs = open_envs(make_env, len(starts), step_timeout_s, timers)
    try:
        return _play(policy, envs, starts, params, generator, max_turns, snapshots, on_finished or (lambda n: None))
    finally:
        envs.close_all()


def _timed_out(episode: Episode, turn: Turn) -> None:
    """End an episode as failed after an env call ran past the time limit (its env is already closed: a pooled
    interpreter in an unknown state is killed, not re-used)."""
    turn.info["timed_out"] = True
    episode.metadata["timed_out"] = True
    episode.success = episode.done = False


def timed_out_frac(episodes: list[Episode]) -> float:
    """The share of episodes ended by the env time limit (logged as ``episode/timed_out_frac``)."""
    return sum(bool(e.metadata.get("timed_out")) for e in episodes) / max(len(episodes), 1)


def _play(policy: Policy, envs: EnvBatch, starts: list[Start], params: SamplingParams, generator: torch.Generator,
          max_turns: int, snapshots: bool, on_finished: Callable[[int], None]) -> list[Episode]:
    """Each turn in two phases: every active episode's action is sampled in one batch, then every env is stepped
    (in this process one after another, or at once in the env workers)."""
    bos = [policy.bos_id] if policy.bos_id is not None else []
    limit = policy.max_length
    episodes, contexts, given = [], [], []  # the sampler's token context, and the given ids of the first new action
    reached = envs.reach([(n, s.seed, s.snapshot, [t.action for t in s.prefix] if s.snapshot is None else [],
                           snapshots) for n, s in enumerate(starts)])
    alive = [not r.timed_out for r in reached]
    for n, (reply, start) in enumerate(zip(reached, starts)):
        obs, timed_out = reply.obs, reply.timed_out
        episode = Episode(group_id=start.group_id, seed=start.seed, origin=start.origin, weight=start.weight,
                          metadata=dict(start.metadata), off_policy=start.context is not None and not start.keep_context)
        context = list(bos)
        if start.prefix:
            episode.turns = [_given_turn(t) for t in start.prefix]
            context += [i for t in episode.turns for i in t.observation_ids + t.action_ids]
        first = not episode.turns
        seen = obs  # the observation as the sampler sees it
        if start.context is not None and start.context_at == "before_observation":
            seen = start.context + obs
        elif start.context is not None and start.context_at == "after_observation":
            seen = obs + start.context
        shown_ids = policy.encode_observation(seen, first=first)
        trained_ids = shown_ids if start.keep_context or seen is obs else policy.encode_observation(obs, first=first)
        if timed_out:  # no state to ask the env about: an observation-only turn, never sampled from
            episode.turns.append(Turn(observation=obs, observation_ids=trained_ids))
            _timed_out(episode, episode.turns[-1])
        else:
            episode.turns.append(_new_turn(reply, seen if start.keep_context else obs, trained_ids))
        action_given = list(start.action_prefix)
        context += shown_ids + action_given
        if start.context is not None and start.context_at == "after_prefix":
            context_ids = policy.encode(start.context)
            context += context_ids
            if start.keep_context:  # kept mid-action: it is part of the given start of the action
                action_given += context_ids
        episode.prefix_tokens = len(action_given) + (sum(len(t.action_ids) for t in start.prefix) if start.prefix else 0)
        episodes.append(episode)
        contexts.append(context)
        given.append(action_given)
    active = [i for i in range(len(episodes)) if alive[i]
              and len(episodes[i].turns) <= max_turns and _fits(contexts[i], params, limit, episodes[i])]
    on_finished(len(episodes) - len(active))
    while active:
        samples = sample(policy, [contexts[i] for i in active], params, generator)
        for i, s in zip(active, samples):
            turn, head = episodes[i].turns[-1], given[i]
            given[i] = []
            turn.action_ids = head + s.ids
            turn.action = (policy.decode(head) if head else "") + s.text
            turn.behaviour_logprobs = [0.0] * len(head) + s.logprobs  # given tokens were not drawn (never trained)
            turn.behaviour_entropy = [0.0] * len(head) + s.entropies
            turn.finish_reason = s.finish_reason
        replies = envs.step([(i, episodes[i].turns[-1].action, len(episodes[i].turns) < max_turns, snapshots)
                             for i in active])
        still_active = []
        for i, s, reply in zip(active, samples, replies):
            episode, turn = episodes[i], episodes[i].turns[-1]
            if reply.timed_out:
                _timed_out(episode, turn)
                continue
            info = reply.info
            turn.reward = reply.reward
            turn.info.update({k: v for k, v in info.items() if k != "state_key"})
            contexts[i] += s.ids
            episode.success = bool(info.get("success", episode.success))
            if reply.done or len(episode.turns) == max_turns:
                episode.done = reply.done
                continue
            ids = policy.encode_observation(reply.obs, first=False)
            if not _fits(contexts[i] + ids, params, limit, episode):
                continue
            episode.turns.append(_new_turn(reply, reply.obs, ids))
            contexts[i] += ids
            still_active.append(i)
        on_finished(len(active) - len(still_active))
        active = still_active
    return episodes


def _fits(context: list[int], params: SamplingParams, limit: int, episode: Episode) -> bool:
    if len(context) + params.max_new_tokens <= limit:
        return True
    episode.metadata["context_full"] = True
    return False


def check_prompts_fit(policy: Policy, task: Any, params: SamplingParams, seed: int, samples: int = 8) -> None:
    """Refuse a run in which no episode could act: reset `samples` train envs and encode their first observation
    as the rollout does; an episode acts only if its prompt plus a full action (`max_new_tokens`) fits in the
    model's context. None fitting is an OutriderError with the numbers; some not fitting is a warning on stderr
    (those episodes end before their first action and train nothing)."""
    bos = int(policy.bos_id is not None)
    seeds = [int(x) for x in np.random.default_rng([seed, 0xF17]).integers(0, 2**31 - 1, samples)]
    lengths = []
    with TimeLimit(getattr(task, "step_timeout_s", DEFAULT_STEP_TIMEOUT_S)) as clock:
        for s in seeds:
            env = task.make_env("train")
            try:
                lengths.append(bos + len(policy.encode_observation(clock.call(env.reset, s), first=True)))
            except EnvTimeout:
                continue
            finally:
                close_env(env)
    limit, need = policy.max_length, params.max_new_tokens
    too_long = [n for n in lengths if n + need > limit]
    if not too_long:
        return
    span = f"{min(too_long)}" if min(too_long) == max(too_long) else f"{min(too_long)}-{max(too_long)}"
    numbers = (f"{len(too_long)} of {len(lengths)} sampled train prompts are {span} tokens long; with "
               f"explore.max_new_tokens={need} they exceed the model's {limit}-token context")
    if len(too_long) == len(lengths):
        raise OutriderError(f"task: no prompt fits: {numbers}, so no episode could act. Shorten the prompts (e.g. "
                            "task.template) or lower explore.max_new_tokens, or use a model with a longer context "
                            "(policy.max_positions for the tiny model)")
    print(f"warning: {numbers}: those episodes end before acting and train nothing", file=sys.stderr)
