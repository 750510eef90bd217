"""Where a trained OPPO [38] policy loses: act on held-out episodes with z* and with the mean encoder embedding of
each data source's trajectories (expert, noisy, random: an oracle diagnostic, the method never reads `source`).

    python benchmarks/oppo_context_probe.py RUN_DIR [RUN_DIR ...]

RUN_DIR is an `outrider offline train` run of method oppo (MiniGrid or text); prints one table row per run and
context: the held-out metrics and the distance from z* to that context.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from outrider.offline.config import OfflineConfig
from outrider.offline.run import _checkpoints, get_dataset, setup


def probe(run_dir: Path) -> list[str]:
    cfg = OfflineConfig.model_validate(json.loads((run_dir / "config.json").read_text()))
    ds = get_dataset(cfg)
    tensors, learner, evaluate_now = setup(cfg, ds)
    learner.load_state_dict(torch.load(_checkpoints(run_dir)[-1], weights_only=False)["learner"])
    with torch.no_grad():
        z = learner.encoder(*tensors)
    z_star = learner.context()
    contexts = {"z*": z_star}
    for source in ("expert", "noisy", "random"):
        idx = [i for i, t in enumerate(ds.trajectories) if t.source == source]
        if idx:
            contexts[f"mean E({source})"] = z[idx].mean(0)
    rows = []
    for name, ctx in contexts.items():
        learner.context = lambda ctx=ctx: ctx  # the probe's context instead of z*
        m = evaluate_now(learner)
        cols = " | ".join(f"{m[k]:.3f}" for k in sorted(m))
        rows.append(f"| {run_dir} | {name} | {cols} | {(ctx - z_star).norm():.2f} |")
    head = f"| run | context | {' | '.join(sorted(m))} | ‖z − z*‖ |\n|---|---|{'---|' * len(m)}---|"
    return [head, *rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args()
    for k, run_dir in enumerate(args.runs):
        rows = probe(run_dir)
        print("\n".join(rows if k == 0 else rows[1:]), flush=True)


if __name__ == "__main__":
    main()
