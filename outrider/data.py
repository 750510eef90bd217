"""The one data type that flows through the pipeline: episodes of turns, packed once into a `Batch`.

A single-turn task is a one-turn episode; multi-turn agents use the same types. Token conventions in `Batch`:
every per-token tensor is ``[B, T]`` over the full packed sequence (observations and actions of every turn), and
position ``t`` describes token ``input_ids[:, t]`` — its log-probability is ``log π(x_t | x_<t)``. Only positions
with ``action_mask == 1`` are trained; observation tokens never are.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, fields
from itertools import chain
from typing import Any, Hashable, Literal

import numpy as np
import torch
from torch import Tensor

# Who made an episode, set by the piece that makes it: the current policy from a reset (on_policy), from a
# restored state (restart) or after a failed attempt (retry); a replay buffer (replay); the policy under extra
# context, or a teacher (guided); stored data no policy of this run sampled (offline).
Origin = Literal["on_policy", "replay", "retry", "guided", "restart", "offline"]
ORIGINS: tuple[str, ...] = ("on_policy", "replay", "retry", "guided", "restart", "offline")


@dataclass
class Turn:
    """One exchange: the observation the policy saw, the action it produced, and what the env said back."""

    observation: str
    observation_ids: list[int]
    action: str = ""
    action_ids: list[int] = field(default_factory=list)
    behaviour_logprobs: list[float] = field(default_factory=list)
    behaviour_entropy: list[float] = field(default_factory=list)  # H_t of the sampling distribution per action token
    reward: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    finish_reason: str = ""  # "stop" (EOS / stop string), "length" (token limit)
    snapshot: Any = None  # the env's `snapshot()` before this turn's action, when the rollout was asked to keep it

    @property
    def state_key(self) -> Hashable | None:
        """Hashable env state before this turn's action (step grouping, archives); None if the env has none."""
        return self.info.get("state_key")


@dataclass
class Episode:
    """A trajectory of turns from one env reset. Episodes of one group (a prompt/seed, or a retried parent and its
    retries) share `group_id`; groups may differ in size.

    `rewards` keeps every component separately at every level: ``rewards["trajectory"][name] = float``,
    ``rewards["step"][name] = [per-turn floats]``, ``rewards["token"][name] = [per-action-token floats]``.

    ``prefix_tokens``: the episode's first so many action tokens (over its turns, in order) were given, not sampled
    (the turns replayed to reach a restored state, a response prefix to continue): the model sees them, but they
    are never trained (`pack` leaves them out of ``action_mask``). ``off_policy``: the turns' behaviour log-probs
    are not the current policy's on the trained sequence (a replayed episode, or one sampled with context that
    training removes), so the learner takes them as the ratio's old log-probs (`update.off_policy`).
    ``preference``: the episode's side in a pairwise comparison within its group (pairwise learner terms).
    ``advantage``: an advantage the piece that made the episode fixed for it (a replayed episode's advantage,
    recomputed against the current baseline), packed as ``Batch.row_advantage`` for the terms that read it; credit
    pieces ignore it.
    """

    group_id: int
    seed: int
    turns: list[Turn] = field(default_factory=list)
    rewards: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"trajectory": {}, "step": {}, "token": {}}
    )
    origin: Origin = "on_policy"
    weight: float = 1.0
    done: bool = False
    success: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    prefix_tokens: int = 0
    off_policy: bool = False
    preference: Literal["chosen", "rejected"] | None = None
    advantage: float | None = None

    @property
    def response(self) -> str:
        """All action text, concatenated (for single-turn tasks: the answer)."""
        return "".join(t.action for t in self.turns)

    @property
    def num_action_tokens(self) -> int:
        return sum(len(t.action_ids) for t in self.turns)

    @property
    def truncated(self) -> bool:
        return any(t.finish_reason == "length" for t in self.turns)

    def total_reward(self) -> float:
        """Sum of every component at every level (the scalar that outcome-level credit uses)."""
        total = sum(self.rewards["trajectory"].values())
        total += sum(sum(v) for v in self.rewards["step"].values())
        total += sum(sum(v) for v in self.rewards["token"].values())
        return float(total)


ContextPlace = Literal["before_observation", "after_observation", "after_prefix"]


