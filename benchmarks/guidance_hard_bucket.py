"""The hard-bucket experiment of docs/exploration.md ("Guidance on demand") from an `outrider compare` directory of
stepsum runs (grpo_stepsum.yaml, ampo_stepsum.yaml, always_mix_stepsum.yaml, herl_stepsum.yaml and its ablations
in benchmarks/guidance/; star_stepsum.yaml and regft_stepsum.yaml with ``--baseline star_stepsum``) kept with their
step-0 checkpoint (``--set observe.keep_checkpoints=...`` large enough).

For each seed, the hard bucket is found before training: the warm-started policy (the step-0 checkpoint, the same
for every method of a seed: checked) samples `--group` answers to each of the first `--prompts` held-out
prompts; the prompts it solves none of are the bucket. The held-out problems are checked to be disjoint from the
training split (none of them equals a training problem drawn by the run's training seeds' range). Then each
run's final policy samples `--samples` answers on the bucket and on all `--prompts`: solve rate (mean success)
and unbiased pass@k. Means over seeds with 95% bootstrap intervals, paired differences to `--baseline`, the
guidance overhead per step, a JSON summary and a figure (pass@k on the bucket; train success per step).

    python benchmarks/guidance_hard_bucket.py runs/hard_bucket --out docs/guidance
"""

from __future__ import annotations

import argparse
import json
from math import comb
from pathlib import Path

import numpy as np
import torch

from outrider.api import load_recipe
from outrider.checkpoint import list_checkpoints
from outrider.data import Start
from outrider.explore.rollout import rollout
from outrider.observe.report import stat_of
from outrider.policy.model import Policy
from outrider.trainer import build_task, sampling_params

KS = (1, 2, 4, 8, 16)
WARM = "warm_start"  # the step-0 policy's column


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def successes(checkpoint: Path, run: Path, prompts: list[int], samples: int, seed: int) -> np.ndarray:
    """[len(prompts), samples] successes of the checkpoint's policy on held-out prompts (sampling temperature),
    cached next to the checkpoint (a rerun after more runs finished reuses it)."""
    cache = checkpoint / f"hard_bucket_{len(prompts)}x{samples}_{seed}.npy"
    if cache.exists():
        return np.load(cache)
    hits = _successes(checkpoint, run, prompts, samples, seed)
    np.save(cache, hits)
    return hits


def _successes(checkpoint: Path, run: Path, prompts: list[int], samples: int, seed: int) -> np.ndarray:
    recipe = load_recipe(run / "recipe.yaml")
    task, policy = build_task(recipe), Policy.load(checkpoint)
    starts = [Start(seed=p, group_id=i) for i, p in enumerate(prompts) for _ in range(samples)]
    episodes = rollout(policy, lambda: task.make_env("eval"), starts, sampling_params(recipe),
                       torch.Generator().manual_seed(seed), task.max_turns)
    return np.array([e.success for e in episodes], dtype=float).reshape(len(prompts), samples)


def pass_at(hits: np.ndarray, k: int) -> float:
    """Unbiased pass@k (Chen et al.), mean over prompts."""
    n = hits.shape[1]
    c = hits.sum(1).astype(int)
    return float(np.mean([1.0 - comb(n - ci, k) / comb(n, k) for ci in c]))


