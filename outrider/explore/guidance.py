"""Guidance on demand: AMPO's adaptive multi-teacher replacement [121] and the LUFFY-style always-mix baseline
(explore piece ``ampo``).

Each step samples ``prompts_per_step`` groups of ``group_size`` on-policy episodes and scores them, as GRPO does.
Then, following the authors' code (SII-Enigma/AMPO, ``adaptive_mix_src/mix_dapo_trainer.py``,
``exp_scripts/train_ampo.sh``):

- **When** (``inject``): ``on_fail`` (AMPO's ``injection_strategy: adaptive``): only a group in which no member
  succeeded gets guidance (their success threshold is 1/G); ``always`` (the LUFFY-style baseline the paper
  beats): every group does.
- **Teachers** (``teachers``): ``demonstrations`` (the task's worked solutions, ``task.demonstrations``) and/or
  checkpoint directories of other policies (same tokenizer as the policy); a policy teacher samples
  ``teacher_samples`` solutions per guided prompt, and only those the task's checker accepts are candidates (a
  demonstration is played through the env and checked too).
- **Selection** (``select``): ``comprehension`` ranks the candidates by the student's mean log-likelihood per
  token of the teacher's path, ``ℓ(y) = (1/|y|)·Σ_t log π_θ(y_t | x, y_<t)``, and keeps the top ``replace``
  (the paper's comprehension-based selection, ``target_selection_strategy: best_k``); ``random`` draws them.
  The authors' code scores only the answer tokens' mean probability after the teacher's reasoning
  (``compute_score_name: mean_exp_log_softmax`` on the ground-truth span); here the whole path is scored.
- **Replacement** (``replace`` = k, the authors' ``num_off_policy_targets`` 2 of 8): k members of the group
  (failed ones first, drawn at random) are replaced by the selected teacher paths, which join the group: GRPO's
  advantages are computed over the mixed group (``(R − mean_g R)/std_g R``), so the failures get a negative
  advantage and the teacher paths a positive one.

A teacher path is an episode with ``origin = "guided"`` and ``off_policy`` set; its recorded behaviour
log-probs μ are the student's own at selection time (computed for the ranking), so the learner's
``origin/guided/iw_mean`` is ``π_old/μ`` (1 within a single-epoch step). With ``shaping: true`` (the authors'
``off_policy_reshape: p_div_p_0.1``) the row has weight 0 in the policy surrogate and the ``guided_shaping``
term (`outrider.update.guided`) trains it with ``−A·π_θ/(π_θ + γ)``; with ``false`` it trains through the
surrogate like an on-policy row (ratio π_θ/μ, clipped), the ablation.

State: running counts (guided groups, injections per teacher), in checkpoints. Teacher models are loaded once at
build time and never trained.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from outrider.data import Episode, groups_of, pack
from outrider.envs.base import close_env
from outrider.errors import OutriderError
from outrider.explore import EXPLORE, ExploreConfig, ExploreContext
from outrider.explore.rollout import rollout
from outrider.explore.step_check import given_turn, state_key, step_given, time_limit
from outrider.policy.sampler import SamplingParams
from outrider.registry import BuildContext, Piece

DEMONSTRATIONS = "demonstrations"


class GuidanceConfig(ExploreConfig):
    teachers: list[str] = Field(default_factory=lambda: [DEMONSTRATIONS], min_length=1,
                                description="Where teacher solutions come from: 'demonstrations' (the task's "
                                            "worked solutions) and/or checkpoint directories of other policies "
                                            "(same tokenizer), several allowed.")
    inject: Literal["on_fail", "always"] = Field(
        "on_fail", description="on_fail: guide only groups where every member failed (AMPO); always: every group "
                               "gets teacher paths (the LUFFY-style always-mix baseline).")
    replace: int = Field(2, ge=1, description="k: group members replaced by teacher paths (authors: 2 of 8); at most "
                                              "the candidates there are.")
    select: Literal["comprehension", "random"] = Field(
        "comprehension", description="comprehension: keep the k candidates with the highest mean student "
                                     "log-likelihood per token (AMPO); random: k drawn at random.")
    teacher_samples: int = Field(4, ge=1, description="Solutions each policy teacher samples per guided prompt "
                                                      "(only verified ones are candidates).")
    teacher_temperature: float = Field(1.0, gt=0, description="Sampling temperature of policy teachers.")
    shaping: bool = Field(True, description="true: teacher paths have weight 0 in the policy surrogate and the "
                                            "guided_shaping term trains them (-A·p/(p+gamma), the authors' "
                                            "p_div_p_0.1); false: the surrogate trains them (ratio pi/mu).")


def term_names(recipe: Any) -> list[str]:
    """The names of a recipe's ``update.terms``."""
    terms = getattr(getattr(recipe, "update", None), "terms", None) or []
    return [t.get("name") if isinstance(t, dict) else t for t in terms]


