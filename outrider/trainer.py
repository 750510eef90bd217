"""Wires the stages: explore → score → credit → update → observe. Knows no method by name."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from outrider.checkpoint import list_checkpoints, load_state, save_checkpoint
from outrider.credit import CREDIT
from outrider.stats import masked_mean
from outrider.data import Episode, pack
from outrider.envs import ENVS
from outrider.errors import OutriderError
from outrider.explore import EXPLORE, ExploreContext
from outrider.explore.rollout import rollout
from outrider.observe.evaluate import EvalRecord, evaluate_detailed
from outrider.observe.metrics import MetricsWriter, episode_metrics
from outrider.observe.progress import RunProgress
from outrider.policy.model import Policy
from outrider.policy.sampler import SamplingParams
from outrider.policy.sft import warm_start
from outrider.recipe import Recipe, resolve
from outrider.score import SCORE, Component, compose
from outrider.update import ENTROPY, LOSSES
from outrider.update.learner import kl_into_rewards, learner_step, prepare


BASE_EVAL_FILE = "eval_base.json"


def build_policy(recipe: Recipe, value_head: bool) -> Policy:
    p = recipe.policy
    if p.model == "tiny":
        return Policy.tiny(p.hidden, p.layers, p.heads, p.max_positions, seed=recipe.train.seed,
                           value_head=value_head, chat_template=p.chat_template)
    return Policy.load(p.model, value_head=value_head, chat_template=p.chat_template)


def build_task(recipe: Recipe):
    entry, cfg = ENVS.build(recipe.task, "task")
    return entry.fn(cfg)


def sampling_params(recipe: Recipe, temperature: float | None = None) -> SamplingParams:
    _, ex = EXPLORE.build(recipe.explore, "explore")
    return SamplingParams(temperature=ex.temperature if temperature is None else temperature, top_p=ex.top_p,
                          top_k=ex.top_k, max_new_tokens=ex.max_new_tokens, stop=list(ex.stop),
                          compile=recipe.policy.compile)


class Trainer:
    def __init__(self, recipe: Recipe, run_dir: Path, resume: bool = False, quiet: bool = False):
        self.recipe, self.run_dir, self.quiet = recipe, run_dir, quiet
        if recipe.train.threads:
            torch.set_num_threads(recipe.train.threads)
        self.task = build_task(recipe)
        self.credit = CREDIT.build(recipe.credit, "credit")
        self.explore = EXPLORE.build(recipe.explore, "explore")
        self.loss = LOSSES.build(recipe.update.loss, "update.loss")
        entropy_entry, entropy_cfg = ENTROPY.build(recipe.update.entropy, "update.entropy")
        self.regulator, self.regulator_traits = entropy_entry.fn(entropy_cfg), entropy_entry.traits
        self.components = []
        for i, c in enumerate(recipe.score):
            entry, cfg = SCORE.build({k: v for k, v in c.items() if k != "weight"}, f"score[{i}]")
            self.components.append(Component(entry.name, entry, cfg, float(c.get("weight", 1.0))))
        self.needs_values = type(self.credit[1]).requires_values
        self.params = sampling_params(recipe)
        if self.params.temperature <= 0:
            raise OutriderError("explore.temperature: must be > 0 for training (log-probs are taken at the sampling "
                                "temperature); use observe.eval_temperature: 0 for greedy evaluation")
        self.device = torch.device(recipe.train.device)
        self.start_step, self.summary, self.reference = 0, {}, None
        checkpoints = list_checkpoints(run_dir) if resume else []
        if checkpoints:
            self.policy = Policy.load(checkpoints[-1], value_head=self.needs_values,
                                      chat_template=recipe.policy.chat_template).to(self.device)
            self.optimizer = self._make_optimizer()
            state = load_state(checkpoints[-1])
            self.optimizer.load_state_dict(state["optimizer"])
            self.start_step, self.summary = state["step"], state["summary"]
            self.regulator.load_state_dict(state.get("regulator", {}))
            if recipe.train.steps < self.start_step:
                raise OutriderError(f"train.steps: {recipe.train.steps} is below the step of the newest checkpoint "
                                    f"({self.start_step}); resume can only keep or extend a run")
        else:
            self.policy = build_policy(recipe, self.needs_values).to(self.device)
            self.optimizer = self._make_optimizer()
        if recipe.update.kl.coef > 0:
            ref_dir = run_dir / "checkpoints" / "reference"
            self.reference = Policy.load(ref_dir).to(self.device) if checkpoints else None
        self.resumed = bool(checkpoints)
        # a resume that found no complete checkpoint starts over: drop whatever the killed run had logged
        self.truncate_after = self.start_step if self.resumed else (-1 if resume else None)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        u = self.recipe.update
        params = list(self.policy.parameters())
        # the fused kernel: one pass over all parameters instead of PyTorch's per-tensor loop (its CPU default),
        # 0.5 ms instead of 2.7 ms a step on the 0.54M model; the same update up to float rounding
        fused = all(p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.AdamW(params, lr=u.lr, betas=u.betas, weight_decay=u.weight_decay, fused=fused or None)

    # --- stages -------------------------------------------------------------------------------------------------
    def _evaluate(self) -> dict[str, float]:
        """Held-out evaluation; the first one (the warm-started base model) is kept in `eval_base.json` so later
        ones report support change and the pass@k crossover against it."""
        o = self.recipe.observe
        params = sampling_params(self.recipe, o.eval_temperature)
        base_file = self.run_dir / BASE_EVAL_FILE
        base = EvalRecord(**json.loads(base_file.read_text())) if base_file.exists() else None
        metrics, record = evaluate_detailed(self.policy, self.task, o.eval_prompts, o.eval_samples, o.pass_at,
                                            params, seed=self.recipe.train.seed, diagnostics=o.diagnostics,
                                            base=base)
        if base is None:
            tmp = base_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(record)))
            tmp.replace(base_file)
        return metrics

    def _collect(self, step: int, timers: dict[str, float]) -> tuple[list[Episode], dict[str, float]]:
        seed = self.recipe.train.seed
        seed_rng = np.random.default_rng([seed, step])
        generator = torch.Generator(device=self.device).manual_seed(seed * 1_000_003 + step)
        next_group = [0]
        entry, cfg = self.explore
        horizon = self.task.max_turns if cfg.turn_cap is None else cfg.turn_cap.at(step, self.task.max_turns)

        def run_groups(seeds: list[int]) -> list[Episode]:
            t0 = time.perf_counter()
            g = cfg.group_size
            group_ids = [next_group[0] + i // g for i in range(len(seeds) * g)]
            next_group[0] += len(seeds)
            out = rollout(self.policy, lambda: self.task.make_env("train"), [s for s in seeds for _ in range(g)],
                          group_ids, self.params, generator, horizon)
            timers["sample_s"] += time.perf_counter() - t0
            timers["sample_tokens"] += sum(e.num_action_tokens for e in out)
            return out

        ctx = ExploreContext(rollout=run_groups, score=lambda eps: compose(eps, self.components),
                             next_seeds=lambda n: [int(x) for x in seed_rng.integers(0, 2**31 - 1, n)])
        episodes, metrics = entry.fn(ctx, cfg)
        if self.task.max_turns > 1:
            metrics["explore/turn_cap"] = float(horizon)
        return episodes, metrics

    def step(self, step: int) -> dict[str, float]:
        t_step = time.perf_counter()
        timers = {"sample_s": 0.0, "sample_tokens": 0.0}
        episodes, metrics = self._collect(step, timers)
        metrics.update(episode_metrics(episodes))
        t_train = time.perf_counter()
        batch = pack(episodes, self.policy.pad_id, self.policy.bos_id).to(self.device)
        u = self.recipe.update
        need_old = u.epochs * u.minibatches > 1 or (self.reference is not None and u.kl.placement == "reward")
        prepare(batch, self.policy, self.reference, u, self.params.temperature, need_old, self.needs_values,
                top_k=self.params.top_k, top_p=self.params.top_p)
        if self.reference is not None and u.kl.placement == "reward":
            metrics["policy/kl_in_reward"] = float(kl_into_rewards(batch, u))
        credit_out = self.credit[0].fn(batch, self.credit[1])
        batch.advantages, batch.returns = credit_out.advantages, credit_out.returns
        metrics.update({f"credit/{k}": float(v) for k, v in credit_out.metrics.items()})
        mask = batch.action_mask
        metrics["credit/advantage_mean"] = float(masked_mean(batch.advantages, mask))
        metrics["credit/zero_advantage_frac"] = float(masked_mean((batch.advantages.abs() < 1e-8).float(), mask))
        generator = torch.Generator().manual_seed(self.recipe.train.seed * 7_919 + step)
        norm_length = self.params.max_new_tokens * self.task.max_turns
        metrics.update(learner_step(self.policy, self.optimizer, batch, self.loss, self.regulator, u,
                                    self.params.temperature, generator, norm_length, self.regulator_traits,
                                    top_k=self.params.top_k, top_p=self.params.top_p))
        train_s = time.perf_counter() - t_train
        train_tokens = float(batch.attention_mask.sum()) * u.epochs
        metrics.update({
            "time/sample_s": timers["sample_s"], "time/train_s": train_s,
            "time/step_s": time.perf_counter() - t_step,
            "throughput/sample_tok_s": timers["sample_tokens"] / max(timers["sample_s"], 1e-9),
            "throughput/train_tok_s": train_tokens / max(train_s, 1e-9),
        })
        return metrics

    # --- the run ------------------------------------------------------------------------------------------------
    def _checkpoint(self, step: int) -> None:
        save_checkpoint(self.run_dir, step, self.policy, self.optimizer,
                        {"summary": self.summary, "regulator": self.regulator.state_dict()},
                        keep=self.recipe.observe.keep_checkpoints)

    def _write_summary(self) -> None:
        tmp = self.run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(self.summary, indent=2))
        tmp.replace(self.run_dir / "summary.json")

    def run(self) -> dict[str, Any]:
        r, o = self.recipe, self.recipe.observe
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "recipe.yaml").write_text(yaml.safe_dump(resolve(r), sort_keys=False))
        progress = RunProgress(r.train.steps, quiet=self.quiet)
        t0 = time.perf_counter()
        if not self.resumed:
            t_ws = time.perf_counter()
            with progress.phase("warm start", r.policy.warm_start.steps) as advance:
                warm_start(self.policy, self.task, r.policy.warm_start, on_step=lambda s, loss: advance(loss=loss))
            self.summary = {"model_parameters": self.policy.num_parameters(),
                            "warm_start_s": time.perf_counter() - t_ws, "wall_time_s": 0.0}
            if r.update.kl.coef > 0:
                self.reference = copy.deepcopy(self.policy).eval()
                self.reference.save(self.run_dir / "checkpoints" / "reference")
            self.summary["eval_start"] = self._evaluate()
            progress.note(f"held-out pass@1 at start: {self.summary['eval_start']['pass@1']:.3f}")
        writer = MetricsWriter(self.run_dir, o.tensorboard, resume_step=self.truncate_after)
        if not self.resumed:
            writer.write(0, {f"eval/{k}": v for k, v in self.summary["eval_start"].items()})
            self._checkpoint(0)
        elapsed_before = self.summary.get("wall_time_s", 0.0)
        with progress.phase("RL", r.train.steps, start=self.start_step) as advance:
            for step in range(self.start_step + 1, r.train.steps + 1):
                metrics = self.step(step)
                if step == r.train.steps or (o.eval_every and step % o.eval_every == 0):
                    end = self._evaluate()
                    metrics.update({f"eval/{k}": v for k, v in end.items()})
                writer.write(step, metrics)
                advance(reward=metrics["reward/total"], acc=metrics["episode/accuracy"],
                        pass1=metrics.get("eval/pass@1"))
                self.summary["wall_time_s"] = elapsed_before + time.perf_counter() - t0
                self.summary["steps"] = step
                if o.checkpoint_every and step % o.checkpoint_every == 0 and step != r.train.steps:
                    self._checkpoint(step)
        writer.close()
        if self.start_step >= r.train.steps:  # nothing left to train: a resumed, finished run
            end = self.summary.get("eval_end") or self._evaluate()
        self.summary.update({"eval_end": end, "steps": r.train.steps,
                             "wall_time_s": elapsed_before + time.perf_counter() - t0})
        if self.start_step < r.train.steps:  # a finished run's final checkpoint already exists: leave it be
            self._checkpoint(r.train.steps)
        self._write_summary()
        return self.summary