def same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def check_disjoint(run: Path, prompts: list[int]) -> int:
    """How many held-out problems also occur among the first 20000 training problems (0 expected)."""
    task = build_task(load_recipe(run / "recipe.yaml"))
    held = {task.problem("eval", p)["question"] for p in prompts}
    return sum(task.problem("train", s)["question"] in held for s in range(20000))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--baseline", default="grpo_stepsum")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--group", type=int, default=8, help="G: samples of the warm start per prompt")
    ap.add_argument("--samples", type=int, default=16, help="samples of the final policy per prompt")
    ap.add_argument("--out", type=Path, default=Path("docs/guidance"))
    ap.add_argument("--name", default="hard_bucket")
    ap.add_argument("--bucket-from", type=Path, default=None,
                    help="fix the bucket from this model (the shared warm start) instead of each run's step 0")
    ap.add_argument("--against", action="append", default=[], help="also pair every arm with this one")
    args = ap.parse_args()
    torch.set_num_threads(1)
    groups = {d.name: sorted(r for r in d.glob("seed*") if (r / "summary.json").exists())
              for d in sorted(p for p in args.dir.iterdir() if p.is_dir())}
    groups = {k: v for k, v in groups.items() if v}
    seeds = sorted({r.name for runs in groups.values() for r in runs})
    prompts = list(range(args.prompts))
    buckets, numbers = {}, {name: [] for name in groups}
    numbers[WARM] = []
    for s in seeds:
        runs = {name: next(r for r in rs if r.name == s) for name, rs in groups.items() if any(r.name == s for r in rs)}
        if args.bucket_from is None:
            step0 = {name: list_checkpoints(r)[0] for name, r in runs.items()}
            assert all(c.name == "step_0" for c in step0.values()), step0
            first = next(iter(step0.values()))
            assert all(same_weights(first, c) for c in step0.values()), "warm starts differ between methods"
        else:  # arms that start from different checkpoints (RL after self-training): the shared warm start's bucket
            first = args.bucket_from
        base_run = next(iter(runs.values()))
        overlap = check_disjoint(base_run, prompts)
        warm = successes(first, base_run, prompts, args.group, 777)
        hard = [p for p, h in zip(prompts, warm) if h.sum() == 0]
        task = build_task(load_recipe(base_run / "recipe.yaml"))
        n_terms = {p: len(task.problem("eval", p).get("metadata", {}).get("terms", [])) for p in hard}
        by_terms = {n: [p for p in hard if n_terms[p] == n] for n in sorted(set(n_terms.values()))}
        buckets[s] = {"hard": len(hard), "overlap_with_train": overlap, "warm_pass@1": float(warm.mean()),
                      "hard_by_terms": {n: len(v) for n, v in by_terms.items()}}
        print(f"{s}: warm pass@1 {warm.mean():.3f}, hard bucket {len(hard)}/{len(prompts)}, "
              f"held-out problems among training ones: {overlap}")
        # the warm start itself, resampled as the final policies are: where the bucket starts (0 of G by selection)
        w = successes(first, base_run, prompts, args.samples, 4242)
        numbers.setdefault(WARM, []).append(
            {"hard_solve_rate": float(w[[prompts.index(p) for p in hard]].mean()), "all_pass@1": float(w.mean()),
             "all_pass@16": pass_at(w, 16), **{f"hard_pass@{k}": pass_at(w[[prompts.index(p) for p in hard]], k)
                                                for k in KS},
             **{f"hard_solve_rate_{n}terms": float(w[idx].mean()) for n, idx in by_terms.items() if idx}})
        for name, run in runs.items():
            final = list_checkpoints(run)[-1]
            hits_all = successes(final, run, prompts, args.samples, 4242)
            hits = hits_all[[prompts.index(p) for p in hard]]
            steps = [r for r in rows_of(run) if "time/step_s" in r]
            out = {"hard_solve_rate": float(hits.mean()), "hard_solved_any": float((hits.max(1) > 0).mean()),
                   "all_pass@1": float(hits_all.mean()), "all_pass@16": pass_at(hits_all, 16)}
            out.update({f"hard_pass@{k}": pass_at(hits, k) for k in KS})
            out.update({"step_s": float(np.mean([r["time/step_s"] for r in steps])),
                        "sample_s": float(np.mean([r["time/sample_s"] for r in steps])),
                        "train_s": float(np.mean([r["time/train_s"] for r in steps])),
                        "guidance_s": float(np.mean([r.get("time/guidance_s", 0.0) for r in steps])),
                        "guided_share": float(np.mean([r.get("explore/guided_share", 0.0) for r in steps])),
                        "all_fail_groups": float(np.mean([r.get("explore/all_fail_groups",
                                                                r.get("explore/herl_groups", float("nan")))
                                                          for r in steps])),
                        # HeRL's guided samples against the groups' own (tokens sampled per step)
                        "guided_tokens": float(np.mean([r.get("explore/guided_tokens", 0.0) for r in steps])),
                        "policy_tokens": float(np.mean([r["explore/sampled_tokens"] for r in steps])),
                        # the guided rows' importance weights pi_old/mu (steps with guided rows only)
                        "guided_iw_mean": mean_of(steps, "origin/guided/iw_mean"),
                        "guided_iw_max": float(max([r["origin/guided/iw_max"] for r in steps
                                                    if "origin/guided/iw_max" in r], default=float("nan"))),
                        "guided_prob_mean": mean_of(steps, "guided_shaping/prob_mean")})
            for n, idx in by_terms.items():  # the bucket's prompts by their number of terms
                out[f"hard_solve_rate_{n}terms"] = float(hits_all[idx].mean()) if idx else float("nan")
            if any("bstar/round" in r for r in steps):  # self-training rounds (STaR, ReGFT): per-round means
                out.update(rounds_numbers(steps))
            numbers[name].append(out)
    base = numbers.get(args.baseline)
    keys = list(numbers[next(iter(groups))][0])
    print("| | " + " | ".join(numbers) + " |\n|---|" + "---|" * len(numbers))
    for k in keys:
        print(f"| {k} | " + " | ".join(fmt([x.get(k, float("nan")) for x in v]) for v in numbers.values()) + " |")
    for name, v in numbers.items():
        if base is not None and name not in (args.baseline, WARM) and len(v) == len(base):
            for k in ("hard_solve_rate", "hard_pass@16", "all_pass@1", "step_s"):
                print(f"paired {name} - {args.baseline} {k}: {fmt([a[k] - b[k] for a, b in zip(v, base)])}")
    for other in args.against:
        for name, v in numbers.items():
            if name not in (other, args.baseline) and other in numbers:
                for k in ("hard_solve_rate", "hard_pass@16", "all_pass@1", "all_pass@16"):
                    print(f"paired {name} - {other} {k}: {fmt([a[k] - b[k] for a, b in zip(v, numbers[other])])}")
    if "ampo_stepsum" in numbers and "always_mix_stepsum" in numbers:
        a, m = numbers["ampo_stepsum"], numbers["always_mix_stepsum"]
        for k in ("hard_solve_rate", "hard_pass@16", "all_pass@1", "all_pass@16"):
            print(f"paired ampo - always_mix {k}: {fmt([x[k] - y[k] for x, y in zip(a, m)])}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"buckets": buckets, "runs": numbers}, indent=1))
    plot(groups, numbers, args.out / f"{args.name}.png")


def mean_of(rows: list[dict], key: str) -> float:
    """Mean of a metric over the steps that logged it (nan when none did)."""
    vals = [r[key] for r in rows if key in r]
    return float(np.mean(vals)) if vals else float("nan")


def rounds_numbers(steps: list[dict]) -> dict[str, float]:
    """Per-round means of a `bstar` run: the share of all-fail prompts (none of K right), ReGFT's hinted
    resampling (share of hinted samples right, share of all-fail prompts it solved: means over the rounds that
    had any) and the tokens sampled per round, hinted ones included."""
    hinted = [r for r in steps if r.get("regft/hinted_prompts", 0) > 0]
    return {"all_fail_share": float(np.mean([1.0 - r["bstar/pass_at_k_s/1"] for r in steps])),
            "kept_per_round": float(np.mean([r["bstar/selected"] for r in steps])),
            "hinted_success": float(np.mean([r["regft/hinted_success"] for r in hinted])) if hinted else 0.0,
            "hinted_solved": float(np.mean([r["regft/hinted_solved"] for r in hinted])) if hinted else 0.0,
            "hinted_selected": float(np.mean([r.get("regft/hinted_selected", 0.0) for r in steps])),
            "hinted_tokens": float(np.mean([r.get("regft/hinted_tokens", 0.0) for r in steps])),
            "tokens_per_round": float(np.mean([r["explore/sampled_tokens"] + r.get("regft/hinted_tokens", 0.0)
                                               for r in steps]))}


def fmt(values: list[float]) -> str:
    s = stat_of(values)
    return "-" if s is None else f"{s.mean:.3f} [{s.ci_low:.3f}, {s.ci_high:.3f}]"


def plot(groups: dict[str, list[Path]], numbers: dict[str, list[dict]], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, v in numbers.items():
        y = np.array([[x[f"hard_pass@{k}"] for k in KS] for x in v])
        axes[0].plot(KS, y.mean(0), marker="o", label=name)
        axes[0].fill_between(KS, y.min(0), y.max(0), alpha=0.2)
        if name not in groups:
            continue
        curves = [[(r["step"], r.get("origin/on_policy/accuracy", r.get("reward/verifier"))) for r in rows_of(run)
                   if "time/step_s" in r] for run in groups[name]]
        n = min(len(c) for c in curves)
        x = np.array([s for s, _ in curves[0][:n]])
        yy = np.array([[val for _, val in c[:n]] for c in curves])
        kernel = np.ones(5) / 5  # a 5-step moving mean: one step's 128 samples are noisy
        axes[1].plot(x[4:], np.convolve(yy.mean(0), kernel, "valid"), label=name)
    axes[0].set_xscale("log", base=2)
    axes[0].set_title("pass@k on the hard bucket (final policy; band: min-max over seeds)", fontsize=9)
    axes[0].set_xlabel("k")
    axes[1].set_title("on-policy train success (5-step mean over seeds)", fontsize=9)
    axes[1].set_xlabel("RL step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
