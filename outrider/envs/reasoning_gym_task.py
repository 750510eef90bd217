"""Any procedural generator of the `reasoning-gym` package as a single-turn task, verified by its `score_answer`."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from pydantic import Field

from outrider.envs.base import ENVS, Split
from outrider.envs.single_turn import SingleTurnConfig, SingleTurnTask
from outrider.errors import OutriderError

TRAIN_SIZE = 10**9  # generators are lazy: an index is a seed offset, nothing is materialised
SKIP_STRIDE = 7_919  # when a train problem equals a held-out one, look this many indices further


class ReasoningGymConfig(SingleTurnConfig):
    dataset: str = Field(..., description="reasoning-gym generator name, e.g. chain_sum, countdown, gsm_symbolic.")
    config: dict[str, Any] = Field(default_factory=dict, description="The generator's own config options.")
    seed: int = Field(0, description="Data seed: train problems use seed, held-out problems seed + 1.")
    canonical: Literal["strip", "number"] = Field(
        "strip", description="Normal form of an answer, so equal answers count once (outcome bonuses, distinct "
                             "answers): strip: the stripped text; number: a decimal number written one way "
                             "('+07', '7.0' and '7' are '7'; commas dropped, as reasoning-gym's decimal scorer "
                             "does), text that is not a number stays stripped text.")


@ENVS.register("reasoning_gym", config=ReasoningGymConfig)
class ReasoningGymTask(SingleTurnTask):
    """Problems from `reasoning_gym.create_dataset(dataset, **config)`; train and eval use different data seeds and
    any train problem whose question appears in the eval split is skipped, so the splits are disjoint."""

    def __init__(self, cfg: ReasoningGymConfig):
        super().__init__(cfg)
        import reasoning_gym

        self.cfg: ReasoningGymConfig = cfg
        names = sorted(reasoning_gym.factory.DATASETS)
        if cfg.dataset not in names:
            raise OutriderError(f"task.dataset: unknown reasoning-gym dataset '{cfg.dataset}'; "
                                f"valid: {', '.join(names)}")
        try:
            self._train = reasoning_gym.create_dataset(cfg.dataset, seed=cfg.seed, size=TRAIN_SIZE, **cfg.config)
            self._eval = reasoning_gym.create_dataset(cfg.dataset, seed=cfg.seed + 1, size=cfg.eval_size, **cfg.config)
        except (TypeError, ValueError, AssertionError) as e:
            raise OutriderError(f"task.config: invalid for reasoning-gym '{cfg.dataset}': {e}") from None
        self._eval_questions = {self._eval[i]["question"] for i in range(cfg.eval_size)}
        if len(self._eval_questions) < cfg.eval_size // 2:
            raise OutriderError(f"task.config: '{cfg.dataset}' gives only {len(self._eval_questions)} distinct "
                                f"held-out problems for eval_size={cfg.eval_size}; lower task.eval_size")
        self.check_template()

    def problem(self, split: Split, index: int) -> dict[str, Any]:
        if split == "eval":
            return self._eval[index % self.cfg.eval_size]
        idx = index % TRAIN_SIZE
        item = self._train[idx]
        while item["question"] in self._eval_questions:
            idx = (idx + SKIP_STRIDE) % TRAIN_SIZE
            item = self._train[idx]
        return item

    def verify(self, problem: dict[str, Any], answer: str) -> float:
        return float(self._train.score_answer(answer, problem))

    def canonical(self, problem: dict[str, Any], answer: str) -> str:
        text = answer.strip()
        return canonical_number(text) if self.cfg.canonical == "number" else text


def canonical_number(text: str) -> str:
    """A finite decimal in one spelling (no sign on zero, no exponent, no trailing zeros), the equality that
    reasoning-gym's `compute_decimal_reward` uses (commas removed, then `Decimal` ==); other text is returned as is."""
    try:
        value = Decimal(text.replace(",", ""))
    except InvalidOperation:
        return text
    if not value.is_finite():
        return text
    if value == 0:
        return "0"
    return format(value.normalize(), "f")
