"""Learned outcome reward models: a causal LM with a scalar head on the last token, trained with the Bradley–Terry
loss on preference pairs or with cross-entropy on labelled responses, saved as a directory that loads with one
call (`RewardModel.load`) and scored in a run by the `reward_model` component.

- **Bradley–Terry** (Ouyang et al. 2022, InstructGPT; [51] uses such RMs): ``P(y_w ≻ y_l | x) = σ(r(x, y_w) −
  r(x, y_l))`` and ``ℓ = −mean_pairs log σ(r_w − r_l)``; its gradient is ``∂ℓ/∂r_w = −σ(r_l − r_w)/n`` and
  ``∂ℓ/∂r_l = +σ(r_l − r_w)/n`` for n pairs (a tie r_w = r_l: loss log 2, gradients ∓½ per pair).
- **Labelled responses**: ``ℓ = mean BCE(σ(r(x, y)), label)`` (an outcome reward model).

``r(x, y)`` is a linear head on the last layer's hidden state at the last token of prompt + response + EOS (the
policy's `value_head`, so a reward-model directory is a policy directory with ``value_head.safetensors`` and
``reward_model.json``). Texts are encoded as the pairs loop encodes them: the prompt as the first observation, the
response and an EOS after it. `outrider rm train` (cli_rm.py) trains one from a file.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from outrider.data import Episode
from outrider.errors import OutriderError
from outrider.jsonl import json_objects
from outrider.loops.offline import Pair, parse_pair
from outrider.policy.model import Policy
from outrider.registry import BuildContext, Piece
from outrider.score import SCORE, ComponentConfig

META_FILE = "reward_model.json"
LABEL_KEYS = ("prompt", "response", "label")


def bt_loss(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    """Bradley–Terry loss ``−mean log σ(r_w − r_l)`` over pairs."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def label_loss(r: Tensor, labels: Tensor) -> Tensor:
    """Outcome cross-entropy ``mean BCE(σ(r), y)`` (in the logits form)."""
    return F.binary_cross_entropy_with_logits(r, labels.to(r.dtype))


class Labelled(NamedTuple):
    """One labelled response: its prompt, its text and a label from 0 to 1 (1: good)."""

    prompt: str
    response: str
    label: float


def check_fields(row: dict[str, Any], where: str, keys: tuple[str, ...], what: str) -> None:
    """The ``prompt`` and ``response`` of a data line are strings and no field is outside `keys` (one error naming
    the line and the field)."""
    for k in ("prompt", "response"):
        if not isinstance(row.get(k), str):
            problem = "missing" if k not in row else f"a {type(row[k]).__name__}, not a string"
            raise OutriderError(f"{where}: field '{k}' is {problem} (a {what} is {{"
                                + ", ".join(f'"{x}"' for x in keys) + "})")
    unknown = sorted(set(row) - set(keys))
    if unknown:
        raise OutriderError(f"{where}: unknown field '{unknown[0]}'; valid: {', '.join(keys)}")


def unit_label(label: Any) -> float | None:
    """A label as a float from 0 to 1 (a boolean is 0/1); None when it is not one."""
    if isinstance(label, bool):
        return float(label)
    if not isinstance(label, (int, float)) or not math.isfinite(label) or not 0 <= label <= 1:
        return None
    return float(label)


def parse_labelled(row: dict[str, Any], where: str) -> Labelled:
    """One line of a labelled-responses file; a missing or mistyped field is one error naming the line."""
    check_fields(row, where, LABEL_KEYS, "labelled response")
    label = unit_label(row.get("label"))
    if label is None:
        raise OutriderError(f"{where}: field 'label' must be a number from 0 to 1 or a boolean, got "
                            f"{row.get('label')!r}")
    return Labelled(row["prompt"], row["response"], label)


def read_examples(path: str, delimiter: str = ",") -> tuple[str, list]:
    """``("pairs", pairs)``, ``("labels", labelled)`` or ``("steps", step-labelled)`` from a JSONL file, the kind
    told by its first line (pairs: ``chosen``/``rejected``, as `outrider.loops.offline` reads them; steps:
    ``step_labels``, one per step of the response cut at `delimiter` (`score.step_rm`); labels:
    ``response``/``label``). Every line must be of that kind; a bad line is one error naming file, line and field."""
    from outrider.score.step_rm import parse_step_labelled

    kind, out = None, []
    for n, row in json_objects(path, "rm train DATA"):
        where = f"{path}:{n}"
        if kind is None:
            kind = ("pairs" if "chosen" in row or "rejected" in row else "steps" if "step_labels" in row
                    else "labels")
        if kind == "steps":
            out.append(parse_step_labelled(row, where, delimiter))
        elif kind == "pairs":
            pair = parse_pair(row, where)
            if pair.prefix:
                raise OutriderError(f"{where}: field 'prefix' is not read by a reward model; give whole responses")
            out.append(pair)
        else:
            out.append(parse_labelled(row, where))
    if kind is None:
        raise OutriderError(f"rm train DATA: '{path}' holds no examples")
    return kind, out


