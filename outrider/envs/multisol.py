"""MultiSol: "emit k digits summing to S", a task with many distinct correct answers and an exact verifier, so the
number of distinct correct answers per prompt (answer diversity) can be counted. [37]-style diagnostic testbed
(methods_exploration.md T1).

The prompt ``4:17 ->`` asks for 4 decimal digits summing to 17; ``3905``, ``9440`` and ``0098`` are all right
(order matters: each digit string is its own answer). The verifier is exact: right length, ASCII digits only and
the right sum give 1.0, anything else 0.0 (an empty or garbled answer is a counted 0, never an exception).

Demonstrations come from a solver that draws a *uniformly random* valid answer (seeded by the problem index), so a
warm-started policy starts out spread over many answers instead of one memorised string per prompt.

Splits. The prompt space is the set of (k, S) pairs, a few hundred at most, so eval prompts cannot be fresh draws
of the same generator (they would repeat train prompts). Each pair is assigned to train or eval by a hash of
``(k, S, seed)``: eval prompts are never trained on, and the eval split is a fixed list of held-out pairs
(``eval_size`` is capped at its length, as for a JSONL file; recipes/grpo_multisol.yaml holds out 27 of 89).
A held-out pair is still learnable: the rule "k digits, sum S" is shared by all pairs, and every digit count and
every digit of S appear in train prompts, so the model must generalise the rule rather than recall the pair.

Measured with the tiny model (hidden 128, 2 layers, 1 CPU thread, batch 64, lr 3e-3), held-out pass@1 at
temperature 1 tracks train pass@1, so hash-splitting the pairs was kept and the prompt space was not widened:

    SFT steps       150      450      800–900
    held-out pass@1 ~0.10    ~0.2     0.30–0.35   (3 init seeds; train pairs 0.36–0.47)
    distinct correct / 16 samples, held out: ~1.7, ~3.5, ~5.3

The rule takes a longer warm start than spell_backward's 45 steps: for ~150 steps the model only learns the
answer length and digit marginals (pass@1 ≈ the chance that random digits hit S), then it learns to add. The
recipe therefore uses 800 SFT steps (~35–50 s on one thread), which starts RL inside the 0.2–0.6 band with
several distinct correct answers per prompt.

Only pairs with at least ``min_solutions`` valid answers are used, so every prompt has room for diversity (the
extreme sums, e.g. 4 digits summing to 0 or 36, have a single answer and are left out).
"""

from __future__ import annotations

import hashlib
import random
from functools import lru_cache
from typing import Any

from pydantic import Field, model_validator

from outrider.envs.base import ENVS, Demonstration, ParamDim, ParamSpace, Split
from outrider.envs.single_turn import SingleTurnConfig, SingleTurnTask
from outrider.errors import OutriderError

DIGITS = frozenset("0123456789")  # str.isdigit() also accepts e.g. Arabic-Indic digits, which int() would sum


@lru_cache(maxsize=None)
def count_solutions(k: int, total: int) -> int:
    """Number of k-digit strings (leading zeros allowed) whose digits sum to `total`."""
    if total < 0 or total > 9 * k:
        return 0
    if k == 0:
        return 1
    return sum(count_solutions(k - 1, total - d) for d in range(10))


def sample_solution(k: int, total: int, rng: random.Random) -> str:
    """A uniformly random k-digit string summing to `total`: each digit is drawn with probability proportional to
    the number of completions it leaves, so every valid string has probability 1 / count_solutions(k, total)."""
    if count_solutions(k, total) == 0:
        raise ValueError(f"no {k}-digit string sums to {total}")
    out = []
    for left in range(k, 0, -1):
        weights = [count_solutions(left - 1, total - d) for d in range(10)]
        d = rng.choices(range(10), weights=weights)[0]
        out.append(str(d))
        total -= d
    return "".join(out)


def check_answer(k: int, total: int, answer: str) -> float:
    """1.0 when `answer` is exactly k ASCII digits summing to `total`, else 0.0."""
    if len(answer) != k or not set(answer) <= DIGITS:
        return 0.0
    return float(sum(int(c) for c in answer) == total)


