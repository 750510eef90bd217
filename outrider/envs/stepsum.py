"""StepSum: add a chain of one-digit numbers, step by step. A task whose demonstrations show the reasoning steps in
two styles, long and short, so a warm-started model writes multi-step traces of varying length: what ReCUT [108]
needs (stepwise trials, long/short switched sampling, accuracy and brevity preferences).

The prompt ``3+5+2+4=`` asks for the sum. A long trace restates each addition, a short one only the running
sums; both end with ``#`` and the answer:

    long:   3+5=8,8+2=10,10+4=14,#14        short:  8,10,14,#14

Steps are separated by ``,`` (`STEP_SEPARATOR`); the answer is the text after the last ``#`` and the verifier is
exact (1.0 for the right integer, else 0.0). Untagged demonstrations are long with probability ``long_fraction``
(by default mostly long: the warm start "overthinks"); a share ``instruction_fraction`` of demonstrations carries
an instruction after the prompt (``instructions.long`` / ``instructions.short``) and then shows that style, so the
instruction switches the style as ReCUT's long and short prompts do. Evaluation prompts carry no instruction.

Splits. Each term tuple is assigned by a hash of (terms, seed) to train (most), test or validation (the held-out
shares); train problems are drawn from the train tuples only, and the eval split is the test tuples, or the
validation tuples with ``holdout: validation`` (for choosing e.g. a merge weight without touching the test set).
With ``stratify_terms`` a held-out problem draws its number of terms uniformly and then a tuple of that length from
its split, so test and validation hold each term count equally often (without it, 2-term chains, the easiest, can
be twice as common in one held-out split as in the other when few 2-term tuples fall in it).
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from outrider.envs.base import ENVS, Demonstration, Split
from outrider.envs.single_turn import SingleTurnConfig, SingleTurnTask
from outrider.errors import OutriderError

STEP_SEPARATOR = ","
ANSWER_MARK = "#"


class StepSumConfig(SingleTurnConfig):
    template: str = Field("{question}=", description="Prompt shown to the policy: `{question}` is the chain, e.g. "
                                                     "`3+5+2+4`.")
    min_terms: int = Field(3, ge=2, le=12, description="Fewest numbers to add.")
    max_terms: int = Field(5, ge=2, le=12, description="Most numbers to add.")
    max_digit: int = Field(9, ge=1, le=9, description="Numbers are drawn from 1..max_digit.")
    long_fraction: float = Field(0.7, ge=0, le=1, description="Share of untagged demonstrations in the long style "
                                                              "(each addition restated); the rest are short.")
    instruction_fraction: float = Field(0.5, ge=0, le=1, description="Share of demonstrations whose prompt ends "
                                                                     "with a style instruction (and that style).")
    instructions: dict[str, str] = Field(default_factory=lambda: {"long": " L", "short": " S"},
                                         description="Text appended to the prompt to ask for each style: keys long "
                                                     "and short.")
    holdout_fraction: float = Field(0.2, gt=0, lt=0.5, description="Share of term tuples held out for test, and "
                                                                   "again for validation (by hash).")
    holdout: Literal["test", "validation"] = Field("test", description="Which held-out tuples the eval split uses.")
    seed: int = Field(0, description="Seed of the train/test/validation assignment of term tuples.")
    stratify_terms: bool = Field(False, description="Held-out problems (test and validation) draw their number of "
                                                    "terms uniformly first and then a tuple of that length from their "
                                                    "split, so both splits have the same mix of term counts. false: "
                                                    "a draw outside the split redraws the count too, so each split's "
                                                    "mix follows its own share of each count's tuples.")

    @model_validator(mode="after")
    def _check(self) -> "StepSumConfig":
        if self.min_terms > self.max_terms:
            raise ValueError(f"min_terms ({self.min_terms}) > max_terms ({self.max_terms})")
        if set(self.instructions) != {"long", "short"}:
            raise ValueError(f"instructions must have exactly the keys long and short, got {sorted(self.instructions)}")
        return self


def trace(terms: list[int], style: str) -> str:
    """The worked solution of `terms` in a style: ``a+b=s,`` per step (long) or ``s,`` (short), then ``#answer``."""
    steps, total = [], terms[0]
    for t in terms[1:]:
        steps.append(f"{total}+{t}={total + t}" if style == "long" else str(total + t))
        total += t
    return STEP_SEPARATOR.join(steps + [f"{ANSWER_MARK}{total}"])


