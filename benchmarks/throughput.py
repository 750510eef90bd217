"""Throughput: outrider's sampler vs HF `model.generate`, and outrider's GRPO step vs TRL's GRPOTrainer.

Same model, batch, prompt and output lengths; the compared paths are interleaved (A B A B ...) and repeated, and
every figure is a median with min and max. Writes benchmarks/results/throughput.json.

    make bench            # or: .venv/bin/python benchmarks/throughput.py [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from outrider.policy.model import Policy
from outrider.policy.sampler import SamplingParams, sample

RESULTS = Path(__file__).resolve().parent / "results" / "throughput.json"
MODELS = {"tiny-0.5M": dict(hidden=128, layers=2, heads=4), "small-3M": dict(hidden=256, layers=4, heads=4)}


def stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def matmul_flops(n: int = 512, reps: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def prompts_for(policy: Policy, batch: int, prompt_len: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    letters = policy.encode("abcdefghijklmnopqrstuvwxyz")
    return [[policy.bos_id] + [letters[int(i)] for i in torch.randint(0, 26, (prompt_len,), generator=g)]
            for _ in range(batch)]


def run_outrider(policy: Policy, prompts: list[list[int]], new_tokens: int) -> tuple[float, int]:
    params = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, ignore_eos=True)
    t = time.perf_counter()
    out = sample(policy, prompts, params, torch.Generator().manual_seed(1))
    return time.perf_counter() - t, sum(len(s.ids) for s in out)


@torch.no_grad()
def run_generate(policy: Policy, prompts: list[list[int]], new_tokens: int) -> tuple[float, int]:
    ids = torch.tensor(prompts)  # equal lengths: no padding needed
    t = time.perf_counter()
    out = policy.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                top_k=0, top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                pad_token_id=policy.pad_id, eos_token_id=policy.eos_id)
    return time.perf_counter() - t, int((out.shape[1] - ids.shape[1]) * ids.shape[0])


def bench_sampler(reps: int, batch: int, prompt_len: int, new_tokens: int, peak: float) -> dict:
    results = {}
    for name, shape in MODELS.items():
        policy = Policy.tiny(**shape).eval()
        n_params = policy.num_parameters()
        prompts = prompts_for(policy, batch, prompt_len)
        for fn in (run_outrider, run_generate):  # warm-up
            fn(policy, prompts, new_tokens)
        tok_s: dict[str, list[float]] = {"outrider": [], "generate": []}
        for _ in range(reps):
            for label, fn in (("outrider", run_outrider), ("generate", run_generate)):
                secs, toks = fn(policy, prompts, new_tokens)
                tok_s[label].append(toks / secs)
        ratio = [a / b for a, b in zip(tok_s["outrider"], tok_s["generate"])]
        results[name] = {
            "parameters": n_params,
            "tokens_per_s": {k: stats(v) for k, v in tok_s.items()},
            "ratio": stats(ratio),
            "model_flops_fraction": {k: 2 * n_params * statistics.median(v) / peak for k, v in tok_s.items()},
        }
        print(f"sampler {name} ({n_params/1e6:.2f}M): outrider {statistics.median(tok_s['outrider']):,.0f} tok/s, "
              f"generate {statistics.median(tok_s['generate']):,.0f} tok/s, ratio {statistics.median(ratio):.2f} "
              f"[{min(ratio):.2f}, {max(ratio):.2f}]", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    peak = matmul_flops()
    print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s ({args.threads} threads)")
    sampler = bench_sampler(args.reps, args.batch, args.prompt_len, args.new_tokens, peak)
    out = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {args.threads} torch threads",
        "torch": torch.__version__,
        "settings": vars(args),
        "matmul_flops": peak,
        "sampler": sampler,
        "sampler_vs_generate": {k: v["ratio"]["median"] for k, v in sampler.items()},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
