"""Calculator: tool use with execution errors, the setting of Fission-GRPO [17] ("Robust Tool Use via
Fission-GRPO: Learning to Recover from Execution Errors").

A question needs arithmetic the policy should not do in its head (e.g. a product of two 3-digit numbers). Each
turn the policy either calls the tool or answers:

    observation  "417*382=?\\n"                     (compact; verbose: a sentence or word problem + instructions)
    action       "calc: 417*382"      →  "= 159294\\n"
    action       "calc: 417x382"      →  "error: invalid syntax\\n"      (info["invalid"], the episode goes on)
    action       "answer: 159294"     →  episode ends, reward 1 if the number equals the answer exactly, else 0

Anything that is neither ``calc: ...`` nor ``answer: ...`` is also an invalid action with an error text. The
tool never raises and never executes user text: `safe_eval` parses with ``ast`` and evaluates only numeric
literals, + − × / // % **, unary ±, and parentheses, with bounds on length, exponent and result size, in exact
rational arithmetic. At the horizon (``max_turns``) without an answer the episode ends with reward 0.

Final-step ``info["metrics"]``: ``tool_calls``, ``tool_errors`` (malformed calls and unparseable actions),
``recovered`` (1 when an error was followed by a correct answer: the quantity [17] trains for), ``answered``.
The answer step's info carries ``answer``/``reference``/``canonical`` for the exact- and numeric-match scorers.

The expert calls the tool with the question's expression, then answers with the tool's value; a share
``recovery_fraction`` of demonstrations first make a malformed call and recover, so a warm-started policy has
seen error → corrected call.

Splits: eval seed s ∈ [0, eval_size) is question 2^31 + s; train seed s is question s, unless that question's
expression is one of the eval questions' (the question space can be small: digits 2, terms 2 → 8100), in which case
it redraws deterministically as question s + k·REDRAW_STRIDE for the first k = 1, 2, … that is not, so no train
question (nor demonstration, which uses train seeds) is ever an eval question. The task refuses a config whose
question space is smaller than ``MIN_SPACE_FACTOR`` × eval_size.

Answers (``answer: <n>``): an integer, decimal (exponent |e| ≤ 100) or fraction of at most 64 characters after
commas and spaces are dropped; anything else, including out-of-bound numbers, is unparseable and scores 0.
"""

from __future__ import annotations

import random
from typing import Any, Literal

from pydantic import Field, model_validator

from outrider.envs.arithmetic import CalcError, format_number, parse_number, partial_results, safe_eval
from outrider.envs.base import ENVS, EVAL_OFFSET, Demonstration, Split, StepInfo, Task, TaskConfig
from outrider.errors import OutriderError

REDRAW_STRIDE = 7_919   # a train question equal to an eval one is redrawn this many question ids further
MIN_SPACE_FACTOR = 4    # the question space must be at least this many times eval_size

WORD_TEMPLATES = {  # (template, operator): word problems whose answer is a op b
    "*": ["A crate holds {a} boxes of {b} nails. How many nails are in the crate?",
          "A hall has {a} rows of {b} seats. How many seats are there?"],
    "+": ["A farm has {a} hens and buys {b} more. How many hens does it have now?"],
    "-": ["A tank holds {a} litres and {b} litres are drained. How many litres are left?"],
}


class CalculatorConfig(TaskConfig):
    max_turns: int = Field(4, ge=1, le=16, description="Horizon: the most tool calls + the answer in one episode.")
    digits: int = Field(3, ge=1, le=9, description="Digits of each operand (3: 100..999).")
    terms: int = Field(2, ge=2, le=4, description="Operands per question (word problems use 2).")
    ops: list[Literal["+", "-", "*"]] = Field(["*"], min_length=1, description="Operators the questions use.")
    style: Literal["expression", "word"] = Field(
        "expression", description="expression: the question is the expression; word: a short word problem.")
    format: Literal["compact", "verbose"] = Field(
        "compact", description="compact: `417*382=?` (tiny models); verbose: the question plus tool instructions.")
    recovery_fraction: float = Field(0.0, ge=0, le=1, description="Share of demonstrations that make one malformed "
                                                                  "call first and then recover.")
    seed: int = Field(0, description="Seed of the questions (together with the episode seed).")

    @model_validator(mode="after")
    def _fits(self) -> "CalculatorConfig":
        needed = 3 if self.recovery_fraction > 0 else 2
        if self.max_turns < needed:
            raise ValueError(f"max_turns ({self.max_turns}) must be >= {needed} for the expert's demonstrations "
                             "(call, [recover,] answer)")
        if self.style == "word" and self.terms != 2:
            raise ValueError(f"terms ({self.terms}) must be 2 with style word")
        return self