def split_steps(text: str) -> list[str]:
    """A response's steps, each with its trailing separator (the last one without): concatenated they give the
    text back."""
    parts = text.split(STEP_SEPARATOR)
    return [p + STEP_SEPARATOR for p in parts[:-1]] + [parts[-1]]


@dataclass
class StepCheck:
    """Per-step verdicts of one response (`check_steps`): ``correct[k]`` for its k-th step (`split_steps`, the
    answer step last) and ``first_wrong``, the index of the first wrong step (None when every step is right)."""

    correct: list[bool]
    first_wrong: int | None


def check_steps(terms: list[int], response: str) -> StepCheck:
    """Check a response step by step against the true running sums ``S_k = terms[0] + … + terms[k]``.

    Intermediate step k (0-based, before the answer step) is right when it is ``S_{k+1}`` (short style) or
    ``S_k+terms[k+1]=S_{k+1}`` (long style), for k < len(terms) − 1; a step beyond the last addition is wrong (an
    extra step). The last step is the answer step: right when it is ``#`` and the total. A wrong step may follow
    from an earlier one (a carried error); the first wrong step is where the solution went wrong.
    """
    steps = [s.rstrip(STEP_SEPARATOR) for s in split_steps(response)]
    sums = [sum(terms[:k + 1]) for k in range(len(terms))]
    correct = []
    for k, step in enumerate(steps[:-1]):
        if k + 1 >= len(terms):
            correct.append(False)
            continue
        long_form = f"{sums[k]}+{terms[k + 1]}={sums[k + 1]}"
        correct.append(step.strip() in (str(sums[k + 1]), long_form))
    correct.append(steps[-1].strip() == f"{ANSWER_MARK}{sums[-1]}")
    return StepCheck(correct, next((k for k, ok in enumerate(correct) if not ok), None))


_TRACE = re.compile(r"(\d+(\+\d+=\d+)?,)*#\d+")


def step_criteria(terms: list[int], response: str) -> dict[str, bool]:
    """The rubric of a stepsum response: ``format`` (a well-formed trace: steps ``s`` or ``a+b=s`` joined by
    ``,`` and a last step ``#n``, whatever the numbers), ``step_k`` for each of the len(terms) − 1 additions (the
    k-th step, 1-based, is the true k-th running sum, as `check_steps` says; a missing step fails) and
    ``answer`` (the answer step is ``#`` and the total: the verifier)."""
    verdict = check_steps(terms, response)
    out = {"format": _TRACE.fullmatch(response.strip()) is not None}
    inner = verdict.correct[:-1]
    for k in range(len(terms) - 1):
        out[f"step_{k + 1}"] = k < len(inner) and inner[k]
    out["answer"] = verdict.correct[-1]
    return out


def _bucket(terms: tuple[int, ...], seed: int, fraction: float) -> str:
    h = int(hashlib.sha256(f"stepsum:{seed}:{terms}".encode()).hexdigest()[:8], 16) / 2**32
    return "test" if h < fraction else "validation" if h < 2 * fraction else "train"