def sample_with(policy: Any, ctx: ExploreContext, cfg: ExploreConfig, starts: list[Any], temperature: float
                ) -> list[Episode]:
    """Episodes of `policy` (a teacher, or the policy at another temperature) from `starts` on the train split,
    with the piece's sampling options at `temperature`, seeded from the step's rng."""
    params = SamplingParams(temperature=temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                            max_new_tokens=cfg.max_new_tokens, stop=list(cfg.stop))
    gen = torch.Generator().manual_seed(int(ctx.rng.integers(0, 2**31 - 1)))
    task = ctx.task
    return rollout(policy, lambda: task.make_env("train"), starts, params, gen, task.max_turns)


def load_teacher(path: str, student: Any, where: str) -> Any:
    """A teacher policy from a checkpoint directory: a one-line `OutriderError` naming `where` and the path when it
    does not exist, does not load, or has another tokenizer than the student."""
    from outrider.policy.model import Policy

    if not Path(path).is_dir():
        raise OutriderError(f"{where}: no checkpoint directory '{path}' (valid: 'demonstrations' or a directory "
                            f"with config.json)")
    teacher = Policy.load(path, where=where)
    if student is not None and teacher.tokenizer.get_vocab() != student.tokenizer.get_vocab():
        raise OutriderError(f"{where}: the model in '{path}' has another tokenizer than the policy (teachers must "
                            f"share the policy's tokenizer)")
    teacher.model.eval()
    return teacher


def student_logprobs(policy: Any, episodes: list[Episode], temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0) -> list[list[float]]:
    """The student's log-probs of every action token of each episode, in order (one no-grad forward, at the
    sampler's temperature and truncation, as the learner scores rows)."""
    batch = pack(episodes, policy.pad_id, policy.bos_id)
    was_training = policy.model.training
    policy.model.eval()
    with torch.no_grad():
        lp = policy.score(batch.input_ids, batch.attention_mask, temperature, top_k=top_k, top_p=top_p).logprobs
    policy.model.train(was_training)
    out = []
    for i, e in enumerate(episodes):
        row = lp[i][batch.action_mask[i] > 0].tolist()  # prefix_tokens is 0 here: every action token
        out.append(row[:e.num_action_tokens])
    return out


def comprehension(logprobs: list[float]) -> float:
    """``(1/|y|)·Σ_t log π_θ(y_t | x, y_<t)``: the student's mean log-likelihood per token of a teacher path [121]."""
    return sum(logprobs) / max(len(logprobs), 1)


def choose(scores: list[float], k: int, how: str, rng: Any) -> list[int]:
    """Indices of the k candidates kept: the k highest scores, best first (ties: the earlier), or k at random."""
    k = min(k, len(scores))
    if how == "random":
        return sorted(int(i) for i in rng.choice(len(scores), size=k, replace=False))
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def slots_to_replace(group: list[Episode], k: int, rng: Any) -> list[int]:
    """Positions (in `group`) of the k members replaced: failed members first, each set drawn at random."""
    failed = [i for i, e in enumerate(group) if not e.success]
    rest = [i for i, e in enumerate(group) if e.success]
    order = [failed[int(j)] for j in rng.permutation(len(failed))] + [rest[int(j)] for j in rng.permutation(len(rest))]
    return order[:k]


