"""Runs a recipe: builds the task, the policy and every piece, warm-starts, evaluates, calls the recipe's loop once
per step (explore → score → credit → update → observe, by default) and checkpoints everything (the policy, the
optimiser and every piece's state). Knows no method by name."""

from __future__ import annotations

import copy
import functools
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from outrider.checkpoint import list_checkpoints, newest_intact, read_state, restore_rng, save_checkpoint
from outrider.envs import Task
from outrider.envs.workers import EnvWorkers, WorkerPool, task_from_section
from outrider.errors import OutriderError
from outrider.explore import EXPLORE
from outrider.explore.rollout import check_prompts_fit
from outrider.loops import Run
from outrider.observe.evaluate import EvalRecord, eval_episodes, evaluate_detailed
from outrider.observe.metrics import MetricsWriter
from outrider.observe.progress import RunProgress
from outrider.pieces import build_pieces, recipe_needs
from outrider.policy.adapters import add_lora
from outrider.policy.model import Policy
from outrider.policy.sampler import SamplingParams
from outrider.policy.sft import warm_start
from outrider.recipe import Recipe, resolve
from outrider.registry import BuildContext
from outrider.rundir import interrupts_deferred
from outrider.update.learner import SKIPPED_NONFINITE


BASE_EVAL_FILE = "eval_base.json"


def piece_states(state: dict[str, Any]) -> dict[str, Any]:
    """The pieces' states of a checkpoint's trainer state (checkpoints before the piece lifecycle kept only the
    entropy regulator's, as ``regulator``)."""
    if "pieces" in state:
        return state["pieces"]
    return {"update.entropy": state["regulator"]} if state.get("regulator") else {}


def build_policy(recipe: Recipe, value_head: bool) -> Policy:
    """The recipe's policy at its start: the tiny model or `policy.model`, with fresh LoRA adapters
    (`policy.lora`) and gradient checkpointing (`policy.gradient_checkpointing`) when asked for."""
    p = recipe.policy
    if p.model == "tiny":
        policy = Policy.tiny(p.hidden, p.layers, p.heads, p.max_positions, seed=recipe.train.seed,
                             value_head=value_head, chat_template=p.chat_template)
    else:
        policy = Policy.load(p.model, value_head=value_head, chat_template=p.chat_template)
    if p.lora is not None:
        add_lora(policy, p.lora, recipe.train.seed)
    if p.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    return policy


def build_task(recipe: Recipe):
    return task_from_section(recipe.task)


def start_env_workers(recipe: Recipe, task: Task) -> WorkerPool | None:
    """The run's env workers when the task asks for them (`task.workers` > 1): local processes, or Ray actors
    (`task.workers_backend: ray`), each building the task from the recipe's task section; None for in-process
    envs."""
    if task.workers <= 1:
        return None
    make_task = functools.partial(task_from_section, dict(recipe.task))
    if task.workers_backend == "ray":
        from outrider.envs.ray_workers import RayEnvWorkers  # Ray is imported only when asked for

        return RayEnvWorkers(make_task, task.workers)
    return EnvWorkers(make_task, task.workers)


def sampling_params(recipe: Recipe, temperature: float | None = None) -> SamplingParams:
    _, ex = EXPLORE.build(recipe.explore, "explore")
    return SamplingParams(temperature=ex.temperature if temperature is None else temperature, top_p=ex.top_p,
                          top_k=ex.top_k, max_new_tokens=ex.max_new_tokens, stop=list(ex.stop),
                          compile=recipe.policy.compile)


