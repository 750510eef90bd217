"""Exploration diagnostics against hand-computed numbers, and their persistence along a run (eval_base.json)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import call_main, read_jsonl, write_recipe
from outrider.observe.diagnostics import (answer_diversity, correct_support, crossover_k, effective_rank,
                                          pass_at_k_curve, support_change, token_entropy_stats)


def test_token_entropy_stats():
    h = [0.0, 0.5, 1.0, 1.5, 2.0]
    out = token_entropy_stats(h, forking_threshold=0.9)
    assert out["entropy_mean"] == pytest.approx(1.0)
    # linear-interpolation quantiles of 5 points: p80 at index 3.2 → 1.6; p95 at index 3.8 → 1.9
    assert out["entropy_p80"] == pytest.approx(1.6) and out["entropy_p95"] == pytest.approx(1.9)
    assert out["forking_frac"] == pytest.approx(3 / 5)
    assert token_entropy_stats([])["entropy_mean"] == 0.0


def test_answer_diversity_by_hand():
    groups = [
        # prompt 0: answers a, a, b, None; correct: a (twice), b wrong
        [("a", True), ("a", True), ("b", False), (None, False)],
        # prompt 1: c, d, e, f all correct and distinct
        [("c", True), ("d", True), ("e", True), ("f", True)],
    ]
    out = answer_diversity(groups)
    assert out["distinct_answers"] == pytest.approx((2 + 4) / 2)
    assert out["distinct_correct"] == pytest.approx((1 + 4) / 2)
    h0 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))  # a: 2/4, b: 1/4, None: 1/4
    assert out["answer_entropy"] == pytest.approx((h0 + math.log(4)) / 2)
    # repeat rate: prompt 0 has one pair (a, a) of 4·3 ordered pairs → 2/12; prompt 1 none
    assert out["repeat_rate"] == pytest.approx((2 / 12 + 0) / 2)
    assert out["zero_variance_frac"] == pytest.approx(0.5)  # prompt 1 is all correct


def test_support_change():
    base = correct_support([[("a", True), ("b", True)], [("x", True), ("y", False)]])
    assert base == {(0, "a"), (0, "b"), (1, "x")}
    now = correct_support([[("a", True), ("a", True)], [("x", True), ("z", True)]])
    out = support_change(base, now)
    assert out["support_shrinkage"] == pytest.approx(1 / 3)  # (0, b) lost
    assert out["support_expansion"] == pytest.approx(1 / 3)  # (1, z) new of 3
    assert support_change(set(), set()) == {"support_shrinkage": 0.0, "support_expansion": 0.0,
                                            "support_size": 0.0}


def test_crossover_k():
    # n = 4. Base: prompts with 1 and 1 correct; RL: 4 and 0 (sharpened onto one prompt)
    # base pass@k = 1 − C(3,k)/C(4,k): k=1 0.25, k=2 0.5, k=3 0.75, k=4 1
    # RL: prompt 0 always 1, prompt 1 always 0 → 0.5 for all k; crossover where base ≥ 0.5: k = 2
    assert pass_at_k_curve([1, 1], 4) == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert crossover_k([1, 1], [4, 0], 4) == 2
    assert crossover_k([0, 0], [1, 0], 4) is None  # RL ahead at every k


def test_effective_rank():
    assert effective_rank(torch.ones(5, 3)) == pytest.approx(1.0)  # parallel rows: one direction
    assert effective_rank(torch.eye(4)) == pytest.approx(4.0)  # equal singular values
    z = torch.diag(torch.tensor([3.0, 1.0]))
    p = torch.tensor([0.75, 0.25])
    assert effective_rank(z) == pytest.approx(float(torch.exp(-(p * p.log()).sum())))


@pytest.mark.slow  # a two-step run, ~10 s
def test_run_logs_diagnostics_against_its_start(tmp_path, monkeypatch, capsys):
    path = write_recipe(tmp_path, train={"steps": 2}, observe={"eval_every": 1})
    run = tmp_path / "run"
    code, out, err = call_main(monkeypatch, capsys, "train", str(path), "--out", str(run), "--quiet")
    assert code == 0, err
    base = json.loads((run / "eval_base.json").read_text())
    assert len(base["correct"]) > 0 and base["samples"] > 0
    rows = read_jsonl(run / "metrics.jsonl")
    assert "eval/entropy_mean" in rows[0] and "eval/support_shrinkage" not in rows[0]  # the start is the base
    for key in ("eval/support_shrinkage", "eval/support_expansion", "eval/crossover_k", "eval/distinct_correct",
                "eval/effective_rank", "policy/entropy_adv_cov"):
        assert key in rows[-1], key


@pytest.mark.parametrize("q", [0.0, 0.2, 0.5, 0.8, 0.95, 1.0])
def test_sort_quantile_equals_torch_quantile(q):
    from outrider.stats import quantile

    x = torch.randn(7, 13, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(quantile(x, q), torch.quantile(x.flatten(), q))
    assert float(quantile(torch.tensor([3.0]), q)) == 3.0
