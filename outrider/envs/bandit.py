"""Bandit: a K-armed Bernoulli bandit played in context over H pulls, the meta-RL testbed of [2] ("Exploitation
Is All You Need... for Exploration") and [3] ("When Greedy Wins"), methods_exploration.md T5.

Each seed draws a fresh bandit (the arm means μ_1..μ_K), so the policy cannot memorise the best arm: it has to
explore within the episode and exploit what it saw (the conversation is its only memory). One turn is one pull:

    observation  "K2 H12\\n"            (compact, turn 1: arms and pulls)   then "2:1\\n" = arm 2 paid 1
    action       "2"                    (an arm number, 1..K, surrounding whitespace ignored)

``format: verbose`` gives instructions and a running tally for a real LLM instead. An action that is not an arm
number is ``info["invalid"]``: the observation is an error text, and the turn *still counts as a pull* that pays
0 and adds μ* to the regret (so wasting turns is never free and the horizon stays H).

Reward. The per-turn reward is the pulled arm's sampled 0/1 payoff, so the ``verifier`` score (summed over turns)
is the episode's total reward. Outcomes come from a per-arm stack drawn from the seed (the n-th pull of arm k
always gives the same payoff): the same actions give the same observations, and ``state_key()`` (pulls and
successes per arm, invalid pulls) fully determines what comes next.

Final-step ``info["metrics"]`` [3]:

    regret            = H·μ* − Σ_t μ_{a_t}       (pseudo-regret; an invalid pull has μ = 0)
    best_arm_frac     = #{t : a_t = argmax μ} / H
    cumulative_reward = Σ_t r_t
    late_best_frac    = best-arm share over the last ⌈H/2⌉ pulls (suffix behaviour; a greedy failure shows as 0)

``info["success"]`` is ``regret / H ≤ success_regret`` (per-pull regret under a threshold): on a bandit with two
near-equal arms any choice is fine, on a wide gap only committing to the best arm is.

The scripted expert for demonstrations (``expert``) is UCB1 (μ̂_k + sqrt(2 ln t / n_k), each arm once first) or
Thompson sampling (Beta(1 + s_k, 1 + n_k − s_k) posteriors, seeded by the episode seed): SFT on its episodes and RL
on the summed reward go through the same recipe. Measured on the default bandit (2 arms, 12 pulls, gap 0.6; eval
seeds 0-499), mean pseudo-regret / success rate: Thompson 1.64 / 0.76, UCB1 1.95 / 0.66, greedy after one pull of
each arm 1.59 / 0.83, uniform random 3.54 / 0.09: at this short horizon greedy wins, as [3] reports.

Context: a compact pull costs ~6 tokens (action, EOS, "k:r\\n"), so H ≤ ~80 fits the tiny model's 512-token
context; verbose costs ~25 tokens per pull plus the instructions.

Splits: train seeds s ∈ [0, 2^31) use internal seed s; eval seed s uses 2^31 + s, so the held-out bandits are
never trained on.
"""

from __future__ import annotations

import math
import random
from typing import Any, Literal

from pydantic import Field, model_validator

from outrider.envs.base import ENVS, EVAL_OFFSET, Demonstration, Split, StepInfo, Task, TaskConfig



class BanditConfig(TaskConfig):
    arms: int = Field(2, ge=2, le=9, description="K: number of arms (single-digit arm numbers 1..K).")
    pulls: int = Field(12, ge=1, le=200, description="H: pulls per episode; the horizon (max_turns is set to it).")
    distribution: Literal["uniform", "gap"] = Field(
        "gap", description="Arm means: uniform: μ_k ~ U(0, 1) i.i.d.; gap: one random best arm at 0.5 + gap/2, "
                           "the others at 0.5 − gap/2.")
    gap: float = Field(0.6, gt=0, le=1, description="μ* − μ_other for distribution gap.")
    format: Literal["compact", "verbose"] = Field(
        "compact", description="compact: `K2 H12` then `arm:payoff` lines (tiny models); verbose: instructions "
                               "and a running tally (real LLMs).")
    expert: Literal["ucb1", "thompson"] = Field("thompson", description="Scripted policy of the demonstrations.")
    success_regret: float = Field(0.15, ge=0, description="Success when pseudo-regret / H ≤ this.")
    seed: int = Field(0, description="Seed of the bandit draws (together with the episode seed).")

    @model_validator(mode="after")
    def _horizon(self) -> "BanditConfig":
        if "max_turns" in self.model_fields_set and self.max_turns != self.pulls:
            raise ValueError(f"max_turns ({self.max_turns}) must equal pulls ({self.pulls}); set only pulls")
        self.max_turns = self.pulls
        return self


