"""Where an outrider GRPO step's time goes, at the RL-step settings of `throughput.py` (the warm-started tiny model
of `rl_task.py`, 16 prompts × 8 completions, up to 16 new tokens): the sampling / training split from the step's
own timers, then the torch profiler's self time grouped by kind of op. Prints a table; writes benchmarks/results/profile_step.json.

    .venv/bin/python benchmarks/profile_step.py [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import outrider_trainer  # noqa: E402
from rl_task import warm_started_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "profile_step.json"
KINDS = {  # aten op name fragments -> kind; first match wins
    "matmul (mm, addmm, bmm, oneDNN linear)": ("aten::mm", "aten::addmm", "aten::bmm", "_linear_pointwise"),
    "oneDNN weight packing": ("_reorder_linear_weight",),
    "attention kernels": ("scaled_dot_product", "flash_attention"),
    "optimizer": ("adamw", "_foreach", "lerp", "addcdiv"),
    "elementwise and reductions": ("aten::mul", "aten::add", "aten::div", "aten::sub", "aten::silu", "aten::neg",
                                   "aten::pow", "aten::rsqrt", "aten::exp", "aten::log", "aten::sum", "aten::mean",
                                   "softmax", "aten::where", "aten::masked", "aten::cumsum", "aten::searchsorted",
                                   "rms_norm", "aten::sqrt", "aten::addcmul", "aten::gather", "backward"),
    "copies, indexing, allocation": ("copy", "cat", "index", "fill", "empty", "zero", "clone", "contiguous",
                                     "embedding", "scatter", "_to_copy"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        prompts, answers = warm_started_model(Path(tmp) / "model")
        trainer = outrider_trainer(str(Path(tmp) / "model"), prompts, answers, 8, 16, 2 + args.steps, 1e-4, 0,
                                   Path(tmp))
        for step in (1, 2):  # warm-up
            trainer.step(step)
        split = defaultdict(list)
        with profile() as prof:
            for step in range(3, 3 + args.steps):
                m = trainer.step(step)
                for key in ("time/step_s", "time/sample_s", "time/train_s"):
                    split[key].append(m[key])
    by_kind: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        name = evt.key.lower()
        kind = next((k for k, frags in KINDS.items() if any(f.lower() in name for f in frags)), "other")
        by_kind[kind] += evt.self_cpu_time_total / 1e6
    total = sum(by_kind.values())
    step = statistics.median(split["time/step_s"])
    out = {
        "step_s": step, "sample_s": statistics.median(split["time/sample_s"]),
        "train_s": statistics.median(split["time/train_s"]),
        "self_cpu_share_by_kind": {k: v / total for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
    }
    print(f"step {step:.3f} s: sampling {out['sample_s']:.3f} s ({out['sample_s'] / step:.0%}), "
          f"training {out['train_s']:.3f} s ({out['train_s'] / step:.0%})")
    print("| kind of op | share of profiled CPU time |\n|---|---|")
    for k, v in out["self_cpu_share_by_kind"].items():
        print(f"| {k} | {v:.0%} |")
    RESULTS.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
