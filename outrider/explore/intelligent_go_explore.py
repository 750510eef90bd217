"""Intelligent Go-Explore [112] (Lu, Hu & Clune 2024): Go-Explore's archive with a foundation model as the judge
of which archived state to return to and whether a newly found state is interesting enough to archive, instead of
the count-based weights of [19].

The judge reads prompts and answers in text (the authors' code, conglu1997/intelligent-go-explore: a numbered
list of the archived states, "choose the index of the most promising state"; for a new state, "is it interesting",
yes or no):

- **state selection** (each return): up to ``candidates`` cells are drawn from the archive by the Go-Explore weight
  W(c) (so the prompt stays short), listed as ``[i] <observation there> (depth d)``; the judge answers an index.
- **interestingness** (each new cell, with ``judge_new``): ``Archive: <a few cells> / New state: <observation>``;
  a new cell is archived only on a yes.

An answer that cannot be read (no index in range, neither yes nor no) falls back to the weight-drawn candidate or
to archiving the state, and is counted (``explore/judge_invalid``). Judges: ``policy`` (the policy itself, greedy,
through the prompt: meaningful only for a pretrained HF model, so a tiny model is refused), or ``module:function``,
a function ``judge(prompt: str) -> str`` (a scripted judge, as the tests use). Judge calls are timed
(``time/explore/judge_s``) and counted (``explore/judge_calls``).
"""

from __future__ import annotations

import importlib
import re
import time
from typing import Any, Callable, Hashable

import torch
from pydantic import Field

from outrider.errors import OutriderError
from outrider.explore import EXPLORE, ExploreContext
from outrider.explore.archive import Cell
from outrider.explore.go_explore import GoExplore, GoExploreConfig
from outrider.registry import BuildContext

SELECT = ("You are exploring an environment. These states have been found so far:\n{states}\n"
          "Which state is the most promising one to return to and explore from, to reach new states and finally "
          "the goal? Answer with its index only.\nIndex:")
INTERESTING = ("You are exploring an environment. Some states found so far:\n{states}\nNew state:\n{new}\n"
               "Is the new state interesting: new and promising for reaching the goal? Answer yes or no.\nAnswer:")


class IGEConfig(GoExploreConfig):
    """Intelligent Go-Explore [112]: the archive of `go_explore` with a judge that picks cells and filters new ones."""

    judge: str = Field("policy", description="Who judges: 'policy' (the policy through the prompts, greedy; "
                                             "a pretrained HF model only) or 'module:function', a function "
                                             "judge(prompt: str) -> str (a scripted judge).")
    candidates: int = Field(8, ge=1, description="Cells (drawn by the Go-Explore weight) listed in a selection "
                                                 "prompt.")
    judge_new: bool = Field(True, description="Ask the judge whether each new cell is interesting (archived only "
                                              "on a yes).")
    judge_tokens: int = Field(8, ge=1, description="'policy' judge: tokens generated per answer.")


def load_judge(spec: str, build: BuildContext, tokens: int = 8) -> Callable[[str], str]:
    """The judge named by `spec` as ``prompt -> answer``; a one-line error for a tiny policy or a bad path."""
    if spec == "policy":
        policy_cfg = getattr(getattr(build.recipe, "policy", None), "model", None)
        if build.policy is None or policy_cfg == "tiny":
            raise OutriderError("explore.judge: 'policy' asks the policy to judge states through a prompt, which only "
                                "means something for a pretrained HF model (policy.model: <path>); with the tiny "
                                "model give a scripted judge as 'module:function'")
        return _policy_judge(build, tokens)
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name) if name else None
    except (ImportError, AttributeError):
        fn = None
    if not callable(fn):
        raise OutriderError(f"explore.judge: {spec!r} is neither 'policy' nor an importable 'module:function'")
    return fn


def _policy_judge(build: BuildContext, tokens: int) -> Callable[[str], str]:
    from outrider.policy.sampler import SamplingParams, sample

    policy, gen = build.policy, build.generator()

    def judge(prompt: str) -> str:
        with torch.no_grad():
            out = sample(policy, [policy.encode_observation(prompt, True)],
                         SamplingParams(temperature=0.0, max_new_tokens=tokens), gen)
        return out[0].text

    return judge


def _listing(cells: list[Cell]) -> str:
    return "\n".join(f"[{i}] {c.text.strip()} (depth {c.depth})" for i, c in enumerate(cells))


@EXPLORE.register("intelligent_go_explore", config=IGEConfig)
class IntelligentGoExplore(GoExplore):
    """Intelligent Go-Explore [112]: `go_explore` whose cell choice and new-cell filter are a judge's answers to
    prompts (the module docstring has the prompts and the fallbacks)."""

    cfg: IGEConfig
    kind = "intelligent_go_explore"

    def __init__(self, cfg: IGEConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        self.judge = load_judge(cfg.judge, build or BuildContext(), cfg.judge_tokens)
        self.calls = self.invalid = 0
        self.judge_s = 0.0

    def _ask(self, prompt: str) -> str:
        t0 = time.perf_counter()
        answer = str(self.judge(prompt))
        self.judge_s += time.perf_counter() - t0
        self.calls += 1
        return answer

    def choose(self, ctx: ExploreContext, n: int) -> list[tuple[int, Hashable]]:
        out: list[tuple[int, Hashable]] = []
        for _ in range(max(n, 0)):
            keys, p = self.archive.probabilities(self.cfg.selection)
            size = min(self.cfg.candidates, int((p > 0).sum()))
            if not size:
                break
            shown = [keys[i] for i in ctx.rng.choice(len(keys), size=size, replace=False, p=p)]
            m = re.search(r"\d+", self._ask(SELECT.format(states=_listing([self.archive.cells[k] for k in shown]))))
            i = int(m.group()) if m else -1
            if not 0 <= i < len(shown):
                self.invalid, i = self.invalid + 1, 0
            self.archive.mark_chosen(shown[i])
            out.append(shown[i])
        return out

    def accept(self, ctx: ExploreContext) -> Callable[[Cell], bool] | None:
        if not self.cfg.judge_new:
            return None
        sample = list(self.archive.cells.values())[-self.cfg.candidates:]

        def interesting(cell: Cell) -> bool:
            answer = self._ask(INTERESTING.format(states=_listing(sample), new=cell.text.strip())).strip().lower()
            if answer.startswith(("yes", "no")):
                return answer.startswith("yes")
            self.invalid += 1
            return True

        return interesting

    def __call__(self, ctx: ExploreContext) -> tuple[list[Any], dict[str, float]]:
        self.calls = self.invalid = 0
        self.judge_s = 0.0
        episodes, metrics = super().__call__(ctx)
        metrics.update({"explore/judge_calls": float(self.calls), "explore/judge_invalid": float(self.invalid),
                        "time/explore/judge_s": self.judge_s})
        return episodes, metrics
