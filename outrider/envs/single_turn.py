"""Single-turn tasks: a problem source with a verifier, wrapped as a one-step `Env`."""

from __future__ import annotations

import re
from abc import abstractmethod
from typing import Any, Literal

from pydantic import Field

from outrider.envs.base import Demonstration, Split, StepInfo, Task, TaskConfig
from outrider.errors import OutriderError

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


class SingleTurnConfig(TaskConfig):
    template: str = Field("{question}", description="Prompt shown to the policy: `{question}` is the problem text, "
                                                    "`{metadata[KEY]}` a field of the problem's metadata.")
    answer_format: Literal["plain", "tagged"] = Field(
        "plain", description="plain: the whole response is the answer; tagged: the text inside <answer>...</answer>."
    )


class SingleTurnTask(Task):
    """A source of (question, reference answer) pairs with a verifier. Subclasses give `problem` and `verify`."""

    def __init__(self, cfg: SingleTurnConfig):
        self.cfg = cfg
        self.eval_size = cfg.eval_size

    @abstractmethod
    def problem(self, split: Split, index: int) -> dict[str, Any]:
        """``{"question": str, "answer": str, ...}`` for the index-th problem of a split (deterministic)."""

    @abstractmethod
    def verify(self, problem: dict[str, Any], answer: str) -> float:
        """Reward in ``[0, 1]`` for a parsed answer."""

    def demonstration_text(self, problem: dict[str, Any]) -> str:
        answer = problem["answer"]
        return f"<answer>{answer}</answer>" if self.cfg.answer_format == "tagged" else answer

    def canonical(self, problem: dict[str, Any], answer: str) -> str:
        """The answer in a normal form, so equal answers count once when diversity is measured (default: stripped).
        Tasks whose answers can be written several ways (numbers, sets) override it."""
        return answer.strip()

    def parse(self, response: str) -> str | None:
        if self.cfg.answer_format == "tagged":
            found = ANSWER_TAG.findall(response)
            return found[-1].strip() if found else None
        return response.strip()

    def prompt(self, problem: dict[str, Any]) -> str:
        try:
            return self.cfg.template.format(question=problem["question"], metadata=problem.get("metadata", {}))
        except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
            raise OutriderError(f"task.template: cannot fill {self.cfg.template!r} ({type(e).__name__}: {e}); "
                                "use {question} or {metadata[KEY]}") from None

    def check_template(self) -> None:
        """Fill the template once with a held-out problem, so a bad template fails before anything runs."""
        self.prompt(self.problem("eval", 0))

    def make_env(self, split: Split) -> "SingleTurnEnv":
        return SingleTurnEnv(self, split)

    def demonstrations(self, seeds: list[int]) -> list[Demonstration]:
        out = []
        for s in seeds:
            p = self.problem("train", s)
            out.append(Demonstration([(self.prompt(p), self.demonstration_text(p))]))
        return out


class SingleTurnEnv:
    """reset(seed) shows problem `seed` of the split; step(answer) verifies it and ends the episode."""

    def __init__(self, task: SingleTurnTask, split: Split):
        self.task, self.split = task, split
        self._problem: dict[str, Any] | None = None
        self._seed = 0

    def reset(self, seed: int) -> str:
        self._seed = seed
        self._problem = self.task.problem(self.split, seed)
        return self.task.prompt(self._problem)

    @property
    def problem(self) -> dict[str, Any]:
        """The problem shown since the last reset (for task hooks that check an action against it)."""
        assert self._problem is not None, "problem before reset()"
        return self._problem

    def snapshot(self) -> int:
        """The problem shown (nothing else changes before the one action)."""
        return self._seed

    def restore(self, state: int) -> str:
        return self.reset(state)

    def step(self, action: str) -> tuple[str, float, bool, StepInfo]:
        assert self._problem is not None, "step() before reset()"
        answer = self.task.parse(action)
        info: dict[str, Any] = {"answer": answer, "reference": self._problem["answer"], "invalid": answer is None}
        reward = 0.0 if answer is None else float(self.task.verify(self._problem, answer))
        info["success"] = reward >= 1.0
        info["canonical"] = None if answer is None else self.task.canonical(self._problem, answer)
        return "", reward, True, info