@EXPLORE.register("ampo", config=GuidanceConfig)
class Guidance(Piece):
    """AMPO guidance on demand [121] (``inject: on_fail``) or LUFFY-style always-mix (``inject: always``)."""

    cfg: GuidanceConfig

    def __init__(self, cfg: GuidanceConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        build = build or BuildContext()
        self.policy = build.policy
        self.teachers: dict[str, Any] = {}
        for i, name in enumerate(cfg.teachers):
            if name != DEMONSTRATIONS:
                self.teachers[name] = load_teacher(name, self.policy, f"{build.where or 'explore'}.teachers[{i}]")
        if DEMONSTRATIONS in cfg.teachers and build.task is not None and not hasattr(build.task, "demonstrations"):
            raise OutriderError(f"{build.where or 'explore'}.teachers: task '{type(build.task).__name__}' has no "
                                f"demonstrations (valid: checkpoint directories)")
        if cfg.shaping and build.recipe is not None and "guided_shaping" not in term_names(build.recipe):
            raise OutriderError(f"{build.where or 'explore'}.shaping: true needs update.terms: [guided_shaping] "
                                f"(teacher rows have weight 0 in the surrogate); or set shaping: false")
        self.counts: dict[str, float] = {}

    def __call__(self, ctx: ExploreContext) -> tuple[list[Episode], dict[str, float]]:
        cfg = self.cfg
        episodes = ctx.sample_groups(ctx.next_seeds(cfg.prompts_per_step), cfg.group_size)
        ctx.score(episodes)
        t0 = time.perf_counter()
        groups = groups_of(episodes)
        guided = {g: m for g, m in groups.items() if cfg.inject == "always" or not any(e.success for e in m)}
        replaced: dict[int, Episode] = {}
        stats = {"candidates": 0.0, "teacher_sampled": 0.0, "teacher_verified": 0.0, "chosen_loglik": 0.0}
        for gid, members in guided.items():
            cands = self.candidates(ctx, members[0], stats)
            if not cands:
                continue
            lps = student_logprobs(self.policy, [e for e, _ in cands], cfg.temperature, cfg.top_k, cfg.top_p) if self.policy is not None else \
                [[0.0] * e.num_action_tokens for e, _ in cands]
            scores = [comprehension(lp) for lp in lps]
            keep = choose(scores, cfg.replace, cfg.select, ctx.rng)
            slots = slots_to_replace(members, len(keep), ctx.rng)
            for slot, j in zip(slots, keep):
                e, teacher = cands[j]
                self.mark(e, gid, lps[j], teacher, scores[j])
                replaced[id(members[slot])] = e
                stats["chosen_loglik"] += scores[j]
                self.counts[f"teacher/{teacher}"] = self.counts.get(f"teacher/{teacher}", 0.0) + 1
        out = [replaced.get(id(e), e) for e in episodes]
        n_guided = len(replaced)
        self.counts["injections"] = self.counts.get("injections", 0.0) + n_guided
        self.counts["guided_groups"] = self.counts.get("guided_groups", 0.0) + sum(
            any(id(e) in replaced for e in m) for m in guided.values())
        all_fail = sum(not any(e.success for e in m) for m in groups.values())
        metrics = {"explore/all_fail_groups": all_fail / max(len(groups), 1),
                   "explore/guided_rows": float(n_guided),
                   "explore/guided_share": n_guided / max(len(out), 1),
                   "explore/teacher_candidates": stats["candidates"],
                   "explore/teacher_verified_frac": stats["teacher_verified"] / max(stats["teacher_sampled"], 1.0),
                   "explore/chosen_loglik": stats["chosen_loglik"] / max(n_guided, 1),
                   "explore/injections_total": self.counts["injections"],
                   "time/guidance_s": time.perf_counter() - t0}
        metrics.update({f"explore/{k}": v for k, v in self.counts.items() if k.startswith("teacher/")})
        return out, metrics

    def mark(self, e: Episode, group_id: int, logprobs: list[float], teacher: str, score: float) -> None:
        """Make a verified teacher path a member of `group_id`: a guided, off-policy row whose recorded
        behaviour log-probs are the student's at selection time; weight 0 when the shaping term trains it."""
        e.group_id, e.origin, e.off_policy, e.prefix_tokens = group_id, "guided", True, 0
        e.weight = 0.0 if self.cfg.shaping else 1.0
        e.metadata.update({"teacher": teacher, "comprehension": score})
        at = 0
        for t in e.turns:
            n = len(t.action_ids)
            t.behaviour_logprobs = list(logprobs[at:at + n])
            at += n

    def candidates(self, ctx: ExploreContext, parent: Episode, stats: dict[str, float]) -> list[tuple[Episode, str]]:
        """Verified teacher solutions for the parent's prompt, deduplicated by their action tokens, with the
        teacher's name; scored by the recipe's components."""
        found: list[tuple[Episode, str]] = []
        for name in self.cfg.teachers:
            if name == DEMONSTRATIONS:
                eps = [self.demonstration(ctx.task, parent)]
            else:
                eps = self.sample_teacher(ctx, name, parent)
            eps = [e for e in eps if e is not None]
            ctx.score(eps)
            stats["teacher_sampled"] += len(eps)
            ok = [e for e in eps if e.success]
            stats["teacher_verified"] += len(ok)
            found += [(e, name if name == DEMONSTRATIONS else Path(name).name) for e in ok]
        seen, unique = set(), []
        for e, name in found:
            key = tuple(i for t in e.turns for i in t.action_ids)
            if key not in seen:
                seen.add(key)
                unique.append((e, name))
        stats["candidates"] += len(unique)
        return unique

    def demonstration(self, task: Any, parent: Episode) -> Episode | None:
        """The task's worked solution for the parent's seed, played through the env (its observations) and
        checked by it; None when the task has none."""
        demos = task.demonstrations([parent.seed])
        if not demos:
            return None
        turns, info, done = [], {}, False
        with time_limit(task) as clock:
            env = task.make_env("train")
            try:
                obs = clock.call(env.reset, parent.seed)
                for _, action in demos[0].turns:
                    if done:
                        break
                    turn = given_turn(self.policy, obs, not turns, action, state_key(env))
                    turns.append(turn)
                    obs, done, info = step_given(env, turn, clock)
            finally:
                close_env(env)
        return Episode(group_id=parent.group_id, seed=parent.seed, turns=turns, done=done,
                       success=bool(info.get("success", False)), metadata={"teacher": DEMONSTRATIONS})

    def sample_teacher(self, ctx: ExploreContext, name: str, parent: Episode) -> list[Episode]:
        """`teacher_samples` episodes of a teacher policy from the parent's seed (its own sampling log-probs are
        replaced by the student's when chosen)."""
        from outrider.data import Start

        cfg = self.cfg
        starts = [Start(seed=parent.seed, group_id=parent.group_id) for _ in range(cfg.teacher_samples)]
        return [copy.copy(e) for e in sample_with(self.teachers[name], ctx, cfg, starts, cfg.teacher_temperature)]

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = dict(state.get("counts", {}))
