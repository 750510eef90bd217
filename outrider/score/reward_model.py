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
response and an EOS after it. `outrider rm train` (cli_rm.py) trains one from a file (`score/rm_training.py`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

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
        from outrider.score.rm_training import batch_loss  # rm_training imports this module

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
