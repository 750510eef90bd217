"""ReCUT [108]: stepwise trials with long/short switched sampling, preference pairs for accuracy and for brevity,
DPO on each, and a merge of the two models by parameter interpolation (`outrider merge`) with the mixing weight
chosen on a validation split (`choose_weight`).

Stepwise trials (`stepwise_trials`), per train problem, following the authors' data generation [code]:

- keep a partial trajectory ``Y*_{<t}`` (empty at first); at each step ``t`` (up to ``max_steps``) sample one
  full continuation of ``Y*_{<t}`` under the long instruction and one under the short one;
- score each continuation ``y`` by ``R(y) = (α·I(y) − β·(1 − I(y))) / L(y)`` (I: correct, L: its tokens), and put
  each one that reaches an answer into the problem's correct or incorrect pool (with its prefix);
- append the first step of the higher-R continuation (the short one on a tie) to ``Y*``; stop once that step
  holds the answer.

Pairs, per problem [para]: **accuracy**: the shortest correct trajectory (the "optimal solution") over an
incorrect one from the pool (drawn at random); **brevity**: the shortest correct over the longest correct one (when
their lengths differ). Each pair's prompt is the plain task prompt, without the instructions, so DPO trains the
model's default behaviour. The two recipes (recut_accuracy.yaml, recut_brevity.yaml) share the seed, hence the
warm start and the trials; each trains DPO against the frozen warm start on its pairs.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from outrider.errors import OutriderError
from outrider.loops import LOOPS, Run
from outrider.loops.offline import Pair, PairsStep
from outrider.policy.sampler import SamplingParams, sample
from outrider.registry import BuildContext, Piece, PieceConfig

TRIAL_SEED = 2 * 10**7  # train problems of the trials (the warm start uses 1e8 on, `pairs` task pairs 1e7 on)


class ReCUTConfig(PieceConfig):
    """Options of the `recut` loop."""

    objective: Literal["accuracy", "brevity"] = Field(..., description="Which pairs this run trains on: accuracy "
                                                                       "(shortest correct over an incorrect "
                                                                       "trajectory) or brevity (shortest correct "
                                                                       "over the longest correct).")
    trial_prompts: int = Field(256, ge=1, description="Train problems explored by stepwise trials (at step 1, from "
                                                      "the warm-started policy).")
    max_steps: int = Field(8, ge=1, description="Most steps of a partial trajectory tried (the paper's iterations).")
    alpha: float = Field(1.0, gt=0, description="α: reward of a correct continuation in R = (α I − β (1 − I)) / L.")
    beta: float = Field(1.0, ge=0, description="β: penalty of an incorrect continuation in R.")
    step_separator: str = Field("\n", min_length=1, description="Text that ends a reasoning step (stepsum: ',').")
    long_instruction: str | None = Field(None, description="Appended to the prompt for long continuations; null: "
                                                           "the task's instructions['long'].")
    short_instruction: str | None = Field(None, description="Appended to the prompt for short continuations; "
                                                            "null: the task's instructions['short'].")
    max_new_tokens: int | None = Field(None, ge=1, description="Budget of a continuation (null: the explore "
                                                               "piece's max_new_tokens).")
    pairs_per_step: int = Field(16, ge=1, description="Pairs per learner step (each a group of two rows).")


def trial_reward(correct: bool, length: int, alpha: float, beta: float) -> float:
    """``R = (α I − β (1 − I)) / L``: a short correct continuation scores highest, a short wrong one lowest."""
    return (alpha * float(correct) - beta * (1.0 - float(correct))) / max(length, 1)


def first_step(text: str, separator: str) -> str:
    """The text up to and including the first separator (all of it when there is none)."""
    i = text.find(separator)
    return text if i < 0 else text[: i + len(separator)]


def stepwise_trials(policy: Any, task: Any, problems: list[dict[str, Any]], instructions: dict[str, str],
                    cfg: ReCUTConfig, params: SamplingParams, generator: torch.Generator
                    ) -> tuple[list[dict[str, list[tuple[str, int]]]], dict[str, float]]:
    """Long/short switched stepwise trials on each problem, batched across problems. Returns each problem's pools,
    ``{"correct": [(text, tokens)], "incorrect": [...]}``, and metrics (trial samples, tokens, accuracy)."""
    pools: list[dict[str, list[tuple[str, int]]]] = [{"correct": [], "incorrect": []} for _ in problems]
    prefix = [""] * len(problems)
    active = list(range(len(problems)))
    samples = tokens = correct = 0
    for _ in range(cfg.max_steps):
        if not active:
            break
        out: dict[str, list[Any]] = {}
        for mode in ("long", "short"):
            prompts = [policy.encode_observation(task.prompt(problems[i]) + instructions[mode], first=True)
                       + (policy.encode(prefix[i]) if prefix[i] else []) for i in active]
            out[mode] = sample(policy, prompts, params, generator)
        still = []
        for row, i in enumerate(active):
            best: tuple[float, str] | None = None
            for mode in ("long", "short"):  # short second: it wins ties
                s = out[mode][row]
                samples, tokens = samples + 1, tokens + len(s.ids)
                text = prefix[i] + s.text
                answer = task.parse(text)
                ok = answer is not None and task.verify(problems[i], answer) >= 1.0
                correct += ok
                if answer is not None:
                    pools[i]["correct" if ok else "incorrect"].append((text, len(policy.encode(text))))
                r = trial_reward(ok, len(s.ids), cfg.alpha, cfg.beta)
                if best is None or r >= best[0]:
                    best = (r, s.text)
            step = first_step(best[1], cfg.step_separator)
            prefix[i] += step
            if step and task.parse(step) is None and step.endswith(cfg.step_separator):
                still.append(i)  # the chosen step did not answer: try the next step
        active = still
    return pools, {"recut/trial_samples": float(samples), "recut/trial_tokens": float(tokens),
                   "recut/trial_accuracy": correct / max(samples, 1)}


def recut_pairs(prompts: list[str], pools: list[dict[str, list[tuple[str, int]]]], objective: str,
                rng: np.random.Generator) -> list[Pair]:
    """One pair per problem whose pools allow it: accuracy (shortest correct over a random incorrect) or brevity
    (shortest correct over the longest correct, if longer)."""
    pairs = []
    for prompt, pool in zip(prompts, pools):
        good = sorted(set(pool["correct"]), key=lambda x: (x[1], x[0]))
        if not good:
            continue
        if objective == "accuracy":
            bad = sorted(set(pool["incorrect"]))
            if bad:
                pairs.append(Pair(prompt, good[0][0], bad[int(rng.integers(len(bad)))][0]))
        elif good[-1][1] > good[0][1]:
            pairs.append(Pair(prompt, good[0][0], good[-1][0]))
    return pairs


def choose_weight(results: dict[float, dict[str, float]], tolerance: float) -> float:
    """The merge weight to keep: among weights whose validation accuracy is within `tolerance` of the best one,
    the one with the shortest mean response (ties: the smaller weight). `results`: ``{w: {"accuracy", "length"}}``."""
    if not results:
        raise OutriderError("choose_weight: no merged models were evaluated")
    best = max(r["accuracy"] for r in results.values())
    ok = [w for w, r in results.items() if r["accuracy"] >= best - tolerance]
    return min(ok, key=lambda w: (results[w]["length"], w))


@LOOPS.register("recut", config=ReCUTConfig)
class ReCUTStep(PairsStep):
    """One of ReCUT's two DPO models [108]. At step 1 the warm-started policy runs the stepwise trials on
    ``trial_prompts`` train problems (see the module docstring) and the loop keeps the pairs of its ``objective``;
    every step then trains the learner's pairwise terms (``update: {loss: none, terms: [dpo]}``, the frozen warm
    start as reference) on ``pairs_per_step`` of them, as the `pairs` loop does. The pairs are the loop's state, so
    a resumed run trains on the same ones. Metrics: ``recut/pairs``, ``recut/trial_*`` (at step 1) and the learner's.
    Merge the accuracy and brevity runs with ``outrider merge A B --weight w`` and choose w on the validation split
    (benchmarks/recut_pareto.py)."""

    cfg: ReCUTConfig

    def __init__(self, cfg: ReCUTConfig, build: BuildContext | None = None):
        Piece.__init__(self, cfg, build)
        self.where = build.where if build else "loop"
        self.seed = build.seed if build else 0
        self.pairs: list[Pair] | None = None
        recipe = build.recipe if build else None
        if recipe is not None and not recipe.update.terms:
            raise OutriderError("loop recut: update.terms is empty, so nothing would learn from the pairs; add a "
                                "pairwise term, e.g. update.terms: [dpo]")

    def instructions(self, task: Any) -> dict[str, str]:
        own = {"long": self.cfg.long_instruction, "short": self.cfg.short_instruction}
        from_task = getattr(task, "instructions", {}) or {}
        out = {k: v if v is not None else from_task.get(k) for k, v in own.items()}
        for k, v in out.items():
            if v is None:
                raise OutriderError(f"{self.where}.{k}_instruction: the task has no '{k}' instruction; give one "
                                    "(text appended to the prompt to ask for a long or short continuation)")
        return out

    def make_pairs(self, run: Run) -> dict[str, float]:
        t0 = time.perf_counter()
        task = run.task
        problems = [task.problem("train", TRIAL_SEED + i) for i in range(self.cfg.trial_prompts)]
        params = replace(run.params, max_new_tokens=self.cfg.max_new_tokens or run.params.max_new_tokens)
        pools, metrics = stepwise_trials(run.policy, task, problems, self.instructions(task), self.cfg, params,
                                         run.learner_generator(0))
        rng = np.random.default_rng([self.seed, 108])
        self.pairs = recut_pairs([task.prompt(q) for q in problems], pools, self.cfg.objective, rng)
        if not self.pairs:
            raise OutriderError(f"{self.where}: the stepwise trials gave no {self.cfg.objective} pairs on "
                                f"{len(problems)} problems; raise trial_prompts or max_new_tokens, or warm-start "
                                "longer")
        metrics["recut/pairs"] = float(len(self.pairs))
        metrics["time/trials_s"] = time.perf_counter() - t0
        return metrics

    def __call__(self, run: Run, step: int) -> dict[str, float]:
        metrics = self.make_pairs(run) if self.pairs is None else {}
        metrics.update(super().__call__(run, step))
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {} if self.pairs is None else {"pairs": [tuple(p) for p in self.pairs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "pairs" in state:
            self.pairs = [Pair(*p) for p in state["pairs"]]
