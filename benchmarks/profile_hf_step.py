"""Where an RL step's time goes on a real-architecture model, outrider against TRL's GRPOTrainer: sampling, the
training forward (with gradients), the backward pass, the optimiser step, and the rest of the step.

The settings are `hf_lora_step.py`'s (a random Llama-architecture model with a BPE tokenizer, plain-text prompts,
2 prompts × 4 completions, token-mean loss, beta 0, one AdamW update, fp32), at a size a shared 2-core machine
can time (default hidden 512 × 6 layers, vocabulary 2048: 26M parameters). Each path runs in a fresh process;
the phases are timed by wrapping the trainers' own calls (outrider: the step's ``time/sample_s``, `Policy.score`
with gradients; TRL: `GRPOTrainer._generate_single_turn`, `_get_per_token_logps_and_entropies` with gradients;
both: `torch.autograd.backward` and the optimiser's global step hooks). The first step is dropped.

    python benchmarks/profile_hf_step.py --paths outrider,trl --steps 3

Writes benchmarks/results/profile_hf_step.json (or the --out path).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "profile_hf_step.json"
PHASES = ("sample", "forward", "backward", "optimizer")


class Timers:
    """Seconds per phase, accumulated until `take`."""

    def __init__(self) -> None:
        self.s: dict[str, float] = defaultdict(float)

    def wrap(self, owner: object, name: str, phase: str, when=lambda: True) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            if not when():
                return original(*args, **kwargs)
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.s[phase] += time.perf_counter() - t
        setattr(owner, name, timed)

    def take(self) -> dict[str, float]:
        out, self.s = dict(self.s), defaultdict(float)
        return out


def _install_common(timers: Timers) -> None:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    timers.wrap(torch.autograd, "backward", "backward")
    started: list[float] = []
    register_optimizer_step_pre_hook(lambda *_: started.append(time.perf_counter()))
    register_optimizer_step_post_hook(lambda *_: timers.s.__setitem__(
        "optimizer", timers.s["optimizer"] + time.perf_counter() - started.pop()))


def _child(spec: dict) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    from hf_lora_step import LORA, PATHS
    from rl_task import trl_prompts
    from trl_grpo import _reverse_task

    torch.set_num_threads(spec["threads"])
    who, lora, gc = PATHS[spec["path"]]
    timers = Timers()
    _install_common(timers)
    prompts, answers = _reverse_task(64, seed=spec["seed"])
    steps: list[dict[str, float]] = []
    if who == "trl":
        import peft
        from transformers import TrainerCallback
        from trl import GRPOTrainer

        from trl_grpo import trl_grpo_step_times

        timers.wrap(GRPOTrainer, "_generate_single_turn", "sample")
        timers.wrap(GRPOTrainer, "_get_per_token_logps_and_entropies", "forward", torch.is_grad_enabled)

        class PerStep(TrainerCallback):
            def on_step_begin(self, *_, **__):
                timers.take()
                self.t = time.perf_counter()

            def on_step_end(self, *_, **__):
                steps.append({"step": time.perf_counter() - self.t, **timers.take()})

        original = GRPOTrainer.__init__

        def init(self, *a, callbacks=None, **k):
            original(self, *a, callbacks=[*(callbacks or []), PerStep()], **k)
        GRPOTrainer.__init__ = init
        config = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["target_modules"],
                                 task_type="CAUSAL_LM") if lora else None
        r = trl_grpo_step_times(spec["model"], trl_prompts(spec["model"], prompts), answers, spec["group"],
                                spec["new_tokens"], spec["steps"], 1e-5, spec["seed"], prompts_per_step=spec["prompts"],
                                peft_config=config, gradient_checkpointing=gc, threads=spec["threads"])
        tokens = r["completion_tokens_per_step"]
    else:
        from throughput import outrider_trainer

        from outrider.policy.model import Policy

        timers.wrap(Policy, "score", "forward", torch.is_grad_enabled)
        policy = {"chat_template": False, "gradient_checkpointing": gc, **({"lora": LORA} if lora else {})}
        tokens = []
        with tempfile.TemporaryDirectory() as work:
            trainer = outrider_trainer(spec["model"], prompts, answers, spec["group"], spec["new_tokens"],
                                       spec["steps"], 1e-5, spec["seed"], Path(work), spec["prompts"], policy,
                                       skip_zero_advantage=False)
            for step in range(1, spec["steps"] + 1):
                timers.take()
                t = time.perf_counter()
                m = trainer.step(step)
                steps.append({"step": time.perf_counter() - t, **timers.take(), "sample": m["time/sample_s"]})
                tokens.append(round(m["episode/response_length"] * spec["prompts"] * spec["group"]))
    print(json.dumps({"steps": steps, "tokens": tokens}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="steps per run (the first is dropped)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--paths", default="outrider,trl")
    ap.add_argument("--rotate", type=int, default=0, help="start at the N-th path (order rotating between runs)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return _child(json.loads(a.child))
    from outrider.policy.random_model import write_model_dir

    result: dict = {"settings": {k: str(v) for k, v in vars(a).items() if k != "child"}, "paths": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model = str(write_model_dir(Path(tmp) / "model", "llama", a.hidden, a.layers, a.heads, vocab_size=a.vocab,
                                    max_positions=max(512, 2 * a.new_tokens)))
        labels = a.paths.split(",")
        for label in labels[a.rotate % len(labels):] + labels[:a.rotate % len(labels)]:
            load_before = os.getloadavg()[0]
            spec = dict(path=label, model=model, prompts=a.prompts, group=a.group, new_tokens=a.new_tokens,
                        steps=a.steps, seed=0, threads=a.threads)
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                 text=True)
            if out.returncode:
                raise RuntimeError(f"{label} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            timed = r["steps"][1:]
            med = {k: statistics.median(s.get(k, 0.0) for s in timed) for k in ("step", *PHASES)}
            med["rest"] = med["step"] - sum(med[k] for k in PHASES)
            tokens = statistics.median(r["tokens"][1:]) if len(r["tokens"]) > 1 else None
            load = (load_before, os.getloadavg()[0])  # the 1-minute load average before and after the run
            result["paths"][label] = {"median_s": med, "steps": r["steps"], "completion_tokens": r["tokens"],
                                      "ms_per_completion_token": {k: 1e3 * v / tokens for k, v in med.items()}
                                      if tokens else None, "load_average": load}
            print(f"{label:18s} " + "  ".join(f"{k} {v:6.2f}" for k, v in med.items())
                  + f"  tokens {tokens}  load {load[0]:.1f}-{load[1]:.1f}", flush=True)
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(result, indent=2))  # after every path: a cut-short run keeps what it has
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
