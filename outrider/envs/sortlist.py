"""SortList: a free-form task with a reference answer and no partial-credit verifier (the method sheet's T4
RefAns), for likelihood rewards (log-p of a reference [46], RLPR [67]).

The prompt ``sort:qdmaq=`` asks for the letters in order. With ``reasoning: draft`` (the default) a worked
response first writes a draft of the sorted list, then ``#`` and the answer: ``admqq#admqq``; the text before
the last ``#`` is the reasoning z that a likelihood reward conditions the reference on, ``p(y* | x, z)``. With
``reasoning: none`` the response is the answer alone (z is empty: a likelihood reward is then the same for every
sample of a prompt). The verifier is exact match of the text after the last ``#`` (the whole response without
reasoning): 1 or 0, sparse when lists are long. The answer's length is the knob ``min_len``/``max_len``.

Splits. Each letter tuple is assigned by a hash of (tuple, seed) to train (most), test or validation; train
problems are drawn from train tuples only and the eval split is the test tuples (``holdout: validation`` for
the validation ones), so no held-out list is ever trained on. The env reports the reference answer as
``StepInfo.reference`` for score components that need it.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Literal

from pydantic import Field, model_validator

from outrider.envs.base import ENVS, Split
from outrider.envs.single_turn import SingleTurnConfig, SingleTurnTask

ANSWER_MARK = "#"


class SortListConfig(SingleTurnConfig):
    template: str = Field("sort:{question}=", description="Prompt shown to the policy: `{question}` is the "
                                                          "unsorted letters, e.g. `qdmaq`.")
    min_len: int = Field(4, ge=1, le=64, description="Fewest letters in a list (the answer's length).")
    max_len: int = Field(6, ge=1, le=64, description="Most letters in a list (the answer's length).")
    alphabet: str = Field("abcdefghijklmnopqrstuvwxyz", min_length=2,
                          description="Letters drawn (with repeats) into a list; sorted by this string's order.")
    reasoning: Literal["draft", "none"] = Field("draft", description="draft: demonstrations write a draft of the "
                                                                     "sorted list, `#`, then the answer (the "
                                                                     "reasoning z a likelihood reward conditions "
                                                                     "on); none: the answer alone.")
    holdout_fraction: float = Field(0.2, gt=0, lt=0.5, description="Share of letter tuples held out for test, "
                                                                   "and again for validation (by hash).")
    holdout: Literal["test", "validation"] = Field("test", description="Which held-out tuples the eval split uses.")
    seed: int = Field(0, description="Seed of the train/test/validation assignment of tuples.")

    @model_validator(mode="after")
    def _check(self) -> "SortListConfig":
        if self.min_len > self.max_len:
            raise ValueError(f"min_len ({self.min_len}) > max_len ({self.max_len})")
        if len(set(self.alphabet)) != len(self.alphabet) or ANSWER_MARK in self.alphabet:
            raise ValueError(f"alphabet must hold distinct characters and no {ANSWER_MARK!r}, got {self.alphabet!r}")
        return self


def bucket(letters: str, seed: int, fraction: float) -> str:
    """The split a letter tuple belongs to: test, validation or train (by a hash of the tuple and the seed)."""
    h = int(hashlib.sha256(f"sortlist:{seed}:{letters}".encode()).hexdigest()[:8], 16) / 2**32
    return "test" if h < fraction else "validation" if h < 2 * fraction else "train"


@ENVS.register("sortlist", config=SortListConfig)
class SortListTask(SingleTurnTask):
    """Sort a list of letters; a draft then ``#answer`` (or the answer alone); exact-match verifier; the
    reference answer on every step's info (T4 RefAns: likelihood rewards [46, 67])."""

    def __init__(self, cfg: SortListConfig):
        super().__init__(cfg)
        self.cfg: SortListConfig = cfg
        self.order = {ch: i for i, ch in enumerate(cfg.alphabet)}
        self.check_template()

    def letters(self, split: str, index: int) -> str:
        """The index-th unsorted list of a split (deterministic; rejection keeps it in its split)."""
        want = "train" if split == "train" else self.cfg.holdout
        rng = random.Random(f"sortlist:{self.cfg.seed}:{want}:{index}")
        while True:
            n = rng.randint(self.cfg.min_len, self.cfg.max_len)
            letters = "".join(rng.choice(self.cfg.alphabet) for _ in range(n))
            if bucket(letters, self.cfg.seed, self.cfg.holdout_fraction) == want:
                return letters

    def problem(self, split: Split, index: int) -> dict[str, Any]:
        letters = self.letters(split, index)
        answer = "".join(sorted(letters, key=self.order.__getitem__))
        return {"question": letters, "answer": answer, "metadata": {"length": len(letters)}}

    def parse(self, response: str) -> str | None:
        if self.cfg.reasoning == "none":
            return super().parse(response)  # plain or tagged, as answer_format says
        return response.rsplit(ANSWER_MARK, 1)[1].strip() if ANSWER_MARK in response else None

    def verify(self, problem: dict[str, Any], answer: str | None) -> float:
        return float(answer is not None and answer == problem["answer"])

    def demonstration_text(self, problem: dict[str, Any]) -> str:
        answer = problem["answer"]
        return answer if self.cfg.reasoning == "none" else f"{answer}{ANSWER_MARK}{answer}"
