"""Throughput: outrider's sampler vs HF `model.generate`, and outrider's GRPO step vs TRL's GRPOTrainer.

Same model, batch, prompt and output lengths; the compared paths are interleaved (A B A B ...) and repeated, and
every figure is a median with min and max. Writes benchmarks/results/throughput.json.

    make bench            # or: .venv/bin/python benchmarks/throughput.py [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

# a fresh compile cache, so the first compiled call's time is the cold compile a new machine pays
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="outrider_bench_inductor_"))

import torch  # noqa: E402

from outrider.policy.model import Policy  # noqa: E402
from outrider.policy.sampler import SamplingParams, sample  # noqa: E402

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


def run_outrider(policy: Policy, prompts: list[list[int]], new_tokens: int, compile: bool = False) -> tuple[float, int]:
    params = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, ignore_eos=True, compile=compile)
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


def matmul_ceiling(policy: Policy, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Tokens/s of a sampler that did nothing but the matmuls of the benchmark's work: the prefill of `batch`
    prompts of `prompt_len` + 1 tokens, then `new_tokens` - 1 single-token steps (fused q/k/v, o, gate/up and
    down per layer, and the LM head; weights hot in cache), with the sampler's own matmul kernel (oneDNN on
    packed weights where available, else `F.linear`). No fp32 sampler using that kernel can beat it."""
    from outrider.policy.fast_decode import FastDecoder

    decoder = FastDecoder(policy.model, batch, 8)
    weights = [w for layer in decoder.layers for w in (layer[1], layer[3], layer[6], layer[7])] + [decoder.lm_head]

    def matmuls(rows: int) -> float:
        inputs = [torch.randn(rows, w.shape[1]) for w in weights]
        t = time.perf_counter()
        for x, w in zip(inputs, weights):
            decoder.linear(x, w)
        return time.perf_counter() - t

    with torch.no_grad():
        matmuls(batch)
        seconds = matmuls(batch * (prompt_len + 1)) + sum(matmuls(batch) for _ in range(new_tokens - 1))
    return batch * new_tokens / seconds


def run_compiled(policy: Policy, prompts: list[list[int]], new_tokens: int) -> tuple[float, int]:
    return run_outrider(policy, prompts, new_tokens, compile=True)


SAMPLER_PATHS = {"outrider": run_outrider, "outrider_compiled": run_compiled, "generate": run_generate}


def bench_sampler(reps: int, batch: int, prompt_len: int, new_tokens: int, peak: float) -> dict:
    results = {}
    for name, shape in MODELS.items():
        policy = Policy.tiny(**shape).eval()
        n_params = policy.num_parameters()
        prompts = prompts_for(policy, batch, prompt_len)
        t = time.perf_counter()
        run_compiled(policy, prompts, new_tokens)  # its first call compiles: timed, then kept out of the figures
        compile_s = time.perf_counter() - t
        for fn in SAMPLER_PATHS.values():  # warm-up
            fn(policy, prompts, new_tokens)
        tok_s: dict[str, list[float]] = {k: [] for k in SAMPLER_PATHS}
        ceilings = []
        paths = list(SAMPLER_PATHS.items())
        for rep in range(reps):
            # each repetition starts the round one path later, so that no path always runs after the same one
            # (a path inherits its predecessor's cache and allocator state)
            for label, fn in paths[rep % len(paths):] + paths[:rep % len(paths)]:
                secs, toks = fn(policy, prompts, new_tokens)
                tok_s[label].append(toks / secs)
            ceilings.append(matmul_ceiling(policy, batch, prompt_len, new_tokens))
        ceiling = statistics.median(ceilings)
        ratio = [a / b for a, b in zip(tok_s["outrider"], tok_s["generate"])]
        compiled_ratio = [a / b for a, b in zip(tok_s["outrider_compiled"], tok_s["generate"])]
        results[name] = {
            "parameters": n_params,
            "tokens_per_s": {k: stats(v) for k, v in tok_s.items()},
            "ratio": stats(ratio),
            "compiled_ratio": stats(compiled_ratio),
            "first_compiled_call_s": compile_s,
            # the fp32 bound: the matmuls alone (prefill included), against generate's median
            "matmul_only_tokens_per_s": ceiling,
            "matmul_only_vs_generate": ceiling / statistics.median(tok_s["generate"]),
            "model_flops_fraction": {k: 2 * n_params * statistics.median(v) / peak for k, v in tok_s.items()},
            "peak_rss_mb": {k: probe_memory("sampler", k, name) for k in SAMPLER_PATHS},
        }
        print(f"sampler {name} ({n_params/1e6:.2f}M): outrider {statistics.median(tok_s['outrider']):,.0f} tok/s, "
              f"compiled {statistics.median(tok_s['outrider_compiled']):,.0f}, "
              f"generate {statistics.median(tok_s['generate']):,.0f} tok/s, ratio {statistics.median(ratio):.2f} "
              f"[{min(ratio):.2f}, {max(ratio):.2f}], compiled {statistics.median(compiled_ratio):.2f} "
              f"[{min(compiled_ratio):.2f}, {max(compiled_ratio):.2f}] (first compiled call {compile_s:.1f} s); "
              f"matmuls alone {ceiling:,.0f} tok/s = {ceiling / statistics.median(tok_s['generate']):.2f}x generate",
              flush=True)
    return results