@dataclass
class Start:
    """Where a rollout begins: a seed, or a seed plus the turns that led to a state (and the env's snapshot of it),
    and/or action ids the next turn starts with; optionally with context text only the sampler sees.

    - ``prefix``: earlier turns, in the episode as given and never trained. The env reaches their end state by
      ``restore(snapshot)`` when ``snapshot`` is set, else by replaying their actions after ``reset(seed)``.
    - ``action_prefix``: token ids the next action starts with (a single-turn response prefix to continue); in the
      episode, never trained.
    - ``context`` (a hint, a reflection, feedback) is inserted at ``context_at``: into the current observation's
      text (before or after it) or after ``action_prefix``. With ``keep_context`` false the trained sequence leaves
      it out, so the episode is off-policy (its behaviour log-probs were taken under the context); with true it
      stays, as untrained tokens, and the episode is on-policy.
    - ``group_id``: from `GroupIds` (a new group) or an existing episode's (a retry joins its parent's group).
    """

    seed: int
    group_id: int
    prefix: list[Turn] = field(default_factory=list)
    snapshot: Any = None
    action_prefix: list[int] = field(default_factory=list)
    context: str | None = None
    context_at: ContextPlace = "after_observation"
    keep_context: bool = False
    origin: Origin = "on_policy"
    weight: float = 1.0
    metadata: dict[str, Any] = field(default_factory=dict)


class GroupIds:
    """Hands out group ids for one batch: ``new()`` opens a group. Ids are batch-local; equal id ⇔ same group."""

    def __init__(self) -> None:
        self._next = 0

    def new(self) -> int:
        self._next += 1
        return self._next - 1


@dataclass
class Batch:
    """Padded tensors built once per step from a list of episodes (right padding)."""

    input_ids: Tensor  # [B, T] long
    attention_mask: Tensor  # [B, T] 1 for real tokens
    action_mask: Tensor  # [B, T] float, 1 for trained (action) tokens
    token_rewards: Tensor  # [B, T] float, composed reward placed on action tokens
    step_index: Tensor  # [B, T] long, which turn each token belongs to (-1 for padding)
    group_index: Tensor  # [B] long, episodes of one prompt/seed share it
    sample_weight: Tensor  # [B] float
    origin: Tensor | None = None  # [B] long, the index of each episode's origin in `ORIGINS`
    off_policy: Tensor | None = None  # [B] bool, the row's behaviour log-probs serve as its old log-probs
    preference: Tensor | None = None  # [B] long, 1 chosen, -1 rejected, 0 neither (pairwise terms)
    row_advantage: Tensor | None = None  # [B] float, each episode's `Episode.advantage` (NaN where it has none)
    behaviour_logprobs: Tensor | None = None  # [B, T] log-probs the sampler drew the action tokens with (0 elsewhere)
    behaviour_entropy: Tensor | None = None  # [B, T] entropy of the sampling distribution at action tokens
    old_logprobs: Tensor | None = None  # [B, T] behaviour (or recomputed old-policy) log-probs
    ref_logprobs: Tensor | None = None  # [B, T] frozen reference log-probs, when KL is on
    values: Tensor | None = None  # [B, T] value-head predictions, when a credit piece needs them
    hidden: Tensor | None = None  # [B, T, H] last hidden state before each token, when a piece needs it
    advantages: Tensor | None = None  # [B, T]
    returns: Tensor | None = None  # [B, T] value targets, when the credit piece produces them
    # Per-turn structure for step-level credit (GiGPO, SALT): [B, K] with K the most turns of any episode; ids are
    # batch-local (equal id ⇔ equal hashable key) and -1 where the row has no such turn or the env gave no key.
    turn_state_ids: Tensor | None = None  # the env's `state_key` before each turn's action
    turn_action_ids: Tensor | None = None  # the action's text (equal text ⇒ equal id)

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def pairs(self) -> tuple[Tensor, Tensor]:
        """The pairwise view: row indices ``(chosen, rejected)`` of every chosen × rejected pair within a group
        (``preference`` 1 and −1), groups in order of first appearance. Empty when the batch has no preferences."""
        empty = torch.zeros(0, dtype=torch.long, device=self.group_index.device)
        if self.preference is None:
            return empty, empty
        chosen, rejected = [], []
        pref, groups = self.preference.tolist(), self.group_index.tolist()
        for g in dict.fromkeys(groups):
            rows = [i for i, x in enumerate(groups) if x == g]
            for c in (i for i in rows if pref[i] > 0):
                for r in (i for i in rows if pref[i] < 0):
                    chosen.append(c)
                    rejected.append(r)
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.group_index.device)  # noqa: E731
        return (as_tensor(chosen), as_tensor(rejected)) if chosen else (empty, empty)

    def select(self, rows: Tensor) -> "Batch":
        """The sub-batch of the given row indices (minibatching, filtering)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v[rows] if isinstance(v, Tensor) else v
        return Batch(**out)

    def select_columns(self, width: int) -> "Batch":
        """The first `width` token positions of every ``[B, T]`` field (dropping padding no row reaches)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v[:, :width] if f.name in TOKEN_FIELDS and isinstance(v, Tensor) else v
        return Batch(**out)

    def to(self, device: torch.device | str) -> "Batch":
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to(device) if isinstance(v, Tensor) else v
        return Batch(**out)