class Trainer:
    def __init__(self, recipe: Recipe, run_dir: Path, resume: bool = False, quiet: bool = False):
        self.recipe, self.run_dir, self.quiet = recipe, run_dir, quiet
        self.progress = RunProgress(recipe.train.steps, quiet=quiet)
        if recipe.train.threads:
            torch.set_num_threads(recipe.train.threads)
        self.task = build_task(recipe)
        self.needs = recipe_needs(recipe)
        self.params = sampling_params(recipe)
        if self.params.temperature <= 0:
            raise OutriderError("explore.temperature: must be > 0 for training (log-probs are taken at the sampling "
                                "temperature); use observe.eval_temperature: 0 for greedy evaluation")
        self.device = torch.device(recipe.train.device)
        self.start_step, self.summary, self.reference = 0, {}, None
        self.nonfinite_streak = 0  # steps in a row whose update was skipped for a NaN/inf loss or gradient
        self.warned_no_action = False
        checkpoints = list_checkpoints(run_dir) if resume else []
        if resume and not checkpoints:
            print(f"warning: --resume: no checkpoint in {run_dir / 'checkpoints'} (the run stopped before its first "
                  "one); starting it over from step 0", file=sys.stderr)
        state: dict[str, Any] = {}
        if checkpoints:
            _, state = newest_intact(checkpoints, self._load_checkpoint, "resuming from")
            restore_rng(state)
            self.start_step, self.summary = state["step"], state["summary"]
            if recipe.train.steps < self.start_step:
                raise OutriderError(f"train.steps: {recipe.train.steps} is below the step of the newest checkpoint "
                                    f"({self.start_step}); resume can only keep or extend a run")
        else:
            self.policy = build_policy(recipe, self.needs.values).to(self.device)
            self.optimizer = self._make_optimizer()
        check_prompts_fit(self.policy, self.task, self.params, recipe.train.seed)  # before the run dir is touched
        self.pieces = build_pieces(recipe, BuildContext(self.task, self.policy, self.device, recipe.train.seed))
        self.pieces.load_state_dict(piece_states(state))
        if self.needs.ref_logprobs and checkpoints:
            self.reference = Policy.load(run_dir / "checkpoints" / "reference", where="reference").to(self.device)
        self.resumed = bool(checkpoints)
        self.env_workers: WorkerPool | None = None  # started by run(), stopped when it ends
        self.completed = self.start_step
        # a resume that found no complete checkpoint starts over: drop whatever the killed run had logged
        self.truncate_after = self.start_step if self.resumed else (-1 if resume else None)

    def _load_checkpoint(self, checkpoint: Path) -> dict[str, Any]:
        """Load the policy and the optimiser of a checkpoint (raising if any file is unreadable); its state.
        A LoRA run rebuilds its base and loads the checkpoint's adapter into it."""
        if self.recipe.policy.lora is not None:
            self.policy = build_policy(self.recipe, self.needs.values)
            self.policy.load_adapter_checkpoint(checkpoint)
            self.policy.to(self.device)
        else:
            self.policy = Policy.load(checkpoint, value_head=self.needs.values,
                                      chat_template=self.recipe.policy.chat_template, where="checkpoint")
            if self.recipe.policy.gradient_checkpointing:
                self.policy.enable_gradient_checkpointing()
            self.policy.to(self.device)
        self.optimizer = self._make_optimizer()
        state = read_state(checkpoint)
        self.optimizer.load_state_dict(state["optimizer"])
        return state

    def _make_optimizer(self) -> torch.optim.Optimizer:
        u = self.recipe.update
        params = list(self.policy.parameters())
        # the fused kernel: one pass over all parameters instead of PyTorch's per-tensor loop (its CPU default);
        # the same update up to float rounding
        fused = all(p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.AdamW(params, lr=u.lr, betas=u.betas, weight_decay=u.weight_decay, fused=fused or None)

    @property
    def run_context(self) -> Run:
        return Run(self.recipe, self.task, self.policy, self.optimizer, self.reference, self.pieces, self.params,
                   self.device, self.env_workers)

    # --- stages -------------------------------------------------------------------------------------------------
    def _evaluate(self) -> dict[str, float]:
        """Held-out evaluation; the first one (the warm-started base model) is kept in `eval_base.json` so later
        ones report support change and the pass@k crossover against it."""
        o = self.recipe.observe
        params = sampling_params(self.recipe, o.eval_temperature)
        base_file = self.run_dir / BASE_EVAL_FILE
        base = EvalRecord(**json.loads(base_file.read_text())) if base_file.exists() else None
        with self.progress.phase("eval", eval_episodes(self.task, o.eval_prompts, o.eval_samples)) as advance:
            metrics, record = evaluate_detailed(self.policy, self.task, o.eval_prompts, o.eval_samples, o.pass_at,
                                                params, seed=self.recipe.train.seed, diagnostics=o.diagnostics,
                                                base=base, on_episodes=advance, env_workers=self.env_workers)
        if base is None:
            tmp = base_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(record)))
            tmp.replace(base_file)
        return metrics

    def step(self, step: int) -> dict[str, float]:
        """One step of the recipe's loop (an RL step by default)."""
        return self.pieces.loop(self.run_context, step)

    # --- the run ------------------------------------------------------------------------------------------------
    def _checkpoint(self, step: int) -> None:
        if not all(bool(torch.isfinite(p).all()) for p in self.policy.parameters()):
            raise OutriderError(f"train: the model's parameters are not finite (NaN/inf) at step {step}; no "
                                f"checkpoint was written (update.lr is {self.recipe.update.lr:g})")
        save_checkpoint(self.run_dir, step, self.policy, self.optimizer,
                        {"summary": self.summary, "pieces": self.pieces.state_dict()},
                        keep=self.recipe.observe.keep_checkpoints)

    def _check_step(self, step: int, metrics: dict[str, float]) -> None:
        """After a step is logged: say (once) when it made no action token at all, and stop after
        `train.max_nonfinite_steps` steps in a row whose update was skipped for a NaN/inf loss or gradient (the run
        has diverged: going on would only log NaN)."""
        if metrics.get("episode/response_length") == 0.0 and not self.warned_no_action:
            self.warned_no_action = True
            print(f"warning: step {step} trained nothing: no episode made an action token (context_full_frac "
                  f"{metrics.get('episode/context_full_frac', 0.0):.2f}); said once", file=sys.stderr)
        self.nonfinite_streak = self.nonfinite_streak + 1 if metrics.get(SKIPPED_NONFINITE, 0) > 0 else 0
        if self.nonfinite_streak >= self.recipe.train.max_nonfinite_steps:
            newest = list_checkpoints(self.run_dir)
            raise OutriderError(
                f"update: the loss or gradients were NaN/inf in {self.nonfinite_streak} steps in a row (steps "
                f"{step - self.nonfinite_streak + 1}-{step}; each update skipped), so the run stopped; newest "
                f"checkpoint: {newest[-1].name if newest else 'none'}. Lower update.lr (now "
                f"{self.recipe.update.lr:g})")

    def _write_atomic(self, name: str, text: str) -> None:
        """Write a file of the run directory whole or not at all (a full disk leaves the previous one)."""
        tmp = self.run_dir / f"{name}.tmp"
        try:
            tmp.write_text(text)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(self.run_dir / name)

    def _write_summary(self) -> None:
        self._write_atomic("summary.json", json.dumps(self.summary, indent=2))

    def run(self, on_started: Callable[[], None] | None = None) -> dict[str, Any]:
        """Warm start, evaluate, train, checkpoint; `on_started` is called once the first step is done (the run
        has started successfully: `--overwrite` then drops the run it replaces). `completed` is the last step
        done, for a message when the run is interrupted. Env workers (`task.workers`) live as long as this call,
        stopped on its way out whatever the reason (an error, Ctrl-C)."""
        self.env_workers = start_env_workers(self.recipe, self.task)
        try:
            return self._run(on_started)
        finally:
            if self.env_workers is not None:
                self.env_workers.close()
                self.env_workers = None

    def _run(self, on_started: Callable[[], None] | None) -> dict[str, Any]:
        r, o = self.recipe, self.recipe.observe
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._write_atomic("recipe.yaml", yaml.safe_dump(resolve(r), sort_keys=False))
        progress = self.progress
        # trackers start first: one that cannot start stops the run before any work
        writer = MetricsWriter(self.run_dir, o.report_to, resume_step=self.truncate_after, config=resolve(r))
        t0 = time.perf_counter()
        if not self.resumed:
            t_ws = time.perf_counter()
            with progress.phase("warm start", r.policy.warm_start.steps) as advance:
                warm_start(self.policy, self.task, r.policy.warm_start, on_step=lambda s, loss: advance(loss=loss))
            self.summary = {"model_parameters": self.policy.num_parameters(),
                            "warm_start_s": time.perf_counter() - t_ws, "wall_time_s": 0.0}
            if self.needs.ref_logprobs:
                self.reference = copy.deepcopy(self.policy).eval()
                self.reference.save(self.run_dir / "checkpoints" / "reference")
            self.summary["eval_start"] = self._evaluate()
            progress.note(f"held-out pass@1 at start: {self.summary['eval_start']['pass@1']:.3f}")
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
                with interrupts_deferred():  # the step's metrics line and `completed` (Ctrl-C's message) together
                    writer.write(step, metrics)
                    self.summary["steps"] = self.completed = step
                self._check_step(step, metrics)
                advance(reward=metrics.get("reward/total"), acc=metrics.get("episode/accuracy"),
                        pass1=metrics.get("eval/pass@1"))
                self.summary["wall_time_s"] = elapsed_before + time.perf_counter() - t0
                if on_started is not None:
                    on_started()
                    on_started = None
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
        if on_started is not None:  # no step to run (train.steps 0, or a finished run resumed)
            on_started()
        return self.summary