class RewardModel:
    """A policy-shaped network whose value head, read at the last token, is the reward ``r(x, y)``."""

    def __init__(self, policy: Policy, meta: dict[str, Any] | None = None):
        if policy.value_head is None:
            raise OutriderError("reward model: the network needs a scalar head (build it with value_head=True)")
        self.policy = policy
        self.meta = meta or {}

    @classmethod
    def load(cls, path: str | Path, where: str = "reward_model.path") -> "RewardModel":
        """The reward model saved in directory `path` (by `save` / `outrider rm train`)."""
        path = Path(path)
        if not (path / META_FILE).is_file():
            raise OutriderError(f"{where}: no reward model at '{path}' (expected {META_FILE}; train one with "
                                "outrider rm train)")
        return cls(Policy.load(path, value_head=True, where=where), json.loads((path / META_FILE).read_text()))

    def save(self, path: str | Path) -> None:
        from outrider.rundir import save_model_dir

        save_model_dir(self.policy, Path(path))
        (Path(path) / META_FILE).write_text(json.dumps(self.meta, indent=1) + "\n")

    def encode(self, prompt: str, response: str) -> list[int]:
        p = self.policy
        return p.encode_observation(prompt, first=True) + p.encode(response) + [p.eos_id]

    def forward(self, seqs: list[list[int]]) -> Tensor:
        """``r`` of each token sequence (right-padded into one forward), with gradient."""
        return self.forward_hidden(seqs)[0]

    def forward_hidden(self, seqs: list[list[int]]) -> tuple[Tensor, Tensor, Tensor]:
        """(``r`` of each sequence, the last layer's hidden states (batch, width, hidden), each sequence's last
        position), with gradient: the hidden states are what a goal-conditioned contrastive term [87] reads."""
        p = self.policy
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), p.pad_id, dtype=torch.long, device=p.device)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.as_tensor(s)
            mask[i, : len(s)] = 1
        hidden = p.model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                         use_cache=False).hidden_states[-1]
        last = torch.as_tensor([len(s) - 1 for s in seqs], device=ids.device)
        return p.value_head(hidden[torch.arange(len(seqs), device=ids.device), last]).squeeze(-1), hidden, last

    @torch.no_grad()
    def rewards(self, prompts: list[str], responses: list[str], batch_size: int = 64) -> list[float]:
        """``r(x, y)`` of each (prompt, response), in batches, without gradient."""
        was = self.policy.training
        self.policy.eval()
        out: list[float] = []
        for i in range(0, len(prompts), batch_size):
            seqs = [self.encode(x, y) for x, y in zip(prompts[i:i + batch_size], responses[i:i + batch_size])]
            out.extend(self.forward(seqs).tolist())
        self.policy.train(was)
        return out


@dataclass
class TrainConfig:
    """How `train` fits a reward model."""

    epochs: int = 4
    batch_size: int = 32
    lr: float = 1e-3
    heldout: float = 0.1  # share of the prompts held out (all their examples), for the held-out accuracy
    seed: int = 0
    max_grad_norm: float = 1.0
    contrastive: float = 0.0  # pairs: weight λ of the goal-conditioned contrastive term [87] (0: plain BT)
    contrastive_samples: int = 16  # pairs: S, positions drawn per response for that term
    delimiter: str = ","  # steps: the text that ends a step (`score.step_rm`)


