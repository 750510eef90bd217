"""Fitting a reward model offline (`outrider rm train`): the seeded held-out split by prompt, the minibatch loss of
each kind of data (Bradley–Terry pairs, labelled responses, step labels), evaluation, the training loop and the
goal state of the goal-conditioned RM [87]. The model, its losses and the `reward_model` score piece are in
`score/reward_model.py`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from outrider.errors import OutriderError
from outrider.loops.offline import Pair
from outrider.score.reward_model import RewardModel, bt_loss, label_loss

OBJECTIVES = {"pairs": "bradley_terry", "labels": "label_bce", "steps": "step_bce"}  # kind of data -> saved objective


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
    summary = {"objective": OBJECTIVES[kind], "train_examples": len(train_rows),
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
