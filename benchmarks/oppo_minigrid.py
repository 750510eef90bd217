"""OPPO [38] vs Bradley–Terry reward + filtered BC vs plain BC on generated DoorKey datasets, label noise 0 and 0.2.

Per seed one dataset (trajectories and pairs drawn from the seed); the noisy variant flips the same pairs' labels,
so the two noise levels share trajectories and pairs. BC ignores the labels, so it runs once per seed. Every run
is `outrider offline train`'s loop (outrider.offline.run.run) in this process, one at a time.

    python benchmarks/oppo_minigrid.py --out runs/oppo --seeds 3 [--set KEY=VALUE ...]

Writes OUT/results.json (per run summaries), OUT/summary.md (means and 95% bootstrap intervals over seeds) and
OUT/oppo_minigrid.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from outrider.observe.report import bootstrap_stats
from outrider.offline.run import get_dataset, load_config, run
from outrider.offline.trajectories import save_dataset

RECIPE = Path(__file__).resolve().parents[1] / "outrider/recipes/offline/oppo_doorkey6.yaml"
# name -> (method, overrides): oppo_free_z is the paper's unconstrained z* (with the recipe's other constants)
VARIANTS = {"bc": ("bc", []), "bt_filtered_bc": ("bt_filtered_bc", []), "oppo": ("oppo", []),
            "oppo_free_z": ("oppo", ["z_max_norm=null"])}
NOISES = (0.0, 0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/oppo"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="override for every run")
    ap.add_argument("--methods", default="bc,bt_filtered_bc,oppo", help=f"comma-separated, of {list(VARIANTS)}")
    args = ap.parse_args()
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for seed in range(args.seeds):
        for noise in NOISES:
            data = args.out / f"data/seed{seed}_noise{noise}"
            base = [*args.sets, f"seed={seed}", f"data.label_noise={noise}"]
            if not (data / "pairs.jsonl").is_file():
                save_dataset(get_dataset(load_config(str(RECIPE), base)), data)
            for name in args.methods.split(","):
                key = f"{name}/noise{noise}/seed{seed}"
                if key in results or (name == "bc" and noise != NOISES[0]):
                    continue
                method, extra = VARIANTS[name]
                cfg = load_config(str(RECIPE), [*base, f"method={method}", f"data.path={data}", "eval_every=0",
                                                *extra])
                t0 = time.time()
                summary = run(cfg, args.out / key, resume=True)
                summary["wall_s"] = time.time() - t0
                results[key] = summary
                results_path.write_text(json.dumps(results, indent=1) + "\n")
                print(key, {k: round(v, 3) for k, v in summary.items() if k.startswith("eval/")}, flush=True)
    table(results, args.out)


def table(results: dict, out: Path) -> None:
    rows, stats = [], {}
    for noise in NOISES:
        for method in VARIANTS:
            src = NOISES[0] if method == "bc" else noise  # BC does not read the labels
            runs = [v for k, v in results.items() if k.startswith(f"{method}/noise{src}/")]
            if not runs:
                continue
            vals = np.array([[r["eval/success"], r["eval/return"], r["train_s_per_step"] * 1000] for r in runs])
            lo, hi = bootstrap_stats(vals)
            mean = vals.mean(0)
            stats[(method, noise)] = (mean, lo, hi)
            per_seed = ", ".join(f"{v:.2f}" for v in vals[:, 0])
            rows.append(f"| {noise:.1f} | {method} | {mean[0]:.3f} [{lo[0]:.3f}, {hi[0]:.3f}] | {mean[1]:.3f} "
                        f"[{lo[1]:.3f}, {hi[1]:.3f}] | {per_seed} | {mean[2]:.1f} |")
    head = ("| label noise | method | success (held-out) | return | success per seed | train ms/step |\n"
            "|---|---|---|---|---|---|")
    (out / "summary.md").write_text(head + "\n" + "\n".join(rows) + "\n")
    print(head + "\n" + "\n".join(rows))
    plot(stats, out / "oppo_minigrid.png")


def plot(stats: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [m for m in VARIANTS if any(k[0] == m for k in stats)]
    width = 0.8 / len(names)
    for k, method in enumerate(names):
        xs, ys, err = [], [], [[], []]
        for i, noise in enumerate(NOISES):
            if (method, noise) in stats:
                mean, lo, hi = stats[(method, noise)]
                xs.append(i + (k - (len(names) - 1) / 2) * width)
                ys.append(mean[0])
                err[0].append(mean[0] - lo[0])
                err[1].append(hi[0] - mean[0])
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=method)
    ax.set_xticks(range(len(NOISES)), [f"label noise {n:.0%}" for n in NOISES])
    ax.set_ylabel("success on held-out layouts")
    ax.set_title("DoorKey-6x6 offline preferences (3 seeds, 95% CI)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