def _held_out(k: int, total: int, seed: int, fraction: float) -> bool:
    digest = hashlib.sha256(f"multisol:{seed}:{k}:{total}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


class MultiSolConfig(SingleTurnConfig):
    template: str = Field("{question} ->", description="Prompt shown to the policy: `{question}` is `k:S` (e.g. "
                                                       "`4:17`), `{metadata[k]}` / `{metadata[sum]}` its parts.")
    min_digits: int = Field(3, ge=1, le=12, description="Fewest digits k asked for.")
    max_digits: int = Field(5, ge=1, le=12, description="Most digits k asked for.")
    min_sum: int = Field(0, ge=0, description="Smallest target sum S (further limited by min_solutions).")
    max_sum: int = Field(108, ge=0, description="Largest target sum S (further limited by min_solutions and 9k).")
    min_solutions: int = Field(16, ge=1, description="Keep only (k, S) pairs with at least this many valid answers, "
                                                     "so every prompt leaves room for diverse correct answers.")
    eval_fraction: float = Field(0.3, gt=0, lt=1, description="Share of the (k, S) pairs held out for eval (by hash "
                                                              "of k, S and seed); they are never trained on.")
    seed: int = Field(0, description="Seed of the train/eval assignment of pairs and of the demonstration answers.")
    random_label_digits: list[int] = Field(default_factory=list, description="Digit counts k whose pairs carry "
                                           "random labels: the target is a fixed random k-digit string per (k, S), "
                                           "not the rule, so they cannot be learned (a curriculum's unlearnable "
                                           "region). They are train-only: never in the eval split, never shown "
                                           "in demonstrations.")

    @model_validator(mode="after")
    def _ranges(self) -> "MultiSolConfig":
        if self.min_digits > self.max_digits:
            raise ValueError(f"min_digits ({self.min_digits}) > max_digits ({self.max_digits})")
        if self.min_sum > self.max_sum:
            raise ValueError(f"min_sum ({self.min_sum}) > max_sum ({self.max_sum})")
        ks = set(range(self.min_digits, self.max_digits + 1))
        if not set(self.random_label_digits) <= ks or ks <= set(self.random_label_digits):
            raise ValueError(f"random_label_digits ({self.random_label_digits}) must be digit counts in "
                             f"[{self.min_digits}, {self.max_digits}], leaving at least one learnable one")
        return self


@ENVS.register("multisol", config=MultiSolConfig)
class MultiSolTask(SingleTurnTask):
    """Emit k digits summing to S: many correct answers per prompt, exact verifier, held-out (k, S) pairs
    [37]-style diagnostic testbed (methods_exploration.md T1)."""

    def __init__(self, cfg: MultiSolConfig):
        super().__init__(cfg)
        self.cfg: MultiSolConfig = cfg
        pairs = [(k, s) for k in range(cfg.min_digits, cfg.max_digits + 1)
                 for s in range(cfg.min_sum, min(cfg.max_sum, 9 * k) + 1)
                 if count_solutions(k, s) >= cfg.min_solutions]
        noisy = set(cfg.random_label_digits)
        self.random_pairs = [p for p in pairs if p[0] in noisy]
        pairs = [p for p in pairs if p[0] not in noisy]
        self.train_pairs = [p for p in pairs if not _held_out(*p, cfg.seed, cfg.eval_fraction)]
        self.eval_pairs = [p for p in pairs if _held_out(*p, cfg.seed, cfg.eval_fraction)]
        # train seeds index the rule's train pairs, then the random-label ones (none by default: seeds unchanged)
        self.all_train = self.train_pairs + self.random_pairs
        for name, split in (("train", self.train_pairs), ("eval", self.eval_pairs)):
            if not split:
                raise OutriderError(f"task: the {name} split of multisol is empty ({len(pairs)} (k, S) pairs with "
                                    f">= {cfg.min_solutions} answers); widen the digit/sum ranges or change "
                                    "eval_fraction")
        self.eval_size = min(cfg.eval_size, len(self.eval_pairs))
        self.check_template()

    def problem(self, split: Split, index: int) -> dict[str, Any]:
        pairs = self.eval_pairs if split == "eval" else self.all_train
        k, total = pairs[index % len(pairs)]
        if k in self.cfg.random_label_digits:
            label = random.Random(f"multisol:label:{self.cfg.seed}:{k}:{total}")
            return {"question": f"{k}:{total}", "answer": "".join(label.choice("0123456789") for _ in range(k)),
                    "metadata": {"k": k, "sum": total, "solutions": 1, "random_label": True}}
        # the reference answer is one uniform draw, seeded by the problem index: repeated indices agree, and
        # consecutive demonstrations of the same pair show different answers
        rng = random.Random(f"multisol:{self.cfg.seed}:{split}:{index}")
        return {"question": f"{k}:{total}", "answer": sample_solution(k, total, rng),
                "metadata": {"k": k, "sum": total, "solutions": count_solutions(k, total)}}

    def verify(self, problem: dict[str, Any], answer: str) -> float:
        if problem["metadata"].get("random_label"):
            return float(answer.strip() == problem["answer"])
        return check_answer(problem["metadata"]["k"], problem["metadata"]["sum"], answer)

    def demonstrations(self, seeds: list[int]) -> list[Demonstration]:
        # random-label pairs are never demonstrated: a seed that lands on one shows the rule pair s mod (rule
        # pairs) instead, at a seed as large as s, so its demonstrated answer still varies from seed to seed
        n, rule = len(self.all_train), len(self.train_pairs)
        return super().demonstrations([s - s % n + s % rule if s % n >= rule else s for s in seeds])

    def param_space(self) -> ParamSpace:
        """(digits k, sum_fraction f): the pair (k, S) with S nearest f·9k among the train pairs of that k."""
        return ParamSpace([ParamDim("digits", self.cfg.min_digits, self.cfg.max_digits, integer=True),
                           ParamDim("sum_fraction", 0.0, 1.0)])

    def param_seed(self, params: tuple[float, ...], index: int) -> int:
        k, target = int(params[0]), params[1] * 9 * int(params[0])
        choices = [i for i, (kk, _) in enumerate(self.all_train) if kk == k]
        if not choices:
            raise OutriderError(f"task: multisol has no train pair with {k} digits (all held out); widen the ranges")
        best = min(choices, key=lambda i: (abs(self.all_train[i][1] - target), self.all_train[i][1]))
        return best + len(self.all_train) * index

    def param_region(self, params: tuple[float, ...]) -> str:
        """``random_labels`` for the unlearnable digit counts, else ``rule``."""
        return "random_labels" if int(params[0]) in self.cfg.random_label_digits else "rule"

    def canonical(self, problem: dict[str, Any], answer: str) -> str:
        # the digit string itself: order matters, so "3905" and "9053" are two distinct answers
        return answer.strip()