def probe_memory(kind: str, path: str, model: str = "tiny-0.5M") -> dict[str, float]:
    """Peak RSS of one path, run alone in a fresh process: its peak and its peak above the process's size after
    imports and setup (the import footprints of TRL and outrider differ, so both are reported)."""
    import subprocess

    out = subprocess.run([sys.executable, __file__, "--probe", kind, path, model], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _high_water_rss() -> int:
    """This process's peak RSS in bytes. VmHWM, not ru_maxrss: a forked child inherits its parent's ru_maxrss
    (exec does not reset it), which would report the benchmark process's peak for every probe."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: best effort


def _probe(kind: str, path: str, model: str) -> None:
    import psutil

    torch.set_num_threads(2)
    if kind == "sampler":
        policy = Policy.tiny(**MODELS[model]).eval()
        prompts = prompts_for(policy, 64, 16)
        baseline = psutil.Process().memory_info().rss
        for _ in range(2):
            SAMPLER_PATHS[path](policy, prompts, 32)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from rl_task import trl_prompts, warm_started_model
        from trl_grpo import trl_grpo_step_times

        if path == "trl":
            import trl  # noqa: F401  (its import is setup, not the path's work)
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = str(Path(tmp) / "model")
            prompts, answers = warm_started_model(model_dir)
            if path == "trl":
                prompts = trl_prompts(model_dir, prompts)
            baseline = psutil.Process().memory_info().rss
            args = (model_dir, prompts, answers, 8, 16, 3, 1e-4, 0)
            if path == "trl":
                trl_grpo_step_times(*args)
            else:
                outrider_step_times(*args, work=Path(tmp))
    peak = _high_water_rss()
    print(json.dumps({"peak_mb": peak / 2**20, "above_baseline_mb": (peak - baseline) / 2**20}))


def outrider_trainer(model_dir: str, prompts: list[str], answers: list[str], group_size: int, max_new_tokens: int,
                     steps: int, lr: float, seed: int, work: Path, prompts_per_step: int = 16,
                     policy: dict | None = None, **update: object):
    """An outrider GRPO trainer with the settings `trl_grpo_step_times` uses (token-mean, beta 0, one update)."""
    from outrider.recipe import parse_recipe
    from outrider.trainer import Trainer

    data, held_out = work / "train.jsonl", work / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in zip(prompts, answers)))
    # the benchmark never evaluates; a separate eval file keeps every prompt in the train split, as TRL trains on
    # all of them (without it a hash would hold out a tenth)
    held_out.write_text(json.dumps({"prompt": "(no evaluation) ->", "answer": ""}) + "\n")
    recipe = parse_recipe({
        "task": {"name": "jsonl", "path": str(data), "eval_path": str(held_out)},
        "policy": {"model": model_dir, **(policy or {})},
        "explore": {"name": "group", "prompts_per_step": prompts_per_step, "group_size": group_size, "temperature": 1.0,
                    "max_new_tokens": max_new_tokens},
        "score": [{"name": "exact_match"}],
        "credit": {"name": "grpo"},
        "update": {"loss": "ppo", "aggregation": "token-mean", "lr": lr, "grad_clip": 1.0, **update},
        "train": {"seed": seed, "steps": steps},
    })
    return Trainer(recipe, work / "run", quiet=True)


def outrider_step_times(model_dir: str, prompts: list[str], answers: list[str], group_size: int,
                        max_new_tokens: int, steps: int, lr: float, seed: int, work: Path, prompts_per_step: int = 16,
                        policy: dict | None = None, **update: object) -> dict:
    """Wall-clock seconds, completion tokens and the share of rows left out of training, for each of `steps`
    outrider GRPO steps."""
    trainer = outrider_trainer(model_dir, prompts, answers, group_size, max_new_tokens, steps, lr, seed, work,
                               prompts_per_step, policy, **update)
    step_s, tokens, skipped, zero_std = [], [], [], []
    for step in range(1, steps + 1):
        t = time.perf_counter()
        m = trainer.step(step)
        step_s.append(time.perf_counter() - t)
        tokens.append(round(m["episode/response_length"] * prompts_per_step * group_size))
        skipped.append(m.get("update/skipped_rows_frac", 0.0))
        zero_std.append(m["episode/zero_variance_group_frac"])
    return {"step_s": step_s, "completion_tokens_per_step": tokens, "skipped_rows_frac": skipped,
            "zero_std_group_frac": zero_std}


def step_flops(n_params: int, rows: int, groups: int, prompt_tokens: float, completion_tokens: float,
               trained_share: float = 1.0) -> dict:
    """Model FLOPs of one GRPO step: 2N per sampled token (prompt prefill included) and 6N per trained token.

    ``nominal``: every row's prompt computed and every row trained, as TRL does. ``outrider``: each group's prompt
    computed once (shared prefill and shared-prefix training forward) and only `trained_share` of the rows trained
    (`update.skip_zero_advantage`; the prompt forward is counted in full, an upper bound)."""
    per_row = prompt_tokens + completion_tokens
    nominal = 8 * n_params * rows * per_row
    outrider = 2 * n_params * (groups * prompt_tokens + rows * completion_tokens) \
        + 6 * n_params * (groups * prompt_tokens + trained_share * rows * completion_tokens)
    return {"nominal": nominal, "outrider": outrider}


PATHS = {"trl": {}, "outrider": {}, "outrider_no_skip": {"skip_zero_advantage": False}}


def bench_rl_step(blocks: int, steps: int, new_tokens: int, peak: float) -> dict:
    """Alternate blocks of TRL, outrider and outrider without `skip_zero_advantage` on the same warm-started tiny
    model (`rl_task.py`), the order rotating from block to block; each block trains a fresh copy for `steps`
    steps and its first step is dropped."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from rl_task import trl_prompts, warm_started_model
    from trl_grpo import trl_grpo_step_times

    times: dict[str, list[float]] = {k: [] for k in PATHS}
    toks: dict[str, list[int]] = {k: [] for k in PATHS}
    zero_std: dict[str, list[float]] = {k: [] for k in PATHS}
    skipped: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(Path(tmp) / "model")
        prompts, answers = warm_started_model(model_dir)
        labels = list(PATHS)
        for b in range(blocks):
            for label in labels[b % len(labels):] + labels[:b % len(labels)]:  # each path first in turn
                update = PATHS[label]
                if label == "trl":
                    r = trl_grpo_step_times(model_dir, trl_prompts(model_dir, prompts), answers, 8, new_tokens,
                                            steps, 1e-4, b)
                    version = r["trl_version"]
                else:
                    work = Path(tmp) / f"{label}{b}"
                    work.mkdir()
                    r = outrider_step_times(model_dir, prompts, answers, 8, new_tokens, steps, 1e-4, b, work=work,
                                            **update)
                    if label == "outrider":
                        skipped += r["skipped_rows_frac"][1:]
                times[label] += r["step_s"][1:]
                toks[label] += r["completion_tokens_per_step"][1:]
                zero_std[label] += r["zero_std_group_frac"][1:]
    med = {k: statistics.median(v) for k, v in times.items()}
    n_params = Policy.tiny().num_parameters()
    prompt_tokens = statistics.mean(len(Policy.tiny().encode(p)) + 1 for p in prompts)  # + BOS
    rows, groups = 16 * 8, 16
    per_row = {k: statistics.median(toks[k]) / rows for k in times}
    flops = {"trl": step_flops(n_params, rows, groups, prompt_tokens, per_row["trl"])["nominal"],
             "outrider": step_flops(n_params, rows, groups, prompt_tokens, per_row["outrider"],
                                    1 - statistics.mean(skipped))["outrider"],
             "outrider_no_skip": step_flops(n_params, rows, groups, prompt_tokens, per_row["outrider_no_skip"])[
                 "outrider"]}
    roofline = {
        "prompt_tokens_per_row": prompt_tokens,
        "flops_per_step": flops,
        "achieved_fraction_of_peak": {k: flops[k] / (med[k] * peak) for k in times},
        # what outrider would have to sustain, as a share of the matmul peak, to run in a third of TRL's time
        "fraction_of_peak_needed_for_3x": {k: 3 * flops[k] / (med["trl"] * peak) for k in ("outrider",
                                                                                           "outrider_no_skip")},
    }
    ratio = med["trl"] / med["outrider"]
    ratio_no_skip = med["trl"] / med["outrider_no_skip"]
    print(f"RL step: outrider {med['outrider']:.3f} s ({statistics.mean(skipped):.0%} of rows skipped), without "
          f"the skip {med['outrider_no_skip']:.3f} s, TRL {med['trl']:.3f} s; ratio {ratio:.2f} "
          f"({ratio_no_skip:.2f} without the skip); tokens/step {statistics.median(toks['outrider'])} vs "
          f"{statistics.median(toks['trl'])}; groups with equal rewards "
          f"{statistics.mean(zero_std['outrider']):.0%} vs {statistics.mean(zero_std['trl']):.0%} (TRL)")
    return {"task": "spell_backward, tiny model warm-started as in the quickstart (benchmarks/rl_task.py)",
            "seconds_per_step": {k: stats(v) for k, v in times.items()},
            "completion_tokens_per_step": {k: stats([float(x) for x in v]) for k, v in toks.items()},
            "tokens_per_s": {k: statistics.median(toks[k]) / med[k] for k in times},
            "equal_reward_group_frac": {k: statistics.mean(v) for k, v in zero_std.items()},
            "skipped_rows_frac": stats(skipped),
            "trl_version": version, "ratio_median_of_medians": ratio, "ratio_without_skip": ratio_no_skip,
            "roofline": roofline,
            "peak_rss_mb": {k: probe_memory("rl", k) for k in ("outrider", "trl")}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--probe", nargs=3, metavar=("KIND", "PATH", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        return _probe(*args.probe)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    peak = matmul_flops()
    print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s ({args.threads} threads)")
    sampler = bench_sampler(args.reps, args.batch, args.prompt_len, args.new_tokens, peak)
    rl_step = bench_rl_step(blocks=6, steps=max(args.reps, 7) + 1, new_tokens=16, peak=peak)
    settings = {k: v for k, v in vars(args).items() if k != "probe"}
    out = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {args.threads} torch threads",
        "torch": torch.__version__,
        "settings": settings,
        "matmul_flops": peak,
        "sampler": sampler,
        "sampler_vs_generate": {k: v["ratio"]["median"] for k, v in sampler.items()},
        "rl_step": rl_step,
        "step_vs_trl": rl_step["ratio_median_of_medians"],
        "sampler_compiled_vs_generate": {k: v["compiled_ratio"]["median"] for k, v in sampler.items()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
