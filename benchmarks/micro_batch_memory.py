"""Peak memory and time of one update (the preparing no-grad forward and the learner step) on long sequences,
with and without `update.max_tokens_per_micro_batch`.

A random Llama-architecture model (`outrider.policy.random_model`) and a fixed batch of G groups × N rows whose
responses are random tokens of 50–100% of ``--response`` tokens (the same batch in every run: seeded), PPO
surrogate, token-mean, every row trained. Each (mode, round) runs alone in a fresh process, modes alternating
A B A B; each run does one untimed update and then ``--steps`` timed ones (wall and CPU seconds: on a shared
machine the CPU time is the steadier measure of the work). Memory is the process's peak RSS
(VmHWM) and its rise over the RSS before the first update (model, optimiser-free weights and batch loaded).
Sampling is not measured: the budget does not touch it.

    python benchmarks/micro_batch_memory.py --tiny                        # every mode runs (seconds)
    python benchmarks/micro_batch_memory.py --rounds 3 --steps 2          # the measurement

Writes benchmarks/results/micro_batch_memory.json (or the --out path).
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
RESULTS = HERE / "results" / "micro_batch_memory.json"


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child(spec: dict) -> None:
    import torch

    from outrider.data import Episode, Turn, pack
    from outrider.policy.model import Policy
    from outrider.update import ENTROPY, LOSSES
    from outrider.update.learner import UpdateConfig, learner_step, prepare
    from outrider.update.terms import build_terms

    torch.set_num_threads(spec["threads"])
    policy = Policy.load(spec["model"], chat_template=False)
    gen = torch.Generator().manual_seed(spec["seed"])
    vocab = len(policy.tokenizer)
    eps = []
    for g in range(spec["groups"]):
        prompt = torch.randint(10, vocab, (spec["prompt"],), generator=gen).tolist()
        for _ in range(spec["rows"]):
            n = int(torch.randint(spec["response"] // 2, spec["response"] + 1, (1,), generator=gen))
            ep = Episode(group_id=g, seed=g)
            ep.turns.append(Turn(observation="", observation_ids=prompt, action="",
                                 action_ids=torch.randint(10, vocab, (n,), generator=gen).tolist()))
            eps.append(ep)
    batch = pack(eps, policy.pad_id, policy.bos_id)
    adv = torch.randn(batch.size, generator=gen)
    batch.advantages = adv[:, None] * batch.action_mask
    cfg = UpdateConfig(lr=1e-5, skip_zero_advantage=False, max_tokens_per_micro_batch=spec["budget"])
    terms = build_terms(cfg, LOSSES.create({"name": "ppo"}), ENTROPY.create({"name": "none"}), values=False,
                        reference=False, extra=[])
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    before = _rss("VmRSS")
    times, cpu, metrics = [], [], {}
    for i in range(spec["steps"] + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        prepare(batch, policy, None, cfg, 1.0, need_old=True, need_values=False)
        metrics = learner_step(policy, opt, batch, terms, cfg, 1.0, torch.Generator().manual_seed(i),
                               norm_length=spec["response"])
        if i:  # the first update allocates the optimiser's moments and warms the allocator
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    print(json.dumps({"step_s": times, "cpu_s": cpu, "peak_mb": _rss("VmHWM") / 2**20, "before_mb": before / 2**20,
                      "micro_batches": metrics.get("update/micro_batches", 1.0),
                      "tokens": int(batch.attention_mask.sum()), "padded": batch.input_ids.numel(),
                      "params": policy.num_parameters()}))


def run(spec: dict) -> dict:
    """One (mode, round) in a fresh process (its stderr passes through): its result line."""
    lines = subprocess.check_output([sys.executable, __file__, "--child", json.dumps(spec)], text=True)
    return json.loads(lines.strip().splitlines()[-1])


def summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    # model shape; batch (groups × rows, prompt, longest response: each is 50-100% of it); mode B's budget; runs
    for name, default in (("hidden", 256), ("layers", 4), ("heads", 4), ("vocab", 2048), ("groups", 2), ("rows", 4),
                          ("prompt", 32), ("response", 1024), ("budget", 2112), ("rounds", 3), ("steps", 2),
                          ("threads", 2), ("seed", 0)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--tiny", action="store_true", help="a small model and short responses: a smoke check")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        _child(json.loads(a.child))
        return
    if a.tiny:
        a.hidden, a.layers, a.heads, a.vocab, a.response, a.budget, a.rounds, a.steps = 32, 1, 2, 256, 64, 200, 1, 1
    from outrider.policy.random_model import write_model_dir

    modes = {"A_unsplit": None, "B_budget": a.budget}
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        model = str(write_model_dir(Path(tmp) / "model", "llama", a.hidden, a.layers, a.heads, None, a.vocab,
                                    a.prompt + a.response + 8, a.seed))
        for r in range(a.rounds):
            for mode, budget in modes.items():  # A B A B: the same order every round, interleaved
                spec = {"mode": mode, "model": model, "budget": budget, "threads": a.threads, "seed": a.seed,
                        "groups": a.groups, "rows": a.rows, "prompt": a.prompt, "response": a.response,
                        "steps": a.steps}
                res = run(spec)
                runs[mode].append(res)
                print(f"round {r} {mode}: {res['step_s']} s (CPU {res['cpu_s']} s), peak {res['peak_mb']:.0f} MB "
                      f"(+{res['peak_mb'] - res['before_mb']:.0f}), micro-batches {res['micro_batches']}", flush=True)
    result = {"settings": {k: v for k, v in vars(a).items() if k not in ("child", "out")},
              "params": runs["A_unsplit"][0]["params"], "tokens": runs["A_unsplit"][0]["tokens"],
              "padded": runs["A_unsplit"][0]["padded"], "modes": {}}
    for mode, rs in runs.items():
        result["modes"][mode] = {
            "budget": modes[mode], "micro_batches": rs[0]["micro_batches"],
            "step_s": summary([t for x in rs for t in x["step_s"]]),
            "cpu_s": summary([t for x in rs for t in x["cpu_s"]]),
            "peak_mb": summary([x["peak_mb"] for x in rs]),
            "rise_mb": summary([x["peak_mb"] - x["before_mb"] for x in rs]), "runs": rs}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({m: {k: v for k, v in r.items() if k != "runs"} for m, r in result["modes"].items()}, indent=1))


if __name__ == "__main__":
    main()
