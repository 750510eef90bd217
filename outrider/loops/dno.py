"""Batched on-policy preference rounds: DNO [48] (Direct Nash Optimization, its practical form DNO-Prct) and
iterative DPO. Each round samples a batch of pairs with the recipe's explore piece (e.g. `preference_pairs` and a
preference oracle), freezes the policy of the round's start as the reference, and trains the learner's pairwise
terms on that batch for ``round_steps`` steps."""

from __future__ import annotations

import time
from dataclasses import fields
from typing import Any, Literal

import torch
from pydantic import Field

from outrider.data import Batch, pack
from outrider.errors import OutriderError
from outrider.loops import LOOPS, Run
from outrider.loops.rl import collect
from outrider.observe.metrics import episode_metrics
from outrider.registry import BuildContext, Piece, PieceConfig
from outrider.update.learner import learner_step, prepare


class DNOConfig(PieceConfig):
    """Options of the `dno` loop."""

    round_steps: int = Field(4, ge=1, description="Learner steps on each round's batch of pairs before the next "
                                                  "round samples a new one (each step runs update.epochs × "
                                                  "update.minibatches optimiser steps on the whole batch).")
    reference: Literal["round", "initial"] = Field(
        "round", description="round: the policy at the round's start is the reference of that round's pairwise "
                             "terms (DNO-Prct [48]); initial: the frozen warm-started model throughout (iterative "
                             "DPO).")


@LOOPS.register("dno", config=DNOConfig)
class PreferenceRounds(Piece):
    """DNO-Prct [48] as rounds of steps. At the first step of round t the explore piece samples from the current
    policy π_t and marks pairs (with `preference_pairs`: each prompt's highest and lowest win rate under the
    oracle, kept above a margin); the batch is packed and the reference log-probs are taken once, from π_t itself
    (``reference: round``) or from the frozen warm start (``initial``). Then ``round_steps`` learner steps train
    the pairwise terms on that batch, e.g. ``update: {loss: none, terms: [{name: dpo, beta: 0.1}]}``: with π_t as
    reference, ``−log σ(β log π(y_w)/π_t(y_w) − β log π(y_l)/π_t(y_l))``, the regression DNO-Prct solves each
    iteration [para]. π_{t+1} is the policy after the round. The round's packed batch is the loop's state, so a run
    killed mid-round resumes on the same pairs. Metrics: ``dno/round`` and, at a round's first step, the explore
    piece's and the sampled pairs' (``episode/*``)."""

    cfg: DNOConfig

    def __init__(self, cfg: DNOConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        recipe = build.recipe if build else None
        if recipe is not None and not recipe.update.terms:
            raise OutriderError("loop dno: update.terms is empty, so nothing would learn from the pairs; add a "
                                "pairwise term, e.g. update.terms: [dpo]")
        self.batch: Batch | None = None

    def new_round(self, run: Run, step: int) -> dict[str, float]:
        """Sample the round's pairs from the current policy and prepare them (reference log-probs included)."""
        timers = {"sample_s": 0.0, "sample_tokens": 0.0}
        episodes, metrics = collect(run, step, timers)
        metrics.update(episode_metrics(episodes))
        policy, u = run.policy, run.recipe.update
        batch = pack(episodes, policy.pad_id, policy.bos_id).to(run.device)
        reference = policy if self.cfg.reference == "round" else run.reference
        prepare(batch, policy, reference, u, run.params.temperature, run.need_old(), False)
        batch.advantages = torch.zeros_like(batch.token_rewards)
        self.batch = batch
        metrics["time/sample_s"], metrics["time/sample_tokens"] = timers["sample_s"], timers["sample_tokens"]
        return metrics

    def __call__(self, run: Run, step: int) -> dict[str, float]:
        t_step = time.perf_counter()
        round_index = (step - 1) // self.cfg.round_steps
        metrics: dict[str, float] = {"dno/round": float(round_index)}
        sample_s = sample_tokens = 0.0
        if (step - 1) % self.cfg.round_steps == 0 or self.batch is None:
            metrics.update(self.new_round(run, step))
            sample_s, sample_tokens = metrics.pop("time/sample_s"), metrics.pop("time/sample_tokens")
        t_train = time.perf_counter()
        u, batch = run.recipe.update, self.batch.to(run.device)
        metrics.update(learner_step(run.policy, run.optimizer, batch, run.pieces.terms, u,
                                    run.params.temperature, run.learner_generator(step), run.norm_length))
        train_s = time.perf_counter() - t_train
        metrics.update(run.timing(sample_s, sample_tokens, train_s, float(batch.attention_mask.sum()) * u.epochs,
                                  time.perf_counter() - t_step))
        return metrics

    def state_dict(self) -> dict[str, Any]:
        if self.batch is None:
            return {}
        return {"batch": {f.name: v.cpu() if isinstance(v := getattr(self.batch, f.name), torch.Tensor) else v
                          for f in fields(Batch)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "batch" in state:
            self.batch = Batch(**state["batch"])
