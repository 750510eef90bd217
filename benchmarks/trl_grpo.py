"""Reference point: wall-clock time of TRL's `GRPOTrainer` RL steps on CPU.

`trl_grpo_step_times` trains TRL's GRPO on a saved HF model directory (e.g. one written by
`outrider.policy.model.Policy.save`) and returns the seconds each optimiser step took, so outrider's own
step time can be compared against it under matched settings: plain-text prompts, `group_size` sampled
completions per prompt at temperature 1, one update per generation batch, token-mean ("dapo") loss, no
reference model (beta=0), AdamW with a constant learning rate, grad-norm clipping at 1.0, fp32, 2 threads.

Needs the `bench` extra (`pip install -e '.[bench]'`). Run as a script for a quick check on the tiny model:

    python benchmarks/trl_grpo.py
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

# The default number of prompts per optimiser step; with `group_size` completions each.
PROMPTS_PER_STEP = 16


def trl_grpo_step_times(model_dir: str, prompts: list[str], answers: list[str], group_size: int,
                        max_new_tokens: int, steps: int, lr: float, seed: int, prompts_per_step: int = PROMPTS_PER_STEP,
                        peft_config: object = None, gradient_checkpointing: bool = False, threads: int = 2) -> dict:
    """Train TRL's GRPOTrainer on CPU for `steps` optimiser steps and time each one.

    Every optimiser step generates `group_size` completions for each of ``min(prompts_per_step, len(prompts))``
    prompts (``16 × group_size`` completions by default, e.g. 128 for group_size 8) and takes one AdamW update on
    all of them. `peft_config` (a `peft.LoraConfig`) trains LoRA adapters; `gradient_checkpointing` as TRL's own;
    `threads` torch threads.
    The reward is 1.0 when a completion, stripped of surrounding whitespace, equals its prompt's answer, else 0.0.

    Prompts are tokenised without special tokens, as TRL does: to give the model the same ids as outrider (which
    starts each sequence with BOS), put the tokenizer's BOS text in front of each prompt.

    Returns ``{"step_s": [...], "completion_tokens_per_step": [...], "zero_std_group_frac": [...],
    "trl_version": str}`` with one entry per optimiser step: its wall-clock seconds (generation, reward, loss,
    backward and optimiser step included), the number of completion tokens generated for it (TRL's logged
    `completions/mean_length` × completions) and the share of groups whose rewards were all equal.
    """
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if not prompts:
        raise ValueError("no prompts")

    torch.set_num_threads(threads)
    prompts_per_step = min(prompts_per_step, len(prompts))
    completions_per_step = prompts_per_step * group_size

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"  # generation pads prompts on the left
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    # Plain-text prompts (not conversational), so TRL never looks for a chat template; the extra "answer" column
    # is passed to the reward function as a keyword argument.
    dataset = Dataset.from_dict({"prompt": list(prompts), "answer": list(answers)})

    def exact_match(completions: list[str], answer: list[str], **_) -> list[float]:
        return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer, strict=True)]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t0 = None
            self.step_s: list[float] = []
            self.mean_lengths: list[float] = []
            self.zero_std: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_s.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                self.mean_lengths.append(float(logs["completions/mean_length"]))
            if logs and "frac_reward_zero_std" in logs:
                self.zero_std.append(float(logs["frac_reward_zero_std"]))

    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="trl_grpo_bench_") as out_dir:
        config = GRPOConfig(
            output_dir=out_dir,
            use_cpu=True,
            bf16=False,
            fp16=False,
            gradient_checkpointing=gradient_checkpointing,  # TRL defaults this to True
            seed=seed,
            data_seed=seed,
            max_steps=steps,
            # One generation batch of `completions_per_step` completions per optimiser step, one update on it.
            per_device_train_batch_size=completions_per_step,
            gradient_accumulation_steps=1,
            generation_batch_size=completions_per_step,
            num_generations=group_size,
            num_iterations=1,
            max_completion_length=max_new_tokens,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            beta=0.0,
            loss_type="dapo",  # token-mean over all completion tokens of the batch
            scale_rewards="group",
            learning_rate=lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            optim="adamw_torch",
            weight_decay=0.0,
            adam_beta1=0.9,
            adam_beta2=0.999,
            max_grad_norm=1.0,
            eval_strategy="no",
            save_strategy="no",
            logging_steps=1,  # per-step metrics, for completions/mean_length
            report_to="none",
            disable_tqdm=True,
            log_completions=False,
            dataloader_num_workers=0,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=exact_match, args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[timer], peft_config=peft_config)
        trainer.train()

    tokens = [round(m * completions_per_step) for m in timer.mean_lengths]
    return {"step_s": timer.step_s, "completion_tokens_per_step": tokens, "trl_version": trl.__version__,
            "zero_std_group_frac": timer.zero_std}


def _reverse_task(n: int, seed: int) -> tuple[list[str], list[str]]:
    import random

    rng = random.Random(seed)
    words = ["hello", "world", "cat", "dog", "apple", "river", "stone", "green", "light", "music", "table",
             "water", "bread", "cloud", "plant", "train", "house", "mouse", "sugar", "chair"]
    picks = [rng.choice(words) for _ in range(n)]
    return [f"{w} ->" for w in picks], [w[::-1] for w in picks]


if __name__ == "__main__":
    from outrider.policy.model import Policy

    with tempfile.TemporaryDirectory(prefix="tiny_model_") as d:
        Policy.tiny().save(d)
        prompts, answers = _reverse_task(64, seed=0)
        res = trl_grpo_step_times(d, prompts, answers, group_size=8, max_new_tokens=int(os.environ.get("MAX_NEW", 16)),
                                  steps=int(os.environ.get("STEPS", 6)), lr=1e-4, seed=0)
    for i, (s, t) in enumerate(zip(res["step_s"], res["completion_tokens_per_step"] + [None] * len(res["step_s"]))):
        print(f"step {i}: {s:.3f} s, completion tokens {t}")
    print(f"median step: {statistics.median(res['step_s']):.3f} s  (trl {res['trl_version']})")