@ENVS.register("stepsum", config=StepSumConfig)
class StepSumTask(SingleTurnTask):
    """Add a chain of digits 1..max_digit step by step; long and short worked demonstrations, instructions that switch the
    style, exact verifier on the text after the last ``#`` (ReCUT [108]'s stepwise task, at toy scale)."""

    def __init__(self, cfg: StepSumConfig):
        super().__init__(cfg)
        self.cfg: StepSumConfig = cfg
        self.instructions = dict(cfg.instructions)
        if cfg.stratify_terms:  # before check_template draws a problem
            self._check_strata()
        self.check_template()

    def _check_strata(self) -> None:
        """Every term count must have a tuple in each held-out split, or a stratified draw would never end (checked
        where the tuples of a count are few enough to list; longer chains have thousands of tuples)."""
        cfg = self.cfg
        for n in range(cfg.min_terms, cfg.max_terms + 1):
            if cfg.max_digit ** n > 100_000:
                continue
            buckets = {_bucket(t, cfg.seed, cfg.holdout_fraction)
                       for t in itertools.product(range(1, cfg.max_digit + 1), repeat=n)}
            for split in ("test", "validation"):
                if split not in buckets:
                    raise OutriderError(f"task.stratify_terms: no {n}-term tuple falls in the {split} split "
                                        f"(max_digit {cfg.max_digit}, holdout_fraction {cfg.holdout_fraction}); "
                                        "raise min_terms, max_digit or holdout_fraction, or set stratify_terms false")

    def _terms(self, split: str, index: int) -> list[int]:
        want = "train" if split == "train" else self.cfg.holdout
        rng = random.Random(f"stepsum:{self.cfg.seed}:{want}:{index}")
        stratified = self.cfg.stratify_terms and want != "train"
        n = rng.randint(self.cfg.min_terms, self.cfg.max_terms)
        while True:  # rejection: a tuple belongs to exactly one of train, test, validation
            if not stratified:
                n = rng.randint(self.cfg.min_terms, self.cfg.max_terms)
            terms = [rng.randint(1, self.cfg.max_digit) for _ in range(n)]
            if _bucket(tuple(terms), self.cfg.seed, self.cfg.holdout_fraction) == want:
                return terms

    def problem(self, split: Split, index: int) -> dict[str, Any]:
        terms = self._terms(split, index)
        return {"question": "+".join(map(str, terms)), "answer": str(sum(terms)), "metadata": {"terms": terms}}

    def parse(self, response: str) -> str | None:
        return response.rsplit(ANSWER_MARK, 1)[1].strip() if ANSWER_MARK in response else None

    def verify(self, problem: dict[str, Any], answer: str | None) -> float:
        return float(answer is not None and answer == problem["answer"])

    def check_steps(self, problem: dict[str, Any], response: str) -> StepCheck:
        """The step checker (`check_steps`) on one of this task's problems: per-step verdicts, first wrong step."""
        return check_steps(problem["metadata"]["terms"], response)

    def feedback(self, env: Any, action: str) -> str:
        """The criteria `action` does not meet on the problem `env` shows (the optional ``feedback`` hook): each
        wrong step named with what it must compute (``step 2 must be 8+4``: the true previous sum plus the next
        term, not its value), an extra step, and a wrong answer (``the answer must be the last sum``); joined by
        ``; ``, empty when the response is right. A response with too few steps fails only the answer criterion."""
        terms = env.problem["metadata"]["terms"]
        verdict = check_steps(terms, action)
        sums = [sum(terms[:k + 1]) for k in range(len(terms))]
        unmet = []
        for k, ok in enumerate(verdict.correct[:-1]):
            if not ok:
                unmet.append(f"step {k + 1} must be {sums[k]}+{terms[k + 1]}" if k + 1 < len(terms)
                             else f"step {k + 1} is extra")
        if not verdict.correct[-1]:
            unmet.append("the answer must be the last sum")
        return "; ".join(unmet)

    def criteria(self, env: Any, action: str) -> dict[str, bool]:
        """The rubric of `action` on the problem `env` shows (the optional ``criteria`` hook): `step_criteria`,
        i.e. ``format``, ``step_1`` … ``step_{n−1}`` and ``answer``."""
        return step_criteria(env.problem["metadata"]["terms"], action)

    def gold_cot(self, env: Any) -> str:
        """The reference chain of thought of the problem `env` shows (the optional ``gold_cot`` hook, P2S [39]): the
        program's own short trace ``s_1,s_2,…,#total``, the running sums, right by construction."""
        return trace(env.problem["metadata"]["terms"], "short")

    def demonstrations(self, seeds: list[int]) -> list[Demonstration]:
        out = []
        for s in seeds:
            p = self.problem("train", s)
            rng = random.Random(f"stepsum-demo:{self.cfg.seed}:{s}")
            prompt = self.prompt(p)
            if rng.random() < self.cfg.instruction_fraction:
                style = rng.choice(["long", "short"])
                prompt += self.instructions[style]
            else:
                style = "long" if rng.random() < self.cfg.long_fraction else "short"
            out.append(Demonstration([(prompt, trace(p["metadata"]["terms"], style))]))
        return out