def arm_means(cfg: BanditConfig, internal_seed: int) -> list[float]:
    """The arm means of bandit `internal_seed` (deterministic)."""
    rng = random.Random(f"bandit:{cfg.seed}:{internal_seed}:means")
    if cfg.distribution == "uniform":
        return [rng.random() for _ in range(cfg.arms)]
    best = rng.randrange(cfg.arms)
    hi, lo = min(1.0, 0.5 + cfg.gap / 2), max(0.0, 0.5 - cfg.gap / 2)
    return [hi if k == best else lo for k in range(cfg.arms)]


def pseudo_regret(means: list[float], arms: list[int | None]) -> float:
    """H·μ* − Σ_t μ_{a_t} for 0-based arms (None = an invalid pull, μ = 0) [3]."""
    return len(arms) * max(means) - sum(means[a] for a in arms if a is not None)


class BanditEnv:
    """One bandit per ``reset(seed)``; ``step(arm)`` pulls it. See the module docstring for formats and metrics."""

    def __init__(self, cfg: BanditConfig, split: Split):
        self.cfg, self.split = cfg, split
        self.means: list[float] = []
        self.stacks: list[list[int]] = []
        self.history: list[int | None] = []  # 0-based arm per pull, None for an invalid pull
        self.rewards: list[int] = []
        self.counts: list[int] = []
        self.successes: list[int] = []
        self.last_observation = ""

    def reset(self, seed: int) -> str:
        self.last_observation = self._reset(seed)
        return self.last_observation

    def _reset(self, seed: int) -> str:
        internal = seed + EVAL_OFFSET if self.split == "eval" else seed
        cfg = self.cfg
        self.means = arm_means(cfg, internal)
        rng = random.Random(f"bandit:{cfg.seed}:{internal}:payoffs")
        # payoff stacks: the n-th pull of arm k pays stacks[k][n], whatever happened before
        self.stacks = [[int(rng.random() < m) for _ in range(cfg.pulls)] for m in self.means]
        self.history, self.rewards = [], []
        self.counts, self.successes = [0] * cfg.arms, [0] * cfg.arms
        if cfg.format == "compact":
            return f"K{cfg.arms} H{cfg.pulls}\n"
        return (f"You are playing a {cfg.arms}-armed bandit for {cfg.pulls} pulls. Each arm pays 1 with a fixed "
                f"unknown probability, else 0. Maximise your total payoff: explore, then exploit the best arm. "
                f"Reply with only the arm number (1-{cfg.arms}).\nPull 1/{cfg.pulls}: which arm?\n")

    def parse(self, action: str) -> int | None:
        text = action.strip()
        if len(text) == 1 and text in "123456789" and int(text) <= self.cfg.arms:
            return int(text) - 1
        return None

    def step(self, action: str) -> tuple[str, float, bool, StepInfo]:
        obs, reward, done, info = self._step(action)
        self.last_observation = obs  # what `restore` gives back
        return obs, reward, done, info

    def _step(self, action: str) -> tuple[str, float, bool, StepInfo]:
        cfg = self.cfg
        if len(self.history) >= cfg.pulls:
            raise RuntimeError("bandit: step() after the episode ended; call reset()")
        arm = self.parse(action)
        info: dict[str, Any] = {"invalid": arm is None}
        if arm is None:
            reward = 0
        else:
            reward = self.stacks[arm][self.counts[arm]]
            self.counts[arm] += 1
            self.successes[arm] += reward
        self.history.append(arm)
        self.rewards.append(reward)
        t = len(self.history)
        done = t >= cfg.pulls
        if done:
            info.update(self.final_info())
        return self.observation(arm, reward, action), float(reward), done, info

    def observation(self, arm: int | None, reward: int, action: str) -> str:
        cfg, t = self.cfg, len(self.history)
        if cfg.format == "compact":
            return f"{arm + 1}:{reward}\n" if arm is not None else f"?:0 bad arm, use 1-{cfg.arms}\n"
        head = (f"Arm {arm + 1} paid {reward}." if arm is not None else
                f"Invalid action {action.strip()[:20]!r}: reply with one arm number 1-{cfg.arms}. "
                f"The pull was wasted (payoff 0).")
        if t >= cfg.pulls:
            return f"{head} Game over: total payoff {sum(self.rewards)}.\n"
        tally = ", ".join(f"arm {k + 1}: {s}/{n}" for k, (s, n) in enumerate(zip(self.successes, self.counts)))
        return f"{head} Paid/pulled so far: {tally}.\nPull {t + 1}/{cfg.pulls}: which arm?\n"

    def final_info(self) -> dict[str, Any]:
        h = len(self.history)
        best = max(range(self.cfg.arms), key=lambda k: self.means[k])
        regret = pseudo_regret(self.means, self.history)
        late = self.history[h // 2:]
        metrics = {
            "regret": regret,
            "best_arm_frac": sum(a == best for a in self.history) / h,
            "cumulative_reward": float(sum(self.rewards)),
            "late_best_frac": sum(a == best for a in late) / len(late),
        }
        return {"success": regret / h <= self.cfg.success_regret + 1e-12, "metrics": metrics}

    def state_key(self) -> tuple:
        """(pulls per arm, payoffs per arm, invalid pulls): with the seed, all that decides what comes next."""
        return (tuple(self.counts), tuple(self.successes), sum(a is None for a in self.history))

    def snapshot(self) -> dict[str, Any]:
        return {"means": list(self.means), "stacks": [list(s) for s in self.stacks], "history": list(self.history),
                "rewards": list(self.rewards), "counts": list(self.counts), "successes": list(self.successes),
                "observation": self.last_observation}

    def restore(self, state: dict[str, Any]) -> str:
        """Back to the snapshot's state; returns the observation shown there."""
        self.means, self.stacks = list(state["means"]), [list(s) for s in state["stacks"]]
        self.history, self.rewards = list(state["history"]), list(state["rewards"])
        self.counts, self.successes = list(state["counts"]), list(state["successes"])
        self.last_observation = state["observation"]
        return self.last_observation


def expert_action(kind: str, counts: list[int], successes: list[int], rng: random.Random) -> int:
    """UCB1 [Auer et al. 2002]: argmax_k ŝ_k/n_k + sqrt(2 ln t / n_k) after one pull of each arm; Thompson sampling:
    argmax_k θ_k, θ_k ~ Beta(1 + s_k, 1 + n_k − s_k). Ties go to the lowest arm. Returns a 0-based arm."""
    if kind == "ucb1":
        for k, n in enumerate(counts):
            if n == 0:
                return k
        t = sum(counts)
        scores = [s / n + math.sqrt(2 * math.log(t) / n) for s, n in zip(successes, counts)]
    else:
        scores = [rng.betavariate(1 + s, 1 + n - s) for s, n in zip(successes, counts)]
    return max(range(len(scores)), key=lambda k: scores[k])


@ENVS.register("bandit", config=BanditConfig)
class BanditTask(Task):
    """In-context K-armed Bernoulli bandit over H pulls; reward = payoff per pull; regret metrics [2], [3]."""

    def __init__(self, cfg: BanditConfig):
        self.cfg = cfg
        self.max_turns = cfg.pulls
        self.eval_size = cfg.eval_size

    def make_env(self, split: Split) -> BanditEnv:
        return BanditEnv(self.cfg, split)

    def play_expert(self, seed: int, split: Split = "train") -> tuple[Demonstration, dict[str, Any]]:
        """One expert episode on bandit `seed`: the demonstration and the final step's info."""
        env = self.make_env(split)
        rng = random.Random(f"bandit-expert:{self.cfg.seed}:{split}:{seed}")
        obs, turns, info = env.reset(seed), [], {}
        for _ in range(self.cfg.pulls):
            action = str(expert_action(self.cfg.expert, env.counts, env.successes, rng) + 1)
            turns.append((obs, action))
            obs, _, done, info = env.step(action)
            if done:
                break
        return Demonstration(turns), info

    def demonstrations(self, seeds: list[int]) -> list[Demonstration]:
        return [self.play_expert(s)[0] for s in seeds]
