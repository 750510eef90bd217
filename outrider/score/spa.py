"""SPA-RL [59]: stepwise progress attribution, a learned redistribution of the final reward over the turns, plus a
grounding reward for actions the env could execute.

A progress estimator reads the output of a language model at the **last action token of each turn** t of an
episode (the action's end: it has seen the observation and the action) and maps it with a linear head to a
contribution ``c_t``. It is trained so that the contributions of a trajectory add up to its final reward R:

    ℓ = mean_i (Σ_t c_{i,t} − R_i)²

(the authors' `prm/train_our_progress_model.py`: `nn.MSELoss` between the per-turn head values summed over the
turns and `agent_final_reward`). The RL reward of turn t is

    r_t = α·c_t + β·g̃_t,   g_t = 1 if the env executed the action (``info["invalid"]`` false) else 0

with ``g̃_t = g_t`` (``grounding: bonus``, the paper: +β for each executed action; the authors' `rl_data_org.py`
adds 0.5 for an executed action, 0 otherwise, to the turn's progress value: α = 1, β = 0.5) or ``g̃_t = g_t − 1``
(``grounding: penalty``: −β for each action the env refused, 0 otherwise: the same valid/invalid contrast, without
paying for every turn an episode lasts, which in an env that ends on success pays the policy to avoid finishing).
Each turn's reward sits on the turn's last action token (a step-level component); PPO with GAE (credit ``gae``),
the paper's optimiser, turns them into returns-to-go, so the return from turn t is roughly R minus the progress
already made.

The estimator. The authors fine-tune the whole SFT model with the head on its vocabulary logits
(``nn.Linear(vocab_size, 1)``) on exploration rollouts of the SFT policy, once, before RL. Here it is trained online:
a copy φ of the policy as it is at the component's first call (the warm start; ``init: random`` builds a freshly
initialised model of the same config instead), with its own head (on the logits by default, as the authors, or on
the last hidden state) and AdamW (the authors' weight decay 0.01, gradient clip 1). Each call (once per step):
the batch's contributions are computed with φ *before* it sees the batch, so a reward never saw its own label;
then the episodes join a buffer of the most recent ``buffer`` episodes and φ takes ``updates`` AdamW steps on
minibatches of ``batch_size`` episodes drawn from it. The head starts at zero, so without a warm-up the first
step's rewards are grounding only; ``warmup_updates`` stands in for the paper's exploration stage: on the first
call φ first takes that many steps on the first batch (the warm start's own rollouts), then scores it (that
batch's rewards have seen their labels). φ, the head, the optimiser, the buffer and the draw's generator are the
component's state: a run resumes bit-identically.

Diagnostics (the toy check of [59]'s claim that c_t tracks progress): turns whose env ``events`` contain one of
``events`` for the first time in the episode (MiniGrid: picked_key, opened_door, reached_goal) are progress
turns; ``spa/event_auroc`` is P(c of a progress turn > c of another turn), ``spa/event_corr`` the Pearson
correlation of c with the progress indicator, both on the batch before φ trains on it. Also ``spa/mse`` (the
batch's MSE before the update, a held-out error), ``spa/sum_corr`` (corr of Σ_t c_t with R), ``spa/loss`` (the
updates' mean loss), ``spa/warmup_loss`` (the warm-up's last), ``spa/c_event`` and ``spa/c_other``,
``spa/grounded`` (share of executed actions) and
``time/score/spa_s`` (the component's time: the scoring forward and the updates).
"""

from __future__ import annotations

import copy
import time
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from outrider.data import Episode, sequence_ids
from outrider.registry import BuildContext, Needs, Piece
from outrider.score import SCORE, ComponentConfig
from outrider.score.step_rm import auroc

MINIGRID_PROGRESS = ("picked_key", "opened_door", "reached_goal")


class SPAConfig(ComponentConfig):
    """Options of `spa` (SPA-RL [59])."""

    alpha: float = Field(1.0, description="α: weight of the progress contribution c_t in r_t = α·c_t + β·g_t.")
    beta: float = Field(0.5, ge=0.0, description="β: weight of the grounding signal (the authors' 0.5).")
    grounding: Literal["bonus", "penalty"] = Field(
        "bonus", description="bonus: +β for each action the env executed (the paper); penalty: −β for each action "
                             "it refused (info.invalid), 0 otherwise: no reward for lasting longer.")
    target: Literal["return", "success"] = Field(
        "return", description="What Σ_t c_t is fitted to: the env's reward summed over turns (the verifier's "
                              "value), or 1 for a successful episode and 0 otherwise.")
    head: Literal["logits", "hidden"] = Field(
        "logits", description="What the linear head reads at a turn's last action token: the LM's vocabulary "
                              "logits (the authors') or its last hidden state.")
    init: Literal["policy", "random"] = Field(
        "policy", description="The estimator's network: a copy of the policy at the first call (the warm start, "
                              "as the authors' copy of the SFT model), or a fresh model of the policy's config.")
    lr: float = Field(1e-3, gt=0, description="Learning rate of the estimator's own AdamW.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (the authors' 0.01).")
    updates: int = Field(4, ge=0, description="AdamW steps of the estimator per call (per policy step).")
    warmup_updates: int = Field(0, ge=0, description="AdamW steps on the first call's episodes before they are "
                                                     "scored: the estimator's training on the warm start's "
                                                     "rollouts before RL (the paper's exploration stage).")
    batch_size: int = Field(32, ge=1, description="Episodes per update, drawn from the buffer.")
    buffer: int = Field(512, ge=1, description="The most recent episodes the estimator trains on.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clip of the estimator's update.")
    events: list[str] = Field(list(MINIGRID_PROGRESS), description="Env events (turn info 'events') that mark a "
                                                                    "progress turn, for the spa/event_* metrics.")


