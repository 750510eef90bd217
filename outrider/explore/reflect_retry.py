"""R³L: reflect-then-retry with pivotal credit and positive amplification [0] (explore piece ``reflect_retry``).

Each step, for each prompt: sample ``first_attempts`` episodes (the authors' workflow samples half its group,
``n // 2``, and retries the rest), score them; for every failed one find the pivot k (the first turn where it went
wrong: `pivot` rules, `outrider.explore.step_check`), build a reflection, and retry from the pivot with the
reflection shown to the sampler:

    Start(seed, group_id=parent.group_id, prefix=parent.turns[:k], snapshot=parent.turns[k].snapshot,
          context=reflection, origin="retry")

The retry joins its parent's group. Three parts, each switched off for ablation:

- **Language-guided retry** (``reflection``): the env's feedback at the pivot (the pivot action and the text
  the env answered it with), a task-given hint for the pivot state (``task.hint(env)``), or, for pretrained
  models only, the policy's own reflection on the failed attempt from a prompt; ``none`` retries from the pivot
  with nothing added (an on-policy restart). The reflection is removed from the trained sequence, so the retry is
  off-policy: its recorded behaviour log-probs μ (taken under the reflection) meet ``update.off_policy``.
  ``retry_ratio: current`` trains it as on-policy instead (ratio 1), as the authors' OPMD loss −A·log π has no
  ratio at all.
- **Pivotal credit** (``pivot_mask``): the shared prefix turns[:k] is given, not trained, in the retry (the
  `Start` prefix) and, as the authors' ``_adjust_action_mask_for_retry`` does "for fair comparison", in its
  parent too (``mask_parent_prefix``); only the diverging suffixes get gradient. Off: both train every action.
- **Positive amplification** (``amplify``): after scoring, rows with a positive advantage, r > mean of the group's
  rewards, get ``weight ×= amplify`` (the authors' advantage rule: A ≥ 0 → α·A with α = 3; a max-reward row
  gets A = 1 under their mean-baseline OPMD, a cap not reproduced under GRPO's std normalisation);
  ``amplify_rows: successful_retries`` amplifies only the retries that succeeded. 1 turns it off.

Constants from the authors' code (shiweijiezero/R3L, Trinity-RFT): α = 3 (``opmd_reweight_adv``), one retry per
failed first attempt, half the group as first attempts (``n // 2``), the reflection placed before the retried turn
(a system message there). Their workflow also samples a fresh rollout for a first attempt that gets no retry, so a
group always has n members: ``fill: fresh`` (default ``none``: the group is smaller, and the step cheaper).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from outrider.data import Episode, Start, groups_of
from outrider.errors import OutriderError
from outrider.explore import EXPLORE, ExploreConfig, ExploreContext
from outrider.explore.step_check import (Cost, after_last_progress, env_at, first_invalid, first_wrong_step,
                                         require_hook, time_limit)
from outrider.envs.base import close_env
from outrider.envs.time_limit import EnvTimeout
from outrider.policy.sampler import SamplingParams, sample
from outrider.registry import BuildContext, Piece

PivotRule = Literal["invalid", "checker", "no_progress"]
DEFAULT_TEMPLATES = {"feedback": "Previous attempt at this step: {action}\nFeedback: {feedback}\n",
                     "hint": "Hint: {hint}\n", "model": "Reflection on a previous attempt: {reflection}\n"}
REFLECT_PROMPT = ("A previous attempt at this task failed. The attempt, step by step:\n{trajectory}\nIn two "
                  "sentences, say what went wrong first and what to do instead.\n")
TINY_VOCAB = 1024  # a tokenizer this small is a character model: it cannot write a reflection


def format_reflection(template: str, **values: Any) -> str:
    """`template` with ``{action}``, ``{feedback}``, ``{hint}``, ``{reflection}``, ``{turn}`` and ``{eos}``."""
    return template.format_map(defaultdict(str, values))


class ReflectRetryConfig(ExploreConfig):
    first_attempts: int | None = Field(None, ge=1, description="Episodes sampled first per prompt; each failed one "
                                                               "gets one retry, so a group holds at most twice as "
                                                               "many (null: group_size // 2, the authors' split).")
    pivot: list[PivotRule] = Field(["invalid"], min_length=1, description="Rules for the pivot, tried in order: "
                                   "invalid (first turn the env marked invalid), checker (first step the task's "
                                   "step_ok rejects), no_progress (first turn after which no progress event occurs).")
    no_pivot: Literal["start", "skip"] = Field("start", description="A failed episode where no rule finds a pivot: "
                                               "start (retry from the first turn) or skip (no retry).")
    progress_events: list[str] | None = Field(None, description="Events that count as progress for no_progress "
                                              "(null: every event whose name does not end in 'error').")
    reflection: Literal["feedback", "hint", "model", "none"] = Field(
        "feedback", description="What the retry is shown: feedback (the pivot action and the env's answer to it), "
                                "hint (the task's hint(env) at the pivot), model (the policy's own reflection from "
                                "a prompt: pretrained models only), none (nothing: an on-policy retry).")
    template: str | None = Field(None, description="The reflection text: {action} {feedback} {hint} {reflection} "
                                                   "{turn} {eos} (null: a sentence per reflection kind).")
    context_at: Literal["before_observation", "after_observation"] = Field(
        "before_observation", description="Where the reflection goes: before the pivot's observation (the authors' "
                                          "system message) or after it.")
    pivot_mask: bool = Field(True, description="Pivotal credit: the shared prefix is given (untrained) in the retry "
                                               "and in its parent; false trains every action of both.")
    mask_parent_prefix: bool = Field(True, description="With pivot_mask, also leave the parent's turns before the "
                                                       "pivot untrained (the authors' code).")
    amplify: float = Field(3.0, ge=1.0, description="Positive amplification: weight of the amplified rows (the "
                                                    "authors' alpha 3; 1: off).")
    amplify_rows: Literal["positive", "successful_retries"] = Field(
        "positive", description="Rows amplified: positive (reward above the group mean, the authors' A >= 0 rule) "
                                "or successful_retries.")
    retry_ratio: Literal["behaviour", "current"] = Field(
        "behaviour", description="A retry shown a reflection is off-policy: behaviour (its recorded log-probs are "
                                 "update.off_policy's mu) or current (trained as on-policy, ratio 1: the authors' "
                                 "OPMD loss has no ratio).")
    restore: Literal["snapshot", "replay"] = Field("snapshot", description="How a retry reaches its pivot: the "
                                                   "env's snapshot (first attempts keep one per turn) or a replay "
                                                   "of the prefix's actions.")
    reflection_tokens: int = Field(96, ge=1, description="reflection: model: token limit of the reflection.")
    fill: Literal["none", "fresh"] = Field("none", description="A first attempt that gets no retry (a success, no "
                                           "pivot): none (the group is smaller) or fresh (one more on-policy "
                                           "episode from the start in its place, as the authors' workflow does, "
                                           "so every group has 2 x first_attempts).")

    @field_validator("template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                format_reflection(v, action="", feedback="", hint="", reflection="", turn=0, eos="")
            except (ValueError, IndexError, AttributeError) as e:
                raise ValueError(f"not a valid template ({e}); use {{action}}, {{feedback}}, {{hint}}, "
                                 "{reflection}, {turn}, {eos}") from None
        return v


def amplify_weights(episodes: list[Episode], factor: float, rows: str = "positive") -> int:
    """Positive amplification [0]: ``weight ×= factor`` on each episode whose total reward is above its group's
    mean (a positive group-relative advantage), or, with ``rows="successful_retries"``, on each successful retry;
    returns how many were amplified."""
    if factor == 1.0:
        return 0
    n = 0
    for group in groups_of(episodes).values():
        mean = sum(e.total_reward() for e in group) / len(group)
        for e in group:
            hit = (e.origin == "retry" and e.success) if rows == "successful_retries" else e.total_reward() > mean + 1e-9
            if hit:
                e.weight *= factor
                n += 1
    return n


@EXPLORE.register("reflect_retry", config=ReflectRetryConfig)
class ReflectRetry(Piece):
    """R³L reflect-then-retry [0]: failed episodes are retried from their pivot with a reflection in context;
    pivotal credit masks the shared prefix; positive amplification up-weights rows with a positive advantage."""

    cfg: ReflectRetryConfig

    def __init__(self, cfg: ReflectRetryConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        build = build or BuildContext()
        self.policy = build.policy
        self.cost = Cost()
        self.counts: dict[str, float] = {}
        task = build.task
        if task is not None:
            if "checker" in cfg.pivot:
                require_hook(task, "step_ok", "explore.pivot: checker")
            if cfg.reflection == "hint":
                require_hook(task, "hint", "explore.reflection: hint")
        if cfg.reflection == "model":
            model = getattr(getattr(build.recipe, "policy", None), "model", None)
            vocab = len(self.policy.tokenizer) if self.policy is not None else 0
            if model == "tiny" or (self.policy is not None and vocab < TINY_VOCAB):
                raise OutriderError("explore.reflection: 'model' needs a pretrained model that can write a "
                                    "reflection; the tiny character model cannot (use feedback, hint or none)")
        eos = getattr(getattr(self.policy, "tokenizer", None), "eos_token", "") or ""
        self.eos = eos
        self.template = cfg.template or DEFAULT_TEMPLATES.get(cfg.reflection, "")

    # --- pivots and reflections -----------------------------------------------------------------------------
    def pivot(self, task: Any, episode: Episode) -> tuple[int | None, int]:
        """The pivot turn of a failed episode by the first rule that finds one (None: none did), and the env steps
        the step checker's replay took."""
        steps = 0
        for rule in self.cfg.pivot:
            if rule == "invalid":
                k = first_invalid(episode)
            elif rule == "no_progress":
                k = after_last_progress(episode, self.cfg.progress_events)
            else:
                k, used = first_wrong_step(task, episode)
                steps += used
            if k is not None:
                return k, steps
        return (0 if self.cfg.no_pivot == "start" else None), steps

    def reflect(self, task: Any, episode: Episode, k: int, generator: torch.Generator) -> tuple[str | None, int, int]:
        """The reflection text for a retry of `episode` from turn k (None: none), and the env steps and tokens it
        took (a replay to the pivot for a hint; the sampled reflection for ``model``)."""
        kind = self.cfg.reflection
        if kind == "none":
            return None, 0, 0
        turn = episode.turns[k]
        values = {"action": turn.action.strip(), "turn": k, "eos": self.eos,
                  "feedback": episode.turns[k + 1].observation.strip() if k + 1 < len(episode.turns) else ""}
        steps = tokens = 0
        if kind == "hint":
            with time_limit(task) as clock:
                try:
                    env, steps = env_at(task, episode, k, clock)
                except EnvTimeout:
                    return None, 0, 0
                try:
                    values["hint"] = task.hint(env)
                finally:
                    close_env(env)
        elif kind == "model":
            values["reflection"], tokens = self.model_reflection(episode, generator)
        return format_reflection(self.template, **values), steps, tokens

    def model_reflection(self, episode: Episode, generator: torch.Generator) -> tuple[str, int]:
        """The policy's own reflection on a failed attempt (pretrained models): the attempt in a prompt, one
        sampled completion of at most `reflection_tokens`."""
        lines = [f"step {k}: saw {t.observation.strip()!r}, did {t.action.strip()!r}" for k, t in
                 enumerate(episode.turns)]
        prompt = REFLECT_PROMPT.format(trajectory="\n".join(lines))
        ids = ([self.policy.bos_id] if self.policy.bos_id is not None else []) + \
            self.policy.encode_observation(prompt, first=True)
        params = SamplingParams(temperature=self.cfg.temperature, top_p=self.cfg.top_p, top_k=self.cfg.top_k,
                                max_new_tokens=self.cfg.reflection_tokens)
        out = sample(self.policy, [ids], params, generator)[0]
        return out.text.strip(), len(out.ids)

    # --- one step -------------------------------------------------------------------------------------------
    def __call__(self, ctx: ExploreContext) -> tuple[list[Episode], dict[str, float]]:
        cfg = self.cfg
        first_n = cfg.first_attempts or max(1, cfg.group_size // 2)
        snapshots = cfg.restore == "snapshot"
        seeds = ctx.next_seeds(cfg.prompts_per_step)
        starts = ctx.group_starts(seeds, first_n)
        first = ctx.rollout(starts, snapshots=snapshots)
        self.cost.episodes(first, [0] * len(first), replayed=False)
        ctx.score(first)
        generator = torch.Generator().manual_seed(int(ctx.rng.integers(2**31 - 1)))
        retry_starts, parents, pivots, checker_steps, reflection_chars = [], [], [], 0, []
        fresh_starts = []
        for parent in first:
            k = None
            if not (parent.success or parent.metadata.get("timed_out") or not parent.turns):
                k, used = self.pivot(ctx.task, parent)
                checker_steps += used
            if k is None:
                if cfg.fill == "fresh":
                    fresh_starts.append(Start(seed=parent.seed, group_id=parent.group_id))
                continue
            k = min(k, len(parent.turns) - 1)
            context, steps, tokens = self.reflect(ctx.task, parent, k, generator)
            self.cost.env_steps += steps
            self.cost.tokens += tokens
            if context is not None:
                reflection_chars.append(len(context))
            snap = parent.turns[k].snapshot if snapshots and k > 0 else None
            retry_starts.append(Start(seed=parent.seed, group_id=parent.group_id, prefix=parent.turns[:k],
                                      snapshot=snap, context=context, context_at=cfg.context_at, origin="retry",
                                      metadata={"pivot": k}))
            parents.append(parent)
            pivots.append(k)
        self.cost.env_steps += checker_steps
        rolled = ctx.rollout(retry_starts + fresh_starts) if retry_starts or fresh_starts else []
        retries, fresh = rolled[:len(retry_starts)], rolled[len(retry_starts):]
        retry_steps, retry_tokens = self.cost.episodes(retries, pivots, replayed=not snapshots)
        self.cost.episodes(fresh, [0] * len(fresh), replayed=False)
        ctx.score(rolled)
        for parent, retry, k in zip(parents, retries, pivots):
            if not cfg.pivot_mask:
                retry.prefix_tokens = 0  # the replayed prefix trains too (its μ: the parent's own log-probs)
            elif cfg.mask_parent_prefix:
                parent.prefix_tokens = max(parent.prefix_tokens, sum(len(t.action_ids) for t in parent.turns[:k]))
            if cfg.retry_ratio == "current":
                retry.off_policy = False
        episodes = first + retries + fresh
        amplified = amplify_weights(episodes, cfg.amplify, cfg.amplify_rows)
        n_fail = sum(not e.success for e in first)
        self._count("retries", len(retries))
        self._count("retry_successes", sum(r.success for r in retries))
        metrics = {"explore/groups_sampled": float(cfg.prompts_per_step),
                   "explore/first_success": sum(e.success for e in first) / max(len(first), 1),
                   "explore/retries": float(len(retries)), "explore/fresh": float(len(fresh)),
                   "explore/retry_success": sum(r.success for r in retries) / max(len(retries), 1),
                   "explore/pivot_found_frac": len(retries) / max(n_fail, 1),
                   "explore/pivot_mean": sum(pivots) / max(len(pivots), 1),
                   "explore/amplified": float(amplified),
                   "explore/retry_env_steps": retry_steps, "explore/retry_tokens": retry_tokens,
                   "explore/checker_env_steps": float(checker_steps),
                   "explore/reflection_chars": sum(reflection_chars) / max(len(reflection_chars), 1),
                   "explore/retries_total": self.counts["retries"],
                   "explore/retry_successes_total": self.counts["retry_successes"]}
        metrics.update(self.cost.metrics())
        return episodes, metrics

    def _count(self, name: str, n: float) -> None:
        self.counts[name] = self.counts.get(name, 0.0) + float(n)

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "cost_totals": dict(self.cost.totals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = dict(state.get("counts", {}))
        self.cost.totals = dict(state.get("cost_totals", {}))
