"""Reward levels and composition (score/shaping.py): segmentation, broadcast, gating, Clip/Delta [42], PAR [51],
against hand-computed numbers."""

from __future__ import annotations

import math

import pytest

from outrider.errors import OutriderError
from outrider.score.shaping import (broadcast, clip_steps, delta_steps, gate_by_outcome, par, segment_delimiter,
                                    segment_fixed, segment_turns)


def test_segmentation():
    assert segment_delimiter("8,10,#10") == [(0, 2), (2, 5), (5, 8)]
    assert segment_delimiter("8,10,") == [(0, 2), (2, 5)]
    assert segment_delimiter("") == [(0, 0)]
    assert segment_delimiter("a;b\nc", r"[;\n]", regex=True) == [(0, 2), (2, 4), (4, 5)]
    assert segment_fixed(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert segment_turns([2, 0, 3]) == [(0, 2), (2, 2), (2, 5)]
    with pytest.raises(OutriderError, match="delimiter"):
        segment_delimiter("x", "")
    with pytest.raises(OutriderError, match="length"):
        segment_fixed(3, 0)


def test_broadcast_rules():
    spans = [(0, 2), (2, 5)]
    assert broadcast([1.0, -3.0], spans, 5, "last") == [0, 1.0, 0, 0, -3.0]
    assert broadcast([1.0, -3.0], spans, 5, "uniform") == pytest.approx([0.5, 0.5, -1, -1, -1])
    assert broadcast([1.0, -3.0], spans, 5, "return_to_go") == [-2.0, -2.0, -3.0, -3.0, -3.0]
    assert broadcast([1.0, 2.0], [(0, 2), (2, 2)], 2, "last") == [0, 1.0]  # an empty step is dropped
    with pytest.raises(OutriderError, match="step rewards"):
        broadcast([1.0], spans, 5)
    with pytest.raises(OutriderError, match="rule"):
        broadcast([1.0, 2.0], spans, 5, "first")


def test_gate_clip_delta_par():
    assert gate_by_outcome([0.2, 0.3], 1.0) == [0.2, 0.3]
    assert gate_by_outcome([0.2, 0.3], 0.0) == [0.0, 0.0]
    assert gate_by_outcome([0.2], 0.6, threshold=0.5) == [0.2]
    assert clip_steps([0.9, 0.4, 1.2], eta=0.5) == pytest.approx([0.0, -0.1, 0.0])
    # a PRM paying +1 per valid step: raw sums grow with the steps, Clip (η = 1) and Delta do not
    for k in (2, 5, 9):
        assert sum(clip_steps([1.0] * k, eta=1.0)) == 0.0
        assert sum(delta_steps([1.0] * k)) == 1.0
    assert delta_steps([0.9, 0.5, 0.7]) == pytest.approx([0.4, -0.2, 0.7])
    assert sum(delta_steps([0.9, 0.5, 0.7])) == pytest.approx(0.9)  # telescopes to the first step's score
    assert delta_steps([]) == []
    assert par(2.0, [2.0]) == 0.5
    assert par(1.0, [0.0, 2.0]) == pytest.approx((1 / (1 + math.exp(-1)) + 1 / (1 + math.exp(1))) / 2)
    assert par(1e4, [0.0]) == 1.0 and par(-1e4, [0.0]) == 0.0  # bounded, no overflow
    with pytest.raises(OutriderError, match="reference"):
        par(1.0, [])