def episode_tokens(episode: Episode, bos_id: int | None) -> tuple[list[int], list[int | None]]:
    """(the episode's token ids as the learner packs them, the index of each turn's last action token; None for a
    turn without action tokens)."""
    ids, _, _ = sequence_ids(episode, bos_id)
    ends: list[int | None] = []
    pos = 0 if bos_id is None else 1
    for turn in episode.turns:
        pos += len(turn.observation_ids) + len(turn.action_ids)
        ends.append(pos - 1 if turn.action_ids else None)
    return ids, ends


def grounding(episode: Episode, mode: str) -> list[float]:
    """g̃_t per turn: ``bonus`` 1 for an executed action, 0 for a refused one (``info["invalid"]``); ``penalty``
    the same minus 1."""
    shift = 1.0 if mode == "penalty" else 0.0
    return [(0.0 if t.info.get("invalid") else 1.0) - shift for t in episode.turns]


def spa_rewards(contributions: Sequence[float], grounded: Sequence[float], alpha: float, beta: float) -> list[float]:
    """``r_t = α·c_t + β·g̃_t`` per turn [59]."""
    return [alpha * c + beta * g for c, g in zip(contributions, grounded)]


def progress_loss(contributions: Sequence[Tensor], targets: Tensor) -> Tensor:
    """``mean_i (Σ_t c_{i,t} − R_i)²``: `contributions[i]` holds episode i's per-turn c (its turns with action
    tokens); an episode without such a turn predicts 0."""
    sums = torch.stack([c.sum() for c in contributions])
    return F.mse_loss(sums, targets.to(sums.dtype))


def progress_turns(episode: Episode, events: Sequence[str]) -> list[bool]:
    """Per turn: does its env info report one of `events` for the first time in the episode?"""
    seen: set[str] = set()
    out = []
    for turn in episode.turns:
        new = {e for e in turn.info.get("events", ()) if e in events} - seen
        seen |= new
        out.append(bool(new))
    return out


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


