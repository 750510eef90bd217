"""Does a warm start read ReGFT's partial references? (docs/exploration.md, "ReGFT"). The policy samples K answers
to each of `--prompts` train prompts at the recipe's loop temperature; the prompts with none right are resampled K
times with the first ⌈f·L⌉ characters of their worked solution as a hint before the prompt, for each f of
`--fractions` (0: no hint, a plain second draw). Prints the hinted samples' success rate and the share of the
all-fail prompts solved.

    python benchmarks/regft_hint_probe.py runs/sft_hint5_stepsum --recipe recipes/regft_stepsum.yaml
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from outrider.api import load_recipe
from outrider.data import Start
from outrider.explore.rollout import rollout
from outrider.policy.model import Policy
from outrider.policy.sft import partial_hint
from outrider.trainer import build_task, sampling_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--recipe", type=Path, default=Path("recipes/regft_stepsum.yaml"))
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.75, 1.0])
    args = ap.parse_args()
    torch.set_num_threads(1)
    rec = load_recipe(args.recipe)
    task, policy = build_task(rec), Policy.load(args.model)
    params = replace(sampling_params(rec), temperature=rec.loop["temperatures"][0])
    seeds, k = list(range(5000, 5000 + args.prompts)), args.samples

    def hits(starts: list[Start], seed: int) -> np.ndarray:
        eps = rollout(policy, lambda: task.make_env("train"), starts, params, torch.Generator().manual_seed(seed),
                      task.max_turns)
        return np.array([e.success for e in eps], float).reshape(-1, k)

    first = hits([Start(s, i) for i, s in enumerate(seeds) for _ in range(k)], 0)
    failed = [s for s, h in zip(seeds, first) if h.sum() == 0]
    print(f"pass@1 {first.mean():.3f} at T = {params.temperature}; all-fail prompts {len(failed)} / {len(seeds)}")
    demos = task.demonstrations(failed)
    for f in args.fractions:
        starts = [Start(s, i, context=f"Hint: {partial_hint(d.turns[0][1], f)}\n" if f else None,
                        context_at="before_observation", origin="guided")
                  for i, (s, d) in enumerate(zip(failed, demos)) for _ in range(k)]
        h = hits(starts, 1)
        print(f"hint {f:.2f}: hinted success {h.mean():.3f}, all-fail prompts solved {(h.max(1) > 0).mean():.3f}")


if __name__ == "__main__":
    main()