# the `Batch` fields laid out per token position, [B, T]
TOKEN_FIELDS = ("input_ids", "attention_mask", "action_mask", "token_rewards", "step_index", "behaviour_logprobs",
                "behaviour_entropy", "old_logprobs", "ref_logprobs", "values", "hidden", "advantages", "returns")


def sequence_ids(episode: Episode, bos_id: int | None = None) -> tuple[list[int], list[int], list[int]]:
    """Flatten an episode into token ids, an action flag per token, and the turn index per token."""
    ids: list[int] = [] if bos_id is None else [bos_id]
    is_action: list[int] = [0] * len(ids)
    step: list[int] = [0] * len(ids)
    for k, turn in enumerate(episode.turns):
        ids += turn.observation_ids
        is_action += [0] * len(turn.observation_ids)
        step += [k] * len(turn.observation_ids)
        ids += turn.action_ids
        is_action += [1] * len(turn.action_ids)
        step += [k] * len(turn.action_ids)
    return ids, is_action, step


def pack(episodes: list[Episode], pad_id: int, bos_id: int | None = None) -> Batch:
    """Pack episodes into a right-padded `Batch`.

    Token rewards: every trajectory-level component lands on the episode's last action token; step-level
    rewards on the last action token of their turn; token-level rewards on the action tokens in order.
    ``action_mask`` is 1 on the action tokens that are trained: every action token but an episode's first
    ``prefix_tokens`` (given, not sampled). A reward that lands on a given token (a replayed turn's step reward)
    is therefore outside the mask, which every credit piece ignores: it was earned before the episode's start.
    """
    seqs = [sequence_ids(e, bos_id) for e in episodes]
    lengths = np.array([len(ids) for ids, _, _ in seqs])
    B, T = len(seqs), int(lengths.max())
    # the real positions of the padded [B, T] grid, in row-major order: the order of the rows' values laid end
    # to end, so each field is one flat array written through this mask (per-element writes, in Python or to
    # tensors, cost more than the training forward of a small model)
    real = np.arange(T)[None] < lengths[:, None]

    def grid(rows: list[list], fill: float, dtype: type, where: np.ndarray = real) -> np.ndarray:
        out = np.full((B, T), fill, dtype=dtype)
        out[where] = np.fromiter(chain.from_iterable(rows), dtype=dtype, count=int(where.sum()))
        return out

    action_mask = grid([flags for _, flags, _ in seqs], 0, np.float32)
    action = action_mask > 0
    prefix = np.array([e.prefix_tokens for e in episodes])
    if prefix.any():  # the first `prefix_tokens` action tokens of a row are given: never trained
        action_mask[action & (np.cumsum(action, axis=1) <= prefix[:, None])] = 0.0
    # per action token, episode after episode (the row-major order of `action`)
    rewards, behaviour_lp, behaviour_h = [], [], []
    for episode in episodes:
        lps = [x for turn in episode.turns for x in turn.behaviour_logprobs]
        hs = [x for turn in episode.turns for x in turn.behaviour_entropy]
        n = episode.num_action_tokens
        behaviour_lp.append(lps if len(lps) == n else [0.0] * n)  # demonstrations and hand-made episodes carry none
        behaviour_h.append(hs if len(hs) == n else [0.0] * n)
        rewards.append(_action_rewards(episode, n))
    state_ids, action_ids = turn_ids(episodes)
    return Batch(
        input_ids=torch.from_numpy(grid([ids for ids, _, _ in seqs], pad_id, np.int64)),
        attention_mask=torch.from_numpy(real.astype(np.int64)),
        action_mask=torch.from_numpy(action_mask),
        token_rewards=torch.from_numpy(grid(rewards, 0.0, np.float32, action)),
        step_index=torch.from_numpy(grid([step for _, _, step in seqs], -1, np.int64)),
        group_index=torch.tensor([e.group_id for e in episodes], dtype=torch.long),
        sample_weight=torch.tensor([e.weight for e in episodes], dtype=torch.float),
        origin=torch.tensor([ORIGINS.index(e.origin) for e in episodes], dtype=torch.long),
        off_policy=torch.tensor([e.off_policy for e in episodes], dtype=torch.bool),
        preference=torch.tensor([{"chosen": 1, "rejected": -1}.get(e.preference or "", 0) for e in episodes],
                                dtype=torch.long),
        row_advantage=torch.tensor([float("nan") if e.advantage is None else e.advantage for e in episodes],
                                   dtype=torch.float),
        behaviour_logprobs=torch.from_numpy(grid(behaviour_lp, 0.0, np.float32, action)),
        behaviour_entropy=torch.from_numpy(grid(behaviour_h, 0.0, np.float32, action)),
        turn_state_ids=state_ids,
        turn_action_ids=action_ids,
    )


