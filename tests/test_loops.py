"""Run loops other than "sample → train", as recipes: DPO-family terms on stored pairs (no rollout at all) and
rejection-sampling fine-tuning rounds, both on the quickstart's weak warm start."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from conftest import read_jsonl
from outrider.errors import OutriderError
from outrider.recipe import load_recipe, parse_recipe
from outrider.trainer import Trainer, build_task

QUICKSTART = yaml.safe_load((Path(__file__).parent.parent / "recipes" / "quickstart.yaml").read_text())
SMALL_EVAL = {"eval_every": 0, "eval_prompts": 128, "eval_samples": 8, "pass_at": [1, 8], "checkpoint_every": 0,
              "tensorboard": False}


def recipe(**sections) -> dict:
    return {**{k: QUICKSTART[k] for k in ("task", "policy", "explore")}, "observe": SMALL_EVAL,
            "train": {"steps": 40, "seed": 0, "threads": 2}, **sections}


def write_pairs(path: Path, n: int = 512) -> Path:
    """Pairs on train problems: the reference answer over an anagram of it (texts, as a user's file holds)."""
    task, rng = build_task(parse_recipe(QUICKSTART)), random.Random(0)
    with path.open("w") as f:
        for i in range(n):
            p = task.problem("train", 10**7 + i)
            wrong = p["answer"]
            while wrong == p["answer"]:
                wrong = "".join(rng.sample(p["answer"], len(p["answer"])))
            f.write(json.dumps({"prompt": task.prompt(p), "chosen": p["answer"], "rejected": wrong}) + "\n")
    return path


@pytest.mark.slow  # ~10 s: warm start, 40 offline steps, two evaluations
def test_dpo_on_stored_pairs_with_no_rollout(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    data = recipe(loop={"name": "pairs", "path": str(pairs), "pairs_per_step": 32},
                  update={"loss": "none", "terms": [{"name": "dpo", "beta": 0.1}, {"name": "nll"}], "lr": 3.0e-4})
    summary = Trainer(parse_recipe(data), tmp_path / "run", quiet=True).run()
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")[1:]
    assert all(r["throughput/sample_tok_s"] == 0 for r in rows)  # nothing was sampled
    assert rows[0]["dpo/accuracy"] == 0.0 and min(r["dpo/accuracy"] for r in rows[-5:]) > 0.9
    assert rows[-1]["dpo/margin"] > 1.0
    # measured: pass@1 0.219 -> 0.540 (seed 0); the start is the warm start's
    assert summary["eval_end"]["pass@1"] > summary["eval_start"]["pass@1"] + 0.2, summary


@pytest.mark.slow  # ~10 s
def test_rejection_sampling_fine_tuning_rounds(tmp_path):
    data = recipe(loop="rft", update={"loss": "none", "terms": [{"name": "nll", "rows": "all"}], "lr": 3.0e-4})
    summary = Trainer(parse_recipe(data), tmp_path / "run", quiet=True).run()
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")[1:]
    assert 0 < rows[0]["rft/kept_frac"] < rows[-1]["rft/kept_frac"]
    # measured: pass@1 0.219 -> 0.562 (seed 0)
    assert summary["eval_end"]["pass@1"] > summary["eval_start"]["pass@1"] + 0.2, summary


def test_pairs_loop_errors_are_one_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    base = recipe(loop={"name": "pairs", "path": str(path)}, update={"loss": "none", "terms": ["dpo"]})
    with pytest.raises(OutriderError, match="loop.path: no such file"):
        Trainer(parse_recipe(base), tmp_path / "run", quiet=True)
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 3}\n')
    with pytest.raises(OutriderError, match="pairs.jsonl:2: field 'chosen' must be a string or "):
        Trainer(parse_recipe(base), tmp_path / "run", quiet=True)
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    with pytest.raises(OutriderError, match="loop pairs: update.terms is empty"):
        Trainer(parse_recipe({**base, "update": {"loss": "none"}}), tmp_path / "run", quiet=True)
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump({**base, "loop": {"name": "offline"}}))
    with pytest.raises(OutriderError, match=r"loop: unknown loop 'offline'; valid: (\w+, )*pairs, (\w+, )*rl"):
        load_recipe(recipe_file)


def test_pairs_are_read_in_seeded_passes(tmp_path):
    """Every pair once per pass over the file, in an order that depends on the seed."""
    from outrider.loops.offline import PairsConfig, PairsStep
    from outrider.registry import BuildContext

    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": str(i), "chosen": "a", "rejected": "b"}) + "\n" for i in range(10)))
    step = PairsStep(PairsConfig(path=str(path), pairs_per_step=4), BuildContext(seed=0, where="loop"))
    first = [p for s in (1, 2, 3) for p in step.batch_pairs(s)]
    assert sorted(int(p[0]) for p in first[:10]) == list(range(10))  # a pass is a permutation
    assert [p[0] for p in first[:10]] != [str(i) for i in range(10)]
    other = PairsStep(PairsConfig(path=str(path), pairs_per_step=4), BuildContext(seed=1, where="loop"))
    assert other.batch_pairs(1) != step.batch_pairs(1)