def question_space(cfg: CalculatorConfig) -> int:
    """The number of distinct question expressions `cfg` can draw."""
    n = 9 * 10 ** (cfg.digits - 1)
    ops = set(cfg.ops)
    if cfg.style == "word":  # terms == 2; "a-b" is reordered so a >= b
        return sum(n * (n + 1) // 2 if o == "-" else n * n for o in ops)
    return n**cfg.terms * len(ops) ** (cfg.terms - 1)


def make_question(cfg: CalculatorConfig, index: int) -> dict[str, Any]:
    """Question `index` (internal seed): its expression, text and exact answer."""
    rng = random.Random(f"calculator:{cfg.seed}:{index}")
    lo, hi = 10 ** (cfg.digits - 1), 10**cfg.digits - 1
    nums = [rng.randint(lo, hi) for _ in range(cfg.terms)]
    ops = [rng.choice(cfg.ops) for _ in range(cfg.terms - 1)]
    if cfg.style == "word" and ops[0] == "-" and nums[0] < nums[1]:
        nums = nums[::-1]  # a tank cannot drain more than it holds
    expr = str(nums[0]) + "".join(f"{o}{n}" for o, n in zip(ops, nums[1:]))
    if cfg.style == "word":
        text = rng.choice(WORD_TEMPLATES[ops[0]]).format(a=nums[0], b=nums[1])
    else:
        text = f"{expr}=?" if cfg.format == "compact" else f"What is {expr.replace('*', ' * ')}?"
    return {"expr": expr, "text": text, "answer": safe_eval(expr)}


class CalculatorEnv:
    """One question per ``reset(seed)``; ``step`` runs a tool call or checks the answer (see module docstring)."""

    def __init__(self, cfg: CalculatorConfig, split: Split, eval_exprs: frozenset[str] = frozenset()):
        self.cfg, self.split = cfg, split
        self.eval_exprs = eval_exprs  # train questions with these expressions are redrawn
        self.index = 0
        self.question: dict[str, Any] = {}
        self.turns = 0
        self.calls = 0
        self.errors = 0
        self.last_result: str | None = None
        self.last_observation = ""
        self.done = False

    def reset(self, seed: int) -> str:
        self.last_observation = self._reset(seed)
        return self.last_observation

    def _reset(self, seed: int) -> str:
        self.index = seed + EVAL_OFFSET if self.split == "eval" else seed
        self.question = make_question(self.cfg, self.index)
        k = 0
        while self.split != "eval" and self.question["expr"] in self.eval_exprs:
            k += 1  # deterministic redraw; terminates fast: eval questions are <= 1/4 of the space
            self.index = seed + k * REDRAW_STRIDE
            self.question = make_question(self.cfg, self.index)
        self.turns = self.calls = self.errors = 0
        self.last_result, self.done = None, False
        if self.cfg.format == "compact":
            return self.question["text"] + "\n"
        return (f"{self.question['text']}\nYou have a calculator. Reply `calc: <expression>` to evaluate an "
                "arithmetic expression (+ - * / // % ** and parentheses), or `answer: <number>` to give your final "
                f"answer. You have {self.cfg.max_turns} turns.\n")

    def step(self, action: str) -> tuple[str, float, bool, StepInfo]:
        obs, reward, done, info = self._step(action)
        self.last_observation = obs  # what `restore` gives back
        return obs, reward, done, info

    def _step(self, action: str) -> tuple[str, float, bool, StepInfo]:
        if self.done:
            raise RuntimeError("calculator: step() after the episode ended; call reset()")
        self.turns += 1
        text = action.strip()
        info: dict[str, Any] = {"invalid": False}
        reward, obs = 0.0, ""
        if text.startswith("calc:"):
            self.calls += 1
            try:
                value = format_number(safe_eval(text[len("calc:"):]))
                obs, self.last_result = f"= {value}\n", value
            except CalcError as e:
                obs, self.last_result = f"error: {e}\n", "error"
                info["invalid"] = True
                info["events"] = ["tool_error"]
                self.errors += 1
        elif text.startswith("answer:"):
            given = text[len("answer:"):].strip()
            number = parse_number(given)
            correct = number is not None and number == self.question["answer"]
            reward = float(correct)
            self.done = True
            info.update({"answer": given, "reference": format_number(self.question["answer"]),
                         "canonical": format_number(number) if number is not None else given})
            info.update(self.final_info(answered=True, correct=correct))
            return "", reward, True, info
        else:
            obs = "error: reply `calc: <expression>` or `answer: <number>`\n"
            info["invalid"] = True
            info["events"] = ["format_error"]
            self.errors += 1
            self.last_result = "error"
        if self.turns >= self.cfg.max_turns:
            self.done = True
            info.update(self.final_info(answered=False, correct=False))
            return obs, reward, True, info
        return obs, reward, False, info

    def final_info(self, answered: bool, correct: bool) -> dict[str, Any]:
        metrics = {"tool_calls": float(self.calls), "tool_errors": float(self.errors),
                   "recovered": float(correct and self.errors > 0), "answered": float(answered)}
        return {"success": correct, "metrics": metrics}

    def state_key(self) -> tuple:
        """(question id, last tool result or "error", turns used)."""
        return (self.index, self.last_result, self.turns)

    def snapshot(self) -> dict[str, Any]:
        return {"index": self.index, "question": dict(self.question), "turns": self.turns, "calls": self.calls,
                "errors": self.errors, "last_result": self.last_result, "done": self.done,
                "observation": self.last_observation}

    def restore(self, state: dict[str, Any]) -> str:
        """Back to the snapshot's state; returns the observation shown there."""
        self.index, self.question = state["index"], dict(state["question"])
        self.turns, self.calls, self.errors = state["turns"], state["calls"], state["errors"]
        self.last_result, self.done = state["last_result"], state["done"]
        self.last_observation = state["observation"]
        return self.last_observation


def malformed(expr: str, rng: random.Random) -> str:
    """A broken version of `expr` that `safe_eval` rejects (for recovery demonstrations)."""
    kind = rng.randrange(3)
    if kind == 0:
        return expr.replace("*", "x").replace("+", " plus ").replace("-", " minus ")
    if kind == 1:
        return expr + ")"
    return "(" + expr


@ENVS.register("calculator", config=CalculatorConfig)
class CalculatorTask(Task):
    """Arithmetic questions with a calculator tool that can fail; reward 1 for an exact answer [17]."""

    def __init__(self, cfg: CalculatorConfig):
        self.cfg = cfg
        self.max_turns = cfg.max_turns
        self.eval_size = cfg.eval_size
        space = question_space(cfg)
        if space < MIN_SPACE_FACTOR * cfg.eval_size:
            raise OutriderError(f"task.eval_size: {cfg.eval_size} held-out questions need a question space of at "
                                f"least {MIN_SPACE_FACTOR * cfg.eval_size}, but task.digits={cfg.digits} "
                                f"(terms {cfg.terms}, ops {''.join(sorted(set(cfg.ops)))}) gives only {space}; "
                                "raise task.digits or lower task.eval_size")
        self.eval_exprs = frozenset(make_question(cfg, EVAL_OFFSET + s)["expr"] for s in range(cfg.eval_size))

    def make_env(self, split: Split) -> CalculatorEnv:
        return CalculatorEnv(self.cfg, split, self.eval_exprs)

    def play_expert(self, seed: int, split: Split = "train", recover: bool = False
                    ) -> tuple[Demonstration, dict[str, Any]]:
        """The expert's episode on question `seed` (with one malformed call first when `recover`)."""
        env = self.make_env(split)
        obs = env.reset(seed)
        expr = env.question["expr"]
        rng = random.Random(f"calculator-expert:{self.cfg.seed}:{seed}")
        actions = ([f"calc: {malformed(expr, rng)}"] if recover else []) + [f"calc: {expr}"]
        turns, info = [], {}
        for action in actions:
            turns.append((obs, action))
            obs, _, _, info = env.step(action)
        action = f"answer: {env.last_result}"
        turns.append((obs, action))
        _, _, _, info = env.step(action)
        return Demonstration(turns), info

    # --- step hooks (envs/base.py `Task`): the question's arithmetic is the step checker and the oracle -------
    def step_ok(self, env: CalculatorEnv, action: str) -> bool:
        """A right step: a tool call whose value is a partial result of the question (the value of one of its
        operations, in the question's own precedence: 12*34 or the whole of 12*34+56, never 34+56), or the exact
        answer. Invalid actions and wrong calls or answers are wrong steps."""
        text = action.strip()
        if text.startswith("calc:"):
            try:
                return safe_eval(text[len("calc:"):]) in partial_results(env.question["expr"])
            except CalcError:
                return False
        if text.startswith("answer:"):
            number = parse_number(text[len("answer:"):].strip())
            return number is not None and number == env.question["answer"]
        return False

    def oracle_step(self, env: CalculatorEnv) -> str:
        """The expert's next action: the answer once the tool has shown it, else the call of the whole question."""
        answer = format_number(env.question["answer"])
        return f"answer: {answer}" if env.last_result == answer else f"calc: {env.question['expr']}"

    def hint(self, env: CalculatorEnv) -> str:
        """The oracle's next action as the hint."""
        return self.oracle_step(env)

    def demonstrations(self, seeds: list[int]) -> list[Demonstration]:
        out = []
        for s in seeds:
            # which demonstrations show recovery is a hash of the seed, so the share holds for any seed list
            recover = random.Random(f"calculator-recover:{self.cfg.seed}:{s}").random() < self.cfg.recovery_fraction
            out.append(self.play_expert(s, recover=recover)[0])
        return out