def _action_rewards(episode: Episode, n: int) -> list[float]:
    """The composed reward on each of the episode's `n` action tokens (see `pack`)."""
    rewards = [0.0] * n
    if not n:
        return rewards
    rewards[-1] += sum(episode.rewards["trajectory"].values())
    last_of_turn, seen = {}, 0
    for k, turn in enumerate(episode.turns):
        seen += len(turn.action_ids)
        if turn.action_ids:
            last_of_turn[k] = seen - 1
    for per_turn in episode.rewards["step"].values():
        for k, r in enumerate(per_turn):
            if k in last_of_turn:
                rewards[last_of_turn[k]] += r
    for per_token in episode.rewards["token"].values():
        for t, r in enumerate(per_token[:n]):
            rewards[t] += r
    return rewards


def _tensor(rows: list[list], dtype: type) -> Tensor:
    """A tensor of equal-length rows of Python numbers, through numpy: half the time of `torch.tensor` on nested
    lists."""
    return torch.from_numpy(np.array(rows, dtype=dtype))


def turn_ids(episodes: list[Episode]) -> tuple[Tensor, Tensor]:
    """``[B, K]`` batch-local integer ids of each turn's state key and action text (-1: no turn / no key)."""
    K = max(max((len(e.turns) for e in episodes), default=0), 1)
    # built as lists, one tensor per field at the end (per-element tensor writes are slow)
    states = [[-1] * K for _ in episodes]
    actions = [[-1] * K for _ in episodes]
    state_ids: dict = {}
    action_ids: dict[str, int] = {}
    for i, e in enumerate(episodes):
        for k, turn in enumerate(e.turns):
            if turn.state_key is not None:
                states[i][k] = state_ids.setdefault(turn.state_key, len(state_ids))
            actions[i][k] = action_ids.setdefault(turn.action, len(action_ids))
    shape = (len(episodes), K)
    return _tensor(states, np.int64).view(shape), _tensor(actions, np.int64).view(shape)


def groups_of(episodes: list[Episode]) -> dict[int, list[Episode]]:
    """Episodes by `group_id`, in order of first appearance."""
    out: dict[int, list[Episode]] = defaultdict(list)
    for e in episodes:
        out[e.group_id].append(e)
    return out


def group_reward_std(group: list[Episode]) -> float:
    """Population std of a group's total rewards (0 for a group of one): how far its advantages spread."""
    rewards = [e.total_reward() for e in group]
    mean = sum(rewards) / len(rewards)
    return (sum((r - mean) ** 2 for r in rewards) / len(rewards)) ** 0.5


def has_reward_variance(group: list[Episode], tol: float = 1e-8) -> bool:
    """True when the group's total rewards are not all equal (its group-relative advantage is not all zero)."""
    rewards = [e.total_reward() for e in group]
    return max(rewards) - min(rewards) > tol