def split_by_prompt(examples: list, heldout: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded `heldout` share of the distinct prompts, with all their examples, is held out,
    so no held-out prompt is trained on."""
    prompts = sorted({e.prompt for e in examples})
    rng = np.random.default_rng(seed)
    held = set(rng.permutation(len(prompts))[: int(round(heldout * len(prompts)))].tolist())
    held_prompts = {prompts[i] for i in held}
    return [e for e in examples if e.prompt not in held_prompts], [e for e in examples if e.prompt in held_prompts]


def batch_loss(rm: RewardModel, kind: str, rows: list, contrastive: float = 0.0,
               samples: int = 16, delimiter: str = ",") -> tuple[Tensor, Tensor]:
    """(loss, per-example correctness) of a minibatch: pairs ranked right (a tie counts ½), labels matched by the
    sign of r, or (steps) each labelled step matched by the sign of its logit (`step_rm.step_batch_loss`). Pairs
    with ``contrastive`` λ > 0: ``BT + λ·ℓ_gc`` (`goal_rm.contrastive_term`, [87])."""
    if kind == "steps":
        from outrider.score.step_rm import step_batch_loss

        return step_batch_loss(rm, rows, delimiter)
    if kind == "pairs":
        seqs = [rm.encode(p.prompt, p.chosen) for p in rows] + [rm.encode(p.prompt, p.rejected) for p in rows]
        r, hidden, last = rm.forward_hidden(seqs)
        n, rw, rl = len(rows), r[: len(rows)], r[len(rows):]
        loss = bt_loss(rw, rl)
        if contrastive > 0:
            from outrider.score.goal_rm import contrastive_term

            acts = torch.as_tensor([len(rm.policy.encode(p.chosen)) + 1 for p in rows]
                                   + [len(rm.policy.encode(p.rejected)) + 1 for p in rows], device=last.device)
            loss = loss + contrastive * contrastive_term(hidden[:n], last[:n], acts[:n], hidden[n:], last[n:],
                                                         acts[n:], samples)
        return loss, ((rw > rl).float() + 0.5 * (rw == rl).float()).detach()
    r = rm.forward([rm.encode(e.prompt, e.response) for e in rows])
    y = torch.tensor([e.label for e in rows], device=r.device)
    return label_loss(r, y), ((r > 0).float() == (y >= 0.5).float()).float().detach()


@torch.no_grad()
def evaluate(rm: RewardModel, kind: str, rows: list, batch_size: int = 64, delimiter: str = ",") -> dict[str, float]:
    """Mean loss and accuracy (pairs ranked right, or labels matched; steps: per labelled step, and the
    first-wrong-step AUROC, `step_rm.evaluate_steps`) over `rows`."""
    if not rows:
        return {}
    if kind == "steps":
        from outrider.score.step_rm import evaluate_steps

        return evaluate_steps(rm, rows, delimiter, batch_size)
    rm.policy.eval()
    losses, right = [], []
    for i in range(0, len(rows), batch_size):
        loss, ok = batch_loss(rm, kind, rows[i:i + batch_size])
        losses.append(float(loss) * len(ok))
        right.extend(ok.tolist())
    rm.policy.train()
    return {"loss": sum(losses) / len(right), "accuracy": float(np.mean(right))}


def train(rm: RewardModel, kind: str, examples: list, cfg: TrainConfig,
          on_step: Callable[[float], None] | None = None,
          on_epoch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Fit `rm` on the train share of `examples` for ``cfg.epochs`` passes in seeded minibatches (Adam, gradient
    clipping); returns the held-out and train loss/accuracy, the counts and the time, and stores them in
    ``rm.meta``. `on_epoch(k)` runs after each pass k (1-based) but the last; the lr is constant and each pass's
    order is drawn in turn, so the model it sees is the one an ``epochs = k`` run ends with."""
    train_rows, held_rows = split_by_prompt(examples, cfg.heldout, cfg.seed)
    if not train_rows:
        raise OutriderError(f"rm train --heldout: {cfg.heldout} leaves no prompt to train on")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.Adam(rm.policy.parameters(), lr=cfg.lr)
    rm.policy.train()
    t0 = time.perf_counter()
    steps = 0
    for epoch in range(cfg.epochs):
        order = rng.permutation(len(train_rows))
        for start in range(0, len(order), cfg.batch_size):
            loss, _ = batch_loss(rm, kind, [train_rows[i] for i in order[start:start + cfg.batch_size]],
                                 cfg.contrastive, cfg.contrastive_samples, cfg.delimiter)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(rm.policy.parameters(), cfg.max_grad_norm)
            opt.step()
            steps += 1
            if on_step is not None:
                on_step(float(loss.detach()))
        if on_epoch is not None and epoch + 1 < cfg.epochs:
            on_epoch(epoch + 1)
            rm.policy.train()
    seconds = time.perf_counter() - t0
    objective = {"pairs": "bradley_terry", "labels": "label_bce", "steps": "step_bce"}[kind]
    summary = {"objective": objective, "train_examples": len(train_rows),
               "heldout_examples": len(held_rows), "steps": steps, "train_s": seconds, "epochs": cfg.epochs,
               "lr": cfg.lr, "batch_size": cfg.batch_size, "seed": cfg.seed, "heldout_share": cfg.heldout,
               "train": evaluate(rm, kind, train_rows, delimiter=cfg.delimiter),
               "heldout": evaluate(rm, kind, held_rows, delimiter=cfg.delimiter)}
    if kind == "steps":
        summary["delimiter"] = cfg.delimiter
    if kind == "pairs" and cfg.contrastive > 0:
        summary.update(contrastive=cfg.contrastive, contrastive_samples=cfg.contrastive_samples,
                       goal_state=goal_state(rm, train_rows).tolist())
    rm.meta.update(summary)
    return summary


@torch.no_grad()
def goal_state(rm: RewardModel, pairs: list[Pair], batch_size: int = 64) -> Tensor:
    """The goal of ``Q(prefix, goal)`` [87]: the mean last-layer hidden state at the final position (the EOS) of
    the distinct preferred responses of `pairs`."""
    was = rm.policy.training
    rm.policy.eval()
    chosen = sorted({(p.prompt, p.chosen) for p in pairs})
    total = None
    for i in range(0, len(chosen), batch_size):
        _, hidden, last = rm.forward_hidden([rm.encode(x, y) for x, y in chosen[i:i + batch_size]])
        part = hidden[torch.arange(len(last)), last].sum(0)
        total = part if total is None else total + part
    rm.policy.train(was)
    return total / len(chosen)


class RewardModelConfig(ComponentConfig):
    """Options of the `reward_model` component."""

    path: str = Field(..., description="Directory of a trained reward model (`outrider rm train --out DIR`).")
    batch_size: int = Field(64, ge=1, description="Responses per forward of the reward model.")
    online: bool = Field(False, description="Keep training between policy steps: after each step's scoring, one "
                                            "Adam step of the Bradley–Terry loss on pairs of that step (in each "
                                            "group, the response with the highest env reward over the lowest, "
                                            "where they differ). The network, its optimiser and the pending pairs "
                                            "ride in checkpoints. false: the model stays frozen.")
    lr: float = Field(1e-4, gt=0, description="online: learning rate of the model's Adam optimiser.")
    max_pairs: int = Field(64, ge=1, description="online: at most this many pairs per step (the first groups').")


@SCORE.register("reward_model", config=RewardModelConfig)
class RewardModelScore(Piece):
    """``r(x, y)`` of a trained reward model as each episode's reward: x the first observation, y the whole
    response. Frozen, or with ``online`` trained between policy steps on the step's pairs (the env's reward decides
    each pair; a row's reward comes from the model before it saw that row). Its own time per step, training
    included, is logged as ``time/score/reward_model_s``; online, also ``rm/loss``, ``rm/accuracy`` and
    ``rm/pairs``."""

    cfg: RewardModelConfig

    def __init__(self, cfg: RewardModelConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        where = f"{build.where}.path" if build is not None and build.where else "reward_model.path"
        self.rm = RewardModel.load(cfg.path, where)
        self.rm.policy.requires_grad_(cfg.online)
        self.optimizer = torch.optim.Adam(self.rm.policy.parameters(), lr=cfg.lr) if cfg.online else None
        self.pending: list[Pair] = []
        self.seconds = 0.0

    def __call__(self, episodes: list[Episode]) -> list[float]:
        t0 = time.perf_counter()
        prompts = [e.turns[0].observation if e.turns else "" for e in episodes]
        out = self.rm.rewards(prompts, [e.response for e in episodes], self.cfg.batch_size)
        if self.cfg.online:
            self.pending.extend(step_pairs(episodes, prompts))
        self.seconds += time.perf_counter() - t0
        return out

    def step_metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.cfg.online:
            t0 = time.perf_counter()
            metrics = self.update()
            self.seconds += time.perf_counter() - t0
        seconds, self.seconds = self.seconds, 0.0
        return {**metrics, "time/score/reward_model_s": seconds}

    def update(self) -> dict[str, float]:
        """One Adam step of the Bradley–Terry loss on the step's pending pairs (then cleared)."""
        pairs, self.pending = self.pending[: self.cfg.max_pairs], []
        if not pairs:
            return {"rm/pairs": 0.0}
        self.rm.policy.train()
        loss, right = batch_loss(self.rm, "pairs", pairs)
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.rm.policy.parameters(), 1.0)
        self.optimizer.step()
        return {"rm/loss": float(loss.detach()), "rm/accuracy": float(right.mean()), "rm/pairs": float(len(pairs))}

    def state_dict(self) -> dict[str, Any]:
        if not self.cfg.online:
            return {}
        return {"model": self.rm.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
                "pending": [list(p) for p in self.pending]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.rm.policy.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.pending = [Pair(*p) for p in state["pending"]]


def step_pairs(episodes: list[Episode], prompts: list[str]) -> list[Pair]:
    """In each group (in order of first appearance), the response with the highest env reward over the one with
    the lowest (the first of each among ties), where the rewards differ."""
    groups: dict[int, list[int]] = {}
    for i, e in enumerate(episodes):
        groups.setdefault(e.group_id, []).append(i)
    gold = [sum(t.reward for t in e.turns) for e in episodes]
    out = []
    for rows in groups.values():
        best, worst = max(rows, key=lambda i: gold[i]), min(rows, key=lambda i: gold[i])
        if gold[best] > gold[worst]:
            out.append(Pair(prompts[best], episodes[best].response, episodes[worst].response))
    return out
