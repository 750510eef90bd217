"""The RL step: explore (sample and score) → pack → prepare → packed rewards → credit → learner."""

from __future__ import annotations

import time

import numpy as np
import torch

from outrider.data import Episode, GroupIds, Start, pack
from outrider.explore import ExploreContext
from outrider.envs.time_limit import DEFAULT_STEP_TIMEOUT_S
from outrider.explore.rollout import rollout, timed_out_frac
from outrider.loops import LOOPS, Run
from outrider.observe.metrics import episode_metrics
from outrider.registry import NoOptions, Piece
from outrider.score import compose, compose_packed, score_step_metrics
from outrider.stats import masked_mean
from outrider.update.learner import learner_step, prepare


def collect(run: Run, step: int, timers: dict[str, float]) -> tuple[list[Episode], dict[str, float]]:
    """The explore piece's episodes and metrics for one step (its rollouts timed into `timers`)."""
    seed, task, explore = run.seed, run.task, run.pieces.explore
    for k in ("timeouts", "env_steps", "restores", "replayed_steps", "env_s"):
        timers.setdefault(k, 0.0)
    seed_rng = np.random.default_rng([seed, step])
    generator = torch.Generator(device=run.device).manual_seed(seed * 1_000_003 + step)
    turn_cap = getattr(explore.cfg, "turn_cap", None)
    horizon = task.max_turns if turn_cap is None else turn_cap.at(step, task.max_turns)

    def play(starts: list, snapshots: bool = False) -> list[Episode]:
        t0 = time.perf_counter()
        out = rollout(run.policy, run.env_source("train"), starts, run.params, generator, horizon, snapshots,
                      getattr(task, "step_timeout_s", DEFAULT_STEP_TIMEOUT_S), timers=timers)
        timers["timeouts"] += sum(bool(e.metadata.get("timed_out")) for e in out)
        count_env_calls(starts, out, timers)
        timers["sample_s"] += time.perf_counter() - t0
        timers["sample_tokens"] += sum(e.num_action_tokens for e in out) - sum(e.prefix_tokens for e in out)
        return out

    def score(episodes: list[Episode]) -> None:
        t0 = time.perf_counter()
        compose(episodes, run.pieces.components)
        timers["score_s"] = timers.get("score_s", 0.0) + time.perf_counter() - t0

    ctx = ExploreContext(rollout=play, score=score,
                         next_seeds=lambda n: [int(x) for x in seed_rng.integers(0, 2**31 - 1, n)],
                         groups=GroupIds(), rng=np.random.default_rng([seed, step, 1]), step=step, task=task)
    t0 = time.perf_counter()
    episodes, metrics = explore(ctx)
    # the piece's own time besides its rollouts and scoring is explore_s − sample_s − score_s
    metrics["time/explore_s"] = time.perf_counter() - t0
    metrics["time/score_s"] = timers.get("score_s", 0.0)
    metrics["time/env_s"] = timers["env_s"]  # of time/sample_s, the part spent in env calls (serial or workers)
    metrics.update(score_step_metrics(run.pieces.components))
    metrics["env/timeouts"] = timers["timeouts"]  # env calls past task.step_timeout_s, in every rollout of the step
    # the step's cost in env calls and sampled tokens, whatever the explore piece did (restarts, retries)
    metrics["explore/env_steps"] = timers["env_steps"]
    metrics["explore/restores"] = timers["restores"]
    metrics["explore/replayed_steps"] = timers["replayed_steps"]
    metrics["explore/sampled_tokens"] = timers["sample_tokens"]
    if task.max_turns > 1:
        metrics["explore/turn_cap"] = float(horizon)
    return episodes, metrics


def count_env_calls(starts: list[Start], episodes: list[Episode], timers: dict[str, float]) -> None:
    """Add a rollout's env calls to `timers`: ``env_steps`` (actions sent to an env: the new turns that hold an
    action), ``restores`` (starts reached by ``restore(snapshot)``) and ``replayed_steps`` (prefix actions replayed
    to reach a start without a snapshot)."""
    for start, episode in zip(starts, episodes):
        timers["env_steps"] += sum(bool(t.action_ids) for t in episode.turns[len(start.prefix):])
        if start.snapshot is not None:
            timers["restores"] += 1
        else:
            timers["replayed_steps"] += len(start.prefix)


@LOOPS.register("rl", config=NoOptions)
class RLStep(Piece):
    """One RL step: explore, pack, prepare, packed rewards, credit, update. The explore piece samples and scores
    episodes; they are packed once; one no-grad forward gives
    what the pieces need (old log-probs, values, hidden states, reference log-probs); packed score components add
    their token rewards; the credit piece sets advantages; the learner updates the policy."""

    def __call__(self, run: Run, step: int) -> dict[str, float]:
        t_step = time.perf_counter()
        timers = {"sample_s": 0.0, "sample_tokens": 0.0}
        episodes, metrics = collect(run, step, timers)
        metrics.update(episode_metrics(episodes))
        metrics["episode/timed_out_frac"] = timed_out_frac(episodes)
        t_train = time.perf_counter()
        policy, u, needs = run.policy, run.recipe.update, run.pieces.needs
        batch = pack(episodes, policy.pad_id, policy.bos_id).to(run.device)
        top = {"top_k": run.params.top_k, "top_p": run.params.top_p}  # log-probs of the distribution sampled from
        prepare(batch, policy, run.reference, u, run.params.temperature, run.need_old(), needs.values, needs.hidden,
                **top)
        metrics.update(compose_packed(batch, run.pieces.components))
        credit_out = run.pieces.credit(batch)
        batch.advantages, batch.returns = credit_out.advantages, credit_out.returns
        metrics.update({f"credit/{k}": float(v) for k, v in credit_out.metrics.items()})
        mask = batch.action_mask
        metrics["credit/advantage_mean"] = float(masked_mean(batch.advantages, mask))
        metrics["credit/zero_advantage_frac"] = float(masked_mean((batch.advantages.abs() < 1e-8).float(), mask))
        metrics.update(learner_step(policy, run.optimizer, batch, run.pieces.terms, u, run.params.temperature,
                                    run.learner_generator(step), run.norm_length, **top))
        train_s = time.perf_counter() - t_train
        metrics.update(run.timing(timers["sample_s"], timers["sample_tokens"], train_s,
                                  float(batch.attention_mask.sum()) * u.epochs, time.perf_counter() - t_step))
        return metrics