@SCORE.register("spa", config=SPAConfig, needs=Needs(level="step"))
class SPA(Piece):
    """SPA-RL [59]: per-turn reward α·c_t + β·g_t, c_t from a progress estimator trained online so that Σ_t c_t
    matches the final reward; the estimator, its optimiser, buffer and generator ride in checkpoints."""

    cfg: SPAConfig

    def __init__(self, cfg: SPAConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        build = build or BuildContext()
        self.policy = build.policy
        self.generator = build.generator()
        self.model: nn.Module | None = None
        self.head: nn.Linear | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.buffer: list[tuple[list[int], list[int | None], float]] = []
        self._metrics: dict[str, list[float]] = {}
        self._seconds = 0.0

    # --- the estimator ----------------------------------------------------------------------------------------
    def _start(self) -> None:
        """Build φ and its head (first call: the policy is the warm start by then)."""
        base = self.policy.model
        if self.cfg.init == "policy":
            self.model = copy.deepcopy(base)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator)))
                self.model = type(base)(base.config).to(self.policy.device)
        self.model.requires_grad_(True)
        width = self.model.get_output_embeddings().weight.shape[0] if self.cfg.head == "logits" \
            else base.config.hidden_size
        self.head = nn.Linear(width, 1).to(self.policy.device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        params = list(self.model.parameters()) + list(self.head.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def contributions(self, seqs: Sequence[list[int]], ends: Sequence[list[int | None]]) -> list[Tensor]:
        """c at each turn's last action token, per sequence (turns without action tokens left out), with
        gradient; one right-padded forward."""
        device = self.policy.device
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.policy.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.as_tensor(s, device=device)
            mask[i, : len(s)] = 1
        hidden = self.cfg.head == "hidden"
        out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=hidden, use_cache=False)
        features = out.hidden_states[-1] if hidden else out.logits
        c = self.head(features.float()).squeeze(-1).reshape(-1)
        # flat index_select, not advanced indexing: its backward sums in a fixed order on 2+ threads
        rows = [[i * width + e for e in row if e is not None] for i, row in enumerate(ends)]
        picked = c.index_select(0, torch.as_tensor([k for r in rows for k in r], dtype=torch.long, device=device))
        return list(picked.split([len(r) for r in rows]))

    def _update(self, steps: int) -> list[float]:
        """`steps` AdamW steps on minibatches drawn from the buffer; their losses."""
        losses = []
        self.model.train()
        for _ in range(steps):
            pick = torch.randperm(len(self.buffer), generator=self.generator)[: self.cfg.batch_size].tolist()
            rows = [self.buffer[i] for i in pick]
            c = self.contributions([r[0] for r in rows], [r[1] for r in rows])
            loss = progress_loss(c, torch.tensor([r[2] for r in rows], device=self.policy.device))
            self.optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           self.cfg.max_grad_norm)
            self.optimizer.step()
            losses.append(float(loss.detach()))
        return losses

    # --- the component ----------------------------------------------------------------------------------------
    def target(self, episode: Episode) -> float:
        if self.cfg.target == "success":
            return float(episode.success)
        return float(sum(t.reward for t in episode.turns))

    def _remember(self, encoded: list[tuple[list[int], list[int | None]]], targets: list[float]) -> None:
        """Add episodes with at least one action to the buffer, keeping the most recent `buffer`."""
        self.buffer += [(ids, ends, y) for (ids, ends), y in zip(encoded, targets) if any(e is not None for e in ends)]
        self.buffer = self.buffer[-self.cfg.buffer:]

    def __call__(self, episodes: list[Episode]) -> list[list[float]]:
        t0 = time.perf_counter()
        cfg = self.cfg
        encoded = [episode_tokens(e, self.policy.bos_id) for e in episodes]
        targets = [self.target(e) for e in episodes]
        remembered = False
        if self.model is None:
            self._start()
            if cfg.warmup_updates:  # the first batch is the warm start's exploration: fit it before scoring it
                self._remember(encoded, targets)
                remembered = True
                if self.buffer:
                    self._metrics["spa/warmup_loss"] = self._update(cfg.warmup_updates)[-1:]
        per_turn: list[list[float]] = []
        self.model.eval()
        with torch.no_grad():
            for i in range(0, len(episodes), 64):
                chunk = [x for x in encoded[i:i + 64] if x[0]]
                c = iter(self.contributions([x[0] for x in chunk], [x[1] for x in chunk]) if chunk else [])
                for ids, ends in encoded[i:i + 64]:
                    values = iter(next(c).tolist()) if ids else iter(())
                    per_turn.append([next(values) if e is not None else 0.0 for e in ends])
        out = [spa_rewards(c, grounding(e, cfg.grounding), cfg.alpha, cfg.beta) for c, e in zip(per_turn, episodes)]
        self._diagnose(episodes, per_turn, targets)
        if not remembered:
            self._remember(encoded, targets)
        if self.buffer and cfg.updates:
            self._metrics.setdefault("spa/loss", []).extend(self._update(cfg.updates))
        self._seconds += time.perf_counter() - t0
        return out

    def _diagnose(self, episodes: list[Episode], per_turn: list[list[float]], targets: list[float]) -> None:
        """The batch's metrics before φ trains on it (see the module docstring)."""
        c_all, flags, sums = [], [], []
        for e, c in zip(episodes, per_turn):
            for value, flag, turn in zip(c, progress_turns(e, self.cfg.events), e.turns):
                if turn.action_ids:
                    c_all.append(value)
                    flags.append(flag)
            sums.append(sum(c))
        c_arr, f_arr = np.asarray(c_all, dtype=float), np.asarray(flags, dtype=bool)
        y, s = np.asarray(targets, dtype=float), np.asarray(sums, dtype=float)
        grounded = [0.0 if t.info.get("invalid") else 1.0 for e in episodes for t in e.turns]
        found = {
            "spa/mse": float(((s - y) ** 2).mean()) if len(y) else float("nan"),
            "spa/sum_corr": _corr(s, y),
            "spa/event_auroc": auroc(c_arr[f_arr], c_arr[~f_arr]),
            "spa/event_corr": _corr(c_arr, f_arr.astype(float)),
            "spa/c_event": float(c_arr[f_arr].mean()) if f_arr.any() else float("nan"),
            "spa/c_other": float(c_arr[~f_arr].mean()) if (~f_arr).any() else float("nan"),
            "spa/grounded": float(np.mean(grounded)) if grounded else float("nan"),
        }
        for k, v in found.items():
            self._metrics.setdefault(k, []).append(v)

    def step_metrics(self) -> dict[str, float]:
        """The step's diagnostics (mean over its calls, NaN-free ones only) and the component's time."""
        out = {"time/score/spa_s": self._seconds}
        for k, values in self._metrics.items():
            finite = [v for v in values if v == v]
            if finite:
                out[k] = float(np.mean(finite))
        self._metrics, self._seconds = {}, 0.0
        return out

    def state_dict(self) -> dict[str, Any]:
        if self.model is None:
            return {}
        return {"model": self.model.state_dict(), "head": self.head.state_dict(),
                "optimizer": self.optimizer.state_dict(), "buffer": [list(x) for x in self.buffer],
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self._start()
        self.model.load_state_dict(state["model"])
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.buffer = [(list(ids), list(ends), float(y)) for ids, ends, y in state["buffer"]]
        self.generator.set_state(state["generator"])
