"""HeRL: hindsight-experience-guided resampling [12] (explore piece ``herl``).

Each step samples ``prompts_per_step`` groups of ``group_size`` on-policy episodes and scores them, as GRPO does.
Then, following the authors' code (sikelifei/HeRL, ``verl/trainer/ppo/ray_trainer.py``
``_augment_with_rewrite_he``, ``core_algos.py`` ``mixpolicy_vanilla``, ``examples/qwen3/Qwen3_herl.sh``):

- **Which groups** (``threshold``): a group whose best reward is below the threshold (theirs 1.0: no member is
  fully right) gets hindsight guidance.
- **Which responses** (``candidates``): the group's best-scoring members (ties all kept, the authors'
  ``candidate_limit`` 16 at most); each is a *hindsight experience*: its response and the criteria it failed,
  from the task's ``feedback(env, action)`` hook (the authors' unmet rubric items / instruction constraints).
- **Guided resampling**: each candidate gets ``samples`` (theirs 1) guided responses sampled from the prompt with
  the experience in context (``template``, shown before the observation), at ``guided_temperature`` (theirs
  0.3), and scored by the recipe's components.
- **The bonus for improvement potential** (``alpha``): a candidate's reward moves toward the best reward of its
  guided responses, ``r_i ← r_i + α·(max_j r'_ij − r_i)``, α = 0.05 (``reward_shaping_alpha``); added as the
  trajectory component ``herl_bonus``, so GRPO's group statistics see it.
- **Which guided responses train** (``replace``, theirs ``replace_top_n: 1``): per group, the guided responses
  whose reward beats the group's best, best first, then those that equal it, up to ``replace``; each takes the
  place of a member drawn at random (the authors shuffle the group's indices). The authors fill a remaining
  slot with a copy of the best original; here it is left as it was (the same row twice adds nothing new).
- **How they train**: the guided response joins the group without its context (``Start.context`` is removed
  from the trained sequence), an ``origin: guided``, ``off_policy`` row whose recorded behaviour log-probs μ are
  the sampler's *under the context* (at ``guided_temperature``). With ``shaping: true`` it has weight 0 in the
  policy surrogate and the term ``guided_shaping`` with ``ratio: behaviour`` trains it with
  ``−A·r/(r + γ)``, ``r = π_θ(y_t | x)/μ(y_t | x, experience)``, unclipped, γ = 1 (their ``mixpolicy_vanilla``
  with ``he_shaping_gamma: 1``); ``false`` trains it through the surrogate (ratio π_θ/μ under the loss's clip and
  ``update.off_policy``). The learner logs ``origin/guided/iw_mean`` = π_old/μ: how far the context moved the
  policy. The authors' released scripts set ``train_use_rewrite_prompt: True`` (the row keeps the guided prompt,
  μ = the recomputed old log-probs there); ``keep_context: true`` is that variant (on-policy rows).
- **The ablation without the experience** (``experience: false``): the same candidates are resampled from the
  plain prompt at ``guided_temperature``, no feedback shown; the rows are still off-policy (μ at that
  temperature), so only the experience differs from HeRL.

Logged: ``explore/herl_groups`` (share of groups guided), ``guided_sampled``, ``guided_success`` (share of the
guided responses that succeed), ``guided_improved`` (share beating their candidate), ``guided_rows``,
``guided_share``, ``bonus_rows``, ``bonus_mean``, ``guided_tokens`` (sampled under guidance) against
``policy_tokens`` (the groups'), ``context_chars``; ``time/guidance_s`` (the piece's guided sampling, feedback and
scoring). State: running counts, in checkpoints.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from pydantic import Field

from outrider.data import Episode, Start, groups_of
from outrider.envs.base import close_env
from outrider.errors import OutriderError
from outrider.explore import EXPLORE, ExploreConfig, ExploreContext
from outrider.explore.guidance import sample_with, term_names
from outrider.explore.step_check import env_at, time_limit
from outrider.registry import BuildContext, Piece

FEEDBACK_TASKS = "stepsum"  # built-in tasks with the feedback hook
BONUS = "herl_bonus"


class HindsightConfig(ExploreConfig):
    threshold: float = Field(1.0, description="A group whose best reward is below this gets hindsight guidance "
                                              "(authors: 1.0).")
    candidates: int = Field(16, ge=1, description="Most failed responses per group used as hindsight experiences: "
                                                  "the group's best-scoring ones (authors' candidate_limit 16).")
    samples: int = Field(1, ge=1, description="Guided responses sampled per experience (authors: 1).")
    guided_temperature: float | None = Field(0.3, gt=0, description="Sampling temperature of guided responses "
                                                                     "(authors: 0.3); null: the run's temperature.")
    replace: int = Field(1, ge=0, description="Guided responses per group that take the place of a member "
                                              "(authors' replace_top_n: 1); 0: none train (the bonus alone).")
    alpha: float = Field(0.05, ge=0, description="The bonus: a candidate's reward r becomes r + alpha·(best guided "
                                                 "reward − r) (authors' reward_shaping_alpha 0.05); 0: off.")
    template: str = Field("Failed: {response}\nUnmet: {feedback}\n",
                          description="The hindsight experience shown before the prompt: {response} (the failed "
                                      "response) and {feedback} (the criteria it failed, the task's feedback hook).")
    keep_context: bool = Field(False, description="false: the guided row trains without the experience "
                                                  "(off-policy, mu under the context: the paper); true: it keeps it "
                                                  "as untrained prompt tokens (on-policy; the authors' scripts).")
    experience: bool = Field(True, description="false: the ablation without the experience: the best failed "
                                               "members are resampled from the plain prompt at guided_temperature "
                                               "(no feedback, no context); mu is still the sampler's at that "
                                               "temperature, so the rows stay off-policy.")
    shaping: bool = Field(True, description="true: guided rows have weight 0 in the surrogate and the "
                                            "guided_shaping term (ratio: behaviour) trains them with -A·r/(r+gamma); "
                                            "false: the surrogate trains them (ratio pi/mu, clipped).")


def bonus(reward: float, guided: list[float], alpha: float) -> float:
    """``α·(max_j r'_j − r)``: what the candidate's reward gains from its guided responses [12] (0 without any)."""
    return alpha * (max(guided) - reward) if guided else 0.0


def pick(guided: list[tuple[float, int]], best: float, k: int) -> list[int]:
    """Ids of the guided responses that train, given ``(reward, id)`` pairs and the group's best reward: those
    above ``best`` (best first, ties by id), then those equal to it, at most k (the authors' replace_top_n)."""
    order = sorted(guided, key=lambda x: (-x[0], x[1]))
    above = [i for r, i in order if r > best]
    equal = [i for r, i in order if r == best]
    return (above + equal)[:k]


def experiences(members: list[Episode], limit: int) -> list[Episode]:
    """The group's best-scoring members (every tie, in order), at most `limit`."""
    best = max(e.total_reward() for e in members)
    return [e for e in members if abs(e.total_reward() - best) < 1e-6][:limit]


def check_build(cfg: HindsightConfig, build: BuildContext) -> None:
    """One-line errors: a task without the feedback hook; shaping without its term."""
    where = build.where or "explore"
    if cfg.experience and build.task is not None and not callable(getattr(build.task, "feedback", None)):
        raise OutriderError(f"{where}: herl needs the task's feedback(env, action) hook (the criteria a response "
                            f"fails), which {type(build.task).__name__} does not have; built-in tasks with it: "
                            f"{FEEDBACK_TASKS}")
    if cfg.shaping and not cfg.keep_context and build.recipe is not None and \
            "guided_shaping" not in term_names(build.recipe):
        raise OutriderError(f"{where}.shaping: true needs update.terms: [{{name: guided_shaping, ratio: "
                            f"behaviour}}] (guided rows have weight 0 in the surrogate); or set shaping: false")


@EXPLORE.register("herl", config=HindsightConfig)
class Hindsight(Piece):
    """HeRL hindsight-experience-guided resampling with the improvement-potential bonus [12]."""

    def __init__(self, cfg: HindsightConfig, build: BuildContext | None = None):
        build = build or BuildContext()
        check_build(cfg, build)
        super().__init__(cfg, build)
        self.cfg: HindsightConfig = cfg
        self.policy = build.policy
        self.counts: dict[str, float] = defaultdict(float)

    def feedback_text(self, task: Any, episode: Episode) -> str:
        """The hindsight experience of a failed episode: its response and the task's feedback on its last
        action, in the template."""
        k = len(episode.turns) - 1
        with time_limit(task) as clock:
            env, _ = env_at(task, episode, k, clock)
            try:
                unmet = task.feedback(env, episode.turns[k].action)
            finally:
                close_env(env)
        return self.cfg.template.format(response=episode.response, feedback=unmet)

    def __call__(self, ctx: ExploreContext) -> tuple[list[Episode], dict[str, float]]:
        cfg = self.cfg
        episodes = ctx.sample_groups(ctx.next_seeds(cfg.prompts_per_step), cfg.group_size)
        ctx.score(episodes)
        groups = groups_of(episodes)
        t0 = time.perf_counter()  # the piece's own time: feedback, guided sampling and scoring, selection
        guided_groups = {g: m for g, m in groups.items() if max(e.total_reward() for e in m) < cfg.threshold}
        starts, parents = [], []
        for gid, members in guided_groups.items():
            for parent in experiences(members, cfg.candidates):
                text = self.feedback_text(ctx.task, parent) if cfg.experience else None
                for _ in range(cfg.samples):
                    starts.append(Start(seed=parent.seed, group_id=gid, context=text,
                                        context_at="before_observation", keep_context=cfg.keep_context,
                                        origin="guided"))
                    parents.append(parent)
        guided = self.sample(ctx, starts)
        if not cfg.experience:  # no context, but μ is the guided temperature's: not the policy's own sample
            for e in guided:
                e.off_policy = True
        ctx.score(guided)
        by_parent: dict[int, list[float]] = defaultdict(list)
        for parent, e in zip(parents, guided):
            by_parent[id(parent)].append(e.total_reward())
        n_bonus, bonus_sum = 0, 0.0
        for members in guided_groups.values():
            for e in members:
                if id(e) in by_parent:
                    b = bonus(e.total_reward(), by_parent[id(e)], cfg.alpha)
                    if b != 0.0:
                        e.rewards["trajectory"][BONUS] = b
                        n_bonus, bonus_sum = n_bonus + 1, bonus_sum + b
        replaced: dict[int, Episode] = {}
        for gid, members in guided_groups.items():
            best = max(e.total_reward() - e.rewards["trajectory"].get(BONUS, 0.0) for e in members)
            mine = [(e.total_reward(), j) for j, e in enumerate(guided) if e.group_id == gid]
            keep = pick(mine, best, cfg.replace)
            slots = [members[int(i)] for i in ctx.rng.permutation(len(members))[:len(keep)]]
            for slot, j in zip(slots, keep):
                e = guided[j]
                e.weight = 0.0 if cfg.shaping and not cfg.keep_context else 1.0
                replaced[id(slot)] = e
        out = [replaced.get(id(e), e) for e in episodes]
        n_rows = len(replaced)
        guided_tokens = sum(e.num_action_tokens for e in guided)
        improved = sum(g.total_reward() > p.total_reward() - p.rewards["trajectory"].get(BONUS, 0.0)
                       for p, g in zip(parents, guided))
        for k, v in (("guided_groups", len(guided_groups)), ("guided_sampled", len(guided)), ("guided_rows", n_rows),
                     ("guided_tokens", guided_tokens)):
            self.counts[k] += v
        metrics = {"explore/herl_groups": len(guided_groups) / max(len(groups), 1),
                   "explore/guided_sampled": float(len(guided)),
                   "explore/guided_success": sum(e.success for e in guided) / max(len(guided), 1),
                   "explore/guided_improved": improved / max(len(guided), 1),
                   "explore/guided_rows": float(n_rows),
                   "explore/guided_share": n_rows / max(len(out), 1),
                   "explore/bonus_rows": float(n_bonus),
                   "explore/bonus_mean": bonus_sum / max(n_bonus, 1),
                   "explore/guided_tokens": float(guided_tokens),
                   "explore/policy_tokens": float(sum(e.num_action_tokens for e in episodes)),
                   "explore/context_chars": sum(len(s.context or "") for s in starts) / max(len(starts), 1),
                   "explore/guided_rows_total": self.counts["guided_rows"],
                   "time/guidance_s": time.perf_counter() - t0}
        return out, metrics

    def sample(self, ctx: ExploreContext, starts: list[Start]) -> list[Episode]:
        """The guided responses: through the run's rollout at its temperature, or at `guided_temperature` with
        the policy (the recorded μ is then the log-prob under that temperature, the true behaviour)."""
        if not starts:
            return []
        cfg = self.cfg
        if cfg.guided_temperature is None or self.policy is None:
            return ctx.rollout(starts)
        return sample_with(self.policy, ctx, cfg, starts, cfg.guided_temperature)

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = defaultdict(float, state.get("counts", {}))
