"""SPEAR's replay buffer and exploration curriculum [113] (explore piece ``spear``).

Each step samples ``prompts_per_step`` groups of ``group_size`` on-policy episodes (GRPO's groups) and scores
them. Then, following the authors' ``TrajectoryBufferBatch`` (TencentYoutuResearch/SPEAR,
``ray_trainer_hybrid.py``):

- **Buffer.** Every on-policy episode with a positive group advantage ``A = R − mean_g R > 0`` (and, with
  ``success_only``, a success) enters the buffer with its behaviour log-probs (in its turns), its advantage and
  the step it was sampled at; the oldest leave first beyond ``buffer_size``.
- **Stale entries.** Entries more than ``max_age`` steps older than the newest are dropped (the authors'
  ``remove_old`` with ``tolerate_steps`` 5, capped at 10 in their code).
- **Baseline.** The buffer keeps the mean reward of each on-policy group (the last ``baseline_size`` of them:
  10240 in the authors' script); ``b = p50`` of them (and ``s = p50`` of the groups' stds).
- **Recalibration** (``recalibrate``): ``baseline`` (the authors' ``weight_decay_trajectory_replay = -1``):
  a replayed episode's advantage is recomputed, ``Â = R − b`` (``/(s + ε)`` with ``std_normalize``), and only
  ``Â > 0`` is replayed; ``decay``: the recorded advantage times ``decay`` (their weight in (0, 1]); ``none``:
  the recorded advantage as it was (the ablation).
- **Replay** (``replay_when``): ``every_step`` adds ``replay_per_step`` entries drawn uniformly from the buffer;
  ``full`` is the authors' rule: once the buffer holds more than 1.5·``buffer_size``, all of it is recalibrated,
  a random power-of-two subset (at most ``buffer_size``) of the positive ones is replayed and the buffer emptied.
  ``priority: advantage`` draws entries with probability ∝ Â instead (SIL's prioritized replay, with the
  baseline standing in for the value the explore piece does not have). A replayed episode is a copy of the stored one, alone in a new group, ``origin="replay"``, ``off_policy``,
  its recorded log-probs as μ, ``advantage`` = Â and ``weight`` 0: the policy surrogate ignores it and the
  self-imitation term (``update.terms: [spear_sil]``, `outrider.update.self_imitation`) trains it, as the
  authors' separate replay loss does.
- **Curriculum** (``intrinsic``): an intrinsic reward that decays over the first ``steps``: every on-policy
  episode gets ``r_int = min(cap, per_count·n)·(cos(π·t/T) + 1)/2`` for step t ≤ T (0 after), with n its turns
  (the authors' tool-call count: ``min(1, 0.1·episode_length)``, T = 200), its valid turns, or its progress
  events; while it decays, the self-imitation weight ramps up (the term's ``ramp_steps``).

``pool`` draws the training prompts from a fixed set of seeds so prompts recur: the piece records, per prompt,
the step it was first solved and whether its latest visit was solved (``explore/retained_frac``: the share of
prompts ever solved whose latest group solved it). ``replay_per_step: 0`` with no intrinsic reward is plain GRPO
with the same prompts and bookkeeping (the baseline of the retention experiment).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import numpy as np
from pydantic import Field

from outrider.data import Episode, groups_of
from outrider.explore import EXPLORE, ExploreConfig, ExploreContext
from outrider.registry import BuildContext, Options, Piece

INTRINSIC = "intrinsic"  # the trajectory-level reward component the curriculum adds


class IntrinsicConfig(Options):
    """The curriculum's decaying intrinsic reward (the authors' ``use_toolcall_reward: cosine``)."""

    count: Literal["turns", "valid_turns", "events"] = Field(
        "turns", description="What is counted: turns (the authors' episode length in tool calls), valid_turns "
                             "(turns the env did not mark invalid), events (progress events not ending in 'error').")
    per_count: float = Field(0.1, ge=0, description="Reward per counted item (authors: 0.1).")
    cap: float = Field(1.0, ge=0, description="Most intrinsic reward per episode (authors: 1).")
    steps: int = Field(200, ge=1, description="T: the reward decays as (cos(pi t/T) + 1)/2 to 0 at step T "
                                              "(authors: max_toolcall_steps 200).")


class SpearConfig(ExploreConfig):
    buffer_size: int = Field(2048, ge=1, description="Most entries the buffer keeps (oldest leave first; authors: "
                                                     "2048).")
    replay_when: Literal["every_step", "full"] = Field(
        "every_step", description="every_step: replay_per_step entries drawn each step; full: the authors' rule "
                                  "(over 1.5 x buffer_size entries: replay a power-of-two subset, empty the buffer).")
    replay_per_step: int = Field(8, ge=0, description="every_step: entries replayed per step (0: no replay).")
    priority: Literal["uniform", "advantage"] = Field(
        "uniform", description="every_step: draw entries uniformly (SPEAR) or with probability proportional to "
                               "their positive recalibrated advantage (SIL's prioritized replay).")
    success_only: bool = Field(True, description="Only successful episodes enter the buffer.")
    min_advantage: float = Field(0.0, description="An episode enters the buffer when its group advantage "
                                                  "R - mean_g R exceeds this (authors: > 0).")
    max_age: int | None = Field(5, ge=0, description="Drop entries more than this many steps older than the "
                                                     "newest (authors' tolerate_steps: 5; null: never).")
    recalibrate: Literal["baseline", "decay", "none"] = Field(
        "baseline", description="A replayed entry's advantage: baseline (R - p50 of recent group means, the "
                                "authors' default), decay (recorded x decay), none (recorded, the ablation).")
    decay: float = Field(0.9, gt=0, le=1, description="recalibrate: decay: the factor on recorded advantages.")
    std_normalize: bool = Field(False, description="recalibrate: baseline: divide by the p50 of recent group stds "
                                                   "(authors: false).")
    baseline_size: int = Field(10240, ge=1, description="Group means (and stds) kept for the baseline (authors: "
                                                        "10240).")
    intrinsic: IntrinsicConfig | None = Field(None, description="The curriculum's decaying intrinsic reward "
                                                               "{count, per_count, cap, steps}; null: none.")
    pool: int | None = Field(None, ge=1, description="Draw training prompts from seeds 0..pool-1 (prompts recur, "
                                                     "so retention is measurable); null: fresh seeds.")


def intrinsic_reward(episode: Episode, step: int, cfg: IntrinsicConfig) -> float:
    """``min(cap, per_count·n)·(cos(π·step/T) + 1)/2`` for step ≤ T, else 0 [113]."""
    if step > cfg.steps:
        return 0.0
    if cfg.count == "turns":
        n = sum(bool(t.action_ids) for t in episode.turns)
    elif cfg.count == "valid_turns":
        n = sum(bool(t.action_ids) and not t.info.get("invalid") for t in episode.turns)
    else:
        n = sum(not e.endswith("error") for t in episode.turns for e in t.info.get("events", ()))
    return min(cfg.cap, cfg.per_count * n) * (math.cos(math.pi * step / cfg.steps) + 1.0) / 2.0


def group_advantages(episodes: list[Episode]) -> dict[int, float]:
    """``R_i − mean_g R`` per episode (by ``id``), the recorded advantage of a buffer entry."""
    out = {}
    for group in groups_of(episodes).values():
        mean = sum(e.total_reward() for e in group) / len(group)
        out.update({id(e): e.total_reward() - mean for e in group})
    return out


def largest_power_of_two(n: int) -> int:
    """The largest power of two ≤ n (0 for n ≤ 1, as the authors' ``nearest_lower_power_of_2``)."""
    return 0 if n <= 1 else 1 << (n.bit_length() - 1)


class ReplayBuffer:
    """Positive-advantage episodes with their step and recorded advantage, and the recent groups' reward
    statistics that recalibrate them. State: ``entries`` (episode, step, advantage) and ``means`` / ``stds``."""

    def __init__(self, cfg: SpearConfig):
        self.cfg = cfg
        self.entries: list[tuple[Episode, int, float]] = []
        self.means: list[float] = []
        self.stds: list[float] = []

    def add(self, episodes: list[Episode], step: int) -> int:
        """Record the groups' reward statistics and add the qualifying episodes; returns how many were added."""
        cfg, added = self.cfg, 0
        for group in groups_of(episodes).values():
            rewards = np.array([e.total_reward() for e in group])
            self.means.append(float(rewards.mean()))
            self.stds.append(float(rewards.std()))
        self.means, self.stds = self.means[-cfg.baseline_size:], self.stds[-cfg.baseline_size:]
        advantage = group_advantages(episodes)
        for e in episodes:
            if advantage[id(e)] > cfg.min_advantage and (e.success or not cfg.success_only):
                self.entries.append((e, step, advantage[id(e)]))
                added += 1
        del self.entries[:max(0, len(self.entries) - cfg.buffer_size * (2 if cfg.replay_when == "full" else 1))]
        return added

    def drop_stale(self) -> int:
        """Drop entries more than ``max_age`` steps older than the newest; returns how many."""
        if self.cfg.max_age is None or not self.entries:
            return 0
        newest = self.entries[-1][1]
        kept = [x for x in self.entries if newest - x[1] <= self.cfg.max_age]
        dropped, self.entries = len(self.entries) - len(kept), kept
        return dropped

    def baseline(self) -> tuple[float, float]:
        """(p50 of the recent group means, p50 of their stds); (0, 1) before any group was seen."""
        if not self.means:
            return 0.0, 1.0
        return float(np.percentile(self.means, 50)), float(np.percentile(self.stds, 50))

    def advantage(self, episode: Episode, recorded: float) -> float:
        """The replayed advantage of an entry under ``recalibrate``."""
        cfg = self.cfg
        if cfg.recalibrate == "none":
            return recorded
        if cfg.recalibrate == "decay":
            return recorded * cfg.decay
        mean, std = self.baseline()
        centred = episode.total_reward() - mean
        return centred / (std + 1e-6) if cfg.std_normalize else centred

    def draw(self, rng: np.random.Generator) -> list[tuple[Episode, float]]:
        """The entries to replay this step with their advantages (only positive ones)."""
        cfg = self.cfg
        if cfg.replay_when == "full":
            if len(self.entries) <= 1.5 * cfg.buffer_size:
                return []
            chosen, self.entries = self.entries, []
            scored = [(e, self.advantage(e, a)) for e, _, a in chosen]
            scored = [x for x in scored if x[1] > 0]
            k = min(largest_power_of_two(len(scored)), cfg.buffer_size)
            return [scored[i] for i in sorted(rng.permutation(len(scored))[:k])]
        if cfg.priority == "advantage":
            scored = [(e, self.advantage(e, a)) for e, _, a in self.entries]
            scored = [x for x in scored if x[1] > 0]
            k = min(cfg.replay_per_step, len(scored))
            if not k:
                return []
            p = np.array([a for _, a in scored])
            return [scored[i] for i in sorted(rng.choice(len(scored), size=k, replace=False, p=p / p.sum()))]
        k = min(cfg.replay_per_step, len(self.entries))
        picks = [self.entries[i] for i in sorted(rng.choice(len(self.entries), size=k, replace=False))] if k else []
        return [(e, adv) for e, _, a in picks if (adv := self.advantage(e, a)) > 0]

    def state_dict(self) -> dict[str, Any]:
        return {"entries": list(self.entries), "means": list(self.means), "stds": list(self.stds)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.entries = [(e, int(s), float(a)) for e, s, a in state["entries"]]
        self.means, self.stds = list(state["means"]), list(state["stds"])


def replayed(entry: Episode, advantage: float, group_id: int) -> Episode:
    """A copy of a stored episode to replay: alone in a new group, off-policy with its recorded log-probs as μ,
    weight 0 (only the self-imitation term trains it), its recalibrated advantage attached."""
    e = copy.deepcopy(entry)
    e.group_id, e.origin, e.off_policy, e.weight, e.advantage = group_id, "replay", True, 0.0, advantage
    return e


@EXPLORE.register("spear", config=SpearConfig)
class Spear(Piece):
    """SPEAR [113]: group sampling plus a replay buffer of successful positive-advantage episodes (recalibrated,
    stale ones dropped) and a decaying intrinsic reward; the replayed rows are trained by ``spear_sil``."""

    cfg: SpearConfig

    def __init__(self, cfg: SpearConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        self.buffer = ReplayBuffer(cfg)
        self.first_solved: dict[int, int] = {}  # prompt seed -> step it was first solved
        self.last_solved: dict[int, bool] = {}  # prompt seed -> whether its latest group solved it
        self.totals = {"added": 0.0, "replayed": 0.0, "dropped_stale": 0.0}

    def seeds(self, ctx: ExploreContext) -> list[int]:
        if self.cfg.pool is None:
            return ctx.next_seeds(self.cfg.prompts_per_step)
        return [int(s) for s in ctx.rng.choice(self.cfg.pool, size=self.cfg.prompts_per_step,
                                               replace=self.cfg.prompts_per_step > self.cfg.pool)]

    def __call__(self, ctx: ExploreContext) -> tuple[list[Episode], dict[str, float]]:
        cfg = self.cfg
        episodes = ctx.rollout(ctx.group_starts(self.seeds(ctx), cfg.group_size))
        ctx.score(episodes)
        bonus = [0.0]
        if cfg.intrinsic is not None:
            bonus = [intrinsic_reward(e, ctx.step, cfg.intrinsic) for e in episodes]
            for e, r in zip(episodes, bonus):
                e.rewards["trajectory"][INTRINSIC] = r
        for group in groups_of(episodes).values():
            solved = any(e.success for e in group)
            self.last_solved[group[0].seed] = solved
            if solved:
                self.first_solved.setdefault(group[0].seed, ctx.step)
        added = self.buffer.add(episodes, ctx.step)
        dropped = self.buffer.drop_stale()
        draws = self.buffer.draw(ctx.rng) if cfg.replay_per_step or cfg.replay_when == "full" else []
        replays = [replayed(e, adv, ctx.groups.new()) for e, adv in draws]
        ages = [ctx.step - int(e.metadata.get("step", ctx.step)) for e, _ in draws]
        for e in episodes:
            e.metadata.setdefault("step", ctx.step)
        for k, n in (("added", added), ("replayed", len(replays)), ("dropped_stale", dropped)):
            self.totals[k] += n
        mean, _ = self.buffer.baseline()
        ever = len(self.first_solved)
        metrics = {"explore/groups_sampled": float(cfg.prompts_per_step),
                   "explore/replay_buffer": float(len(self.buffer.entries)),
                   "explore/replay_added": float(added), "explore/replay_dropped_stale": float(dropped),
                   "explore/replayed": float(len(replays)),
                   "explore/replay_advantage": sum(a for _, a in draws) / max(len(draws), 1),
                   "explore/replay_age": sum(ages) / max(len(ages), 1),
                   "explore/replay_baseline": mean,
                   "explore/intrinsic_reward": sum(bonus) / max(len(bonus), 1),
                   "explore/prompts_solved_ever": float(ever),
                   "explore/retained_frac": sum(self.last_solved[s] for s in self.first_solved) / max(ever, 1)}
        metrics.update({f"explore/replay_{k}_total": v for k, v in self.totals.items()})
        return episodes + replays, metrics

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict(), "first_solved": dict(self.first_solved),
                "last_solved": dict(self.last_solved), "totals": dict(self.totals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.first_solved = {int(k): int(v) for k, v in state["first_solved"].items()}
        self.last_solved = {int(k): bool(v) for k, v in state["last_solved"].items()}
        self.totals = dict(state["totals"])
