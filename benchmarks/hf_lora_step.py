"""RL step time and peak memory of a real-architecture model, outrider against TRL's GRPOTrainer (+ peft), with and
without LoRA and gradient checkpointing.

The model is a randomly initialised Llama-architecture directory with a locally trained BPE tokenizer
(`outrider.policy.random_model`; the default shape, hidden 768 × 12 layers, is 113M parameters). Both trainers
get the same plain-text prompts, group size, response budget, token-mean loss, beta 0, one AdamW update per
batch, fp32 and 2 threads; outrider trains every row (`update.skip_zero_advantage: false`), as TRL does, since a
random model's exact-match rewards are all 0. Each (path, block) runs alone in a fresh process (its peak RSS is
its own); the paths' order rotates from block to block, and each run's first step is dropped.

    python benchmarks/hf_lora_step.py --tiny                    # a quick check that every path runs
    python benchmarks/hf_lora_step.py --blocks 2 --steps 3      # the 113M measurement (tens of minutes on 2 cores)

Writes benchmarks/results/hf_lora_step.json (or the --out path).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "hf_lora_step.json"
LORA = {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
# label -> (trainer, lora, gradient checkpointing)
PATHS = {f"{who}{'_lora' if lora else ''}{'_gc' if gc else ''}": (who, lora, gc)
         for who in ("outrider", "trl") for lora in (False, True) for gc in (False, True)}


def _child(spec: dict) -> None:
    """One run of one path: its steps' seconds and the process's peak RSS, as one JSON line."""
    import torch

    sys.path.insert(0, str(HERE))
    from throughput import _high_water_rss, outrider_step_times
    from trl_grpo import _reverse_task, trl_grpo_step_times
    from rl_task import trl_prompts

    torch.set_num_threads(spec["threads"])
    who, lora, gc = PATHS[spec["path"]]
    prompts, answers = _reverse_task(64, seed=spec["seed"])
    args = (spec["model"], prompts, answers, spec["group"], spec["new_tokens"], spec["steps"], 1e-5, spec["seed"])
    if who == "trl":
        import peft
        import trl  # noqa: F401  (imported before the baseline: setup, not the path's work)

        config = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["target_modules"],
                                 task_type="CAUSAL_LM") if lora else None
        r = trl_grpo_step_times(spec["model"], trl_prompts(spec["model"], prompts), answers, *args[3:],
                                prompts_per_step=spec["prompts"], peft_config=config, gradient_checkpointing=gc)
    else:
        policy = {"chat_template": False, "gradient_checkpointing": gc, **({"lora": LORA} if lora else {})}
        with tempfile.TemporaryDirectory() as work:
            r = outrider_step_times(*args, work=Path(work), prompts_per_step=spec["prompts"], policy=policy,
                                    skip_zero_advantage=False)
    print(json.dumps({"step_s": r["step_s"], "tokens": r["completion_tokens_per_step"],
                      "peak_mb": _high_water_rss() / 2**20}))


def run_path(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{spec['path']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--prompts", type=int, default=2, help="prompts per step")
    ap.add_argument("--group", type=int, default=4, help="completions per prompt")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="steps per run (the first is dropped)")
    ap.add_argument("--blocks", type=int, default=2, help="rounds over every path, order rotating")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of " + ",".join(PATHS))
    ap.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model, 16 tokens: does every path run?")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return _child(json.loads(a.child))
    if a.tiny:
        a.hidden, a.layers, a.heads, a.vocab, a.new_tokens, a.steps, a.blocks = 64, 2, 4, 512, 16, 2, 1
    from transformers import AutoModelForCausalLM

    from outrider.policy.random_model import write_model_dir

    labels = a.paths.split(",")
    times: dict[str, list[float]] = {k: [] for k in labels}
    peaks: dict[str, list[float]] = {k: [] for k in labels}
    tokens: dict[str, list[int]] = {k: [] for k in labels}
    with tempfile.TemporaryDirectory() as tmp:
        model = str(write_model_dir(Path(tmp) / "model", "llama", a.hidden, a.layers, a.heads, vocab_size=a.vocab,
                                    max_positions=max(512, 2 * a.new_tokens)))
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model).parameters())
        print(f"llama model: {n_params / 1e6:.1f}M parameters", flush=True)
        for b in range(a.blocks):
            for label in labels[b % len(labels):] + labels[:b % len(labels)]:
                t = time.perf_counter()
                r = run_path(dict(path=label, model=model, prompts=a.prompts, group=a.group,
                                  new_tokens=a.new_tokens, steps=a.steps, seed=b, threads=a.threads))
                times[label] += r["step_s"][1:]
                tokens[label] += r["tokens"][1:]
                peaks[label].append(r["peak_mb"])
                print(f"block {b} {label}: steps {[round(s, 2) for s in r['step_s']]} s, peak {r['peak_mb']:.0f} MB "
                      f"({time.perf_counter() - t:.0f} s with start-up)", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"parameters": n_params, "settings": {k: v for k, v in vars(a).items() if k not in ("child", "out")},
              "lora": LORA,
              "seconds_per_step": {k: {"median": med[k], "min": min(v), "max": max(v), "n": len(v)}
                                   for k, v in times.items()},
              "completion_tokens_per_step": {k: statistics.median(v) for k, v in tokens.items() if v},
              "peak_rss_mb": {k: max(v) for k, v in peaks.items()},
              "trl_over_outrider": {k: med[f"trl{k}"] / med[f"outrider{k}"] for k in ("", "_lora", "_gc", "_lora_gc")
                                    if f"trl{k}" in med and f"outrider{k}" in med}}
    for k in labels:
        print(f"{k:20s} {med[k]:8.2f} s/step  peak {result['peak_rss_mb'][k]:7.0f} MB  "
              f"tokens/step {result['completion_tokens_per_step'].get(k, 0):.0f}")
    print("TRL / outrider step time:", {k or "full": round(v, 2) for k, v in result["trl_over_outrider"].items()})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
