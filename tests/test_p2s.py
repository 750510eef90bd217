"""P2S [39]: the path-faithfulness reward against hand-computed numbers on a stub policy whose next-token
probabilities are set by hand and depend on the previous two tokens (so a prefix that diverged changes what the
gold suffix scores); the step placement of each `combine`; the degenerate cases (no step, extra steps, an empty gold
suffix, a truncated step); the stepsum gold CoT hook; the option and hook errors; a short run."""

from __future__ import annotations

import math

import pytest
import torch

from outrider.data import Episode, Turn
from outrider.envs.base import ENVS
from outrider.envs.stepsum import StepSumConfig, StepSumTask, trace
from outrider.errors import OutriderError
from outrider.policy.model import Scores
from outrider.registry import BuildContext
from outrider.score import SCORE, Component, compose
from outrider.score.p2s import boundaries, gold_steps, pfr_value, place

VOCAB = ["<pad>", "<bos>", "<eos>", "1", "2", "3", ",", "#", "q"]
ID = {t: i for i, t in enumerate(VOCAB)}
PAD, BOS, EOS = 0, 1, 2

# P(next | two previous tokens), by hand; every other (context, token) has probability 1/9
TABLE = {
    ("<bos>", "q"): {"1": 0.5},
    ("q", "1"): {",": 0.4},
    ("1", ","): {"2": 0.8},
    ("3", ","): {"2": 0.1, "#": 0.1},
    (",", "2"): {",": 0.9},
    ("2", ","): {"#": 0.5},
    (",", "#"): {"2": 0.6},
    ("#", "2"): {"<eos>": 0.7},
}


class StubPolicy:
    pad_id, bos_id, eos_id = PAD, BOS, EOS

    def __init__(self):
        self.calls = 0
        self.rows = 0

    def encode(self, text: str) -> list[int]:
        return [ID[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(VOCAB[i] for i in ids if i > EOS)

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Scores:
        self.calls += 1
        self.rows += input_ids.shape[0]
        out = torch.zeros(input_ids.shape, dtype=torch.float32)
        for b in range(input_ids.shape[0]):
            ids = input_ids[b].tolist()
            for t in range(2, len(ids)):
                dist = TABLE.get((VOCAB[ids[t - 2]], VOCAB[ids[t - 1]]), {})
                out[b, t] = math.log(dist.get(VOCAB[ids[t]], 1 / 9))
        return Scores(logprobs=out)


def episode(response: str, eos: bool = True, group: int = 0) -> Episode:
    e = Episode(group_id=group, seed=0)
    e.turns.append(Turn("q", [ID["q"]], response, [ID[c] for c in response] + ([EOS] if eos else []),
                        info={"reference": "2"}))
    return e


def build(policy=None, gold: str = "1,2,#2", **options):
    entry, cfg = SCORE.build({"name": "p2s", **options}, "score[1]")
    piece = entry.create(cfg, BuildContext(policy=policy or StubPolicy(), where="score[1]"))
    piece.gold_of = lambda e: gold
    return piece


# hand-computed PFRs (mean_p) for gold "1,2,#2" after prompt "q"
RIGHT_1 = (0.8 + 0.9 + 0.5 + 0.6 + 0.7) / 5  # after "1,": "2,#2" + EOS
RIGHT_2 = (0.5 + 0.6 + 0.7) / 3  # after "1,2,": "#2" + EOS
WRONG_1 = (0.1 + 0.9 + 0.5 + 0.6 + 0.7) / 5  # after "3,": '2' is unlikely after a wrong first sum
WRONG_2 = (0.1 + 0.6 + 0.7) / 3  # after "…3,": the answer step is unlikely after a wrong partial sum
PFR_0 = (0.5 + 0.4 + 0.8 + 0.9 + 0.5 + 0.6 + 0.7) / 7  # the whole gold CoT after the prompt


def test_helpers_by_hand():
    assert gold_steps("8,17,21,#21", ",") == ["8,", "17,", "21,", "#21"]
    assert gold_steps("#5", ",") == ["#5"] and gold_steps("", ",") == [] and gold_steps("1,", ",") == ["1,"]
    assert boundaries(["1", ",", "2", ",", "#", "2", ""], ",") == [2, 4]
    assert boundaries(["#", "2"], ",") == [] and boundaries(["1,2", ","], ",") == [1, 2]
    lps = [math.log(0.5), math.log(0.125)]
    assert pfr_value(lps, "mean_p") == pytest.approx(0.3125)
    assert pfr_value(lps, "geo_p") == pytest.approx(0.25)  # exp(mean log p) = sqrt(0.5 · 0.125)
    assert pfr_value(lps, "p") == pytest.approx(0.0625)
    assert pfr_value(lps, "mean_log_p") == pytest.approx(math.log(0.0625) / 2)
    assert pfr_value([], "geo_p") == 1.0 and pfr_value([], "mean_p") == 0.0


def test_place_each_combine_by_hand():
    # steps end at tokens 2 and 4 of 7; the last token is the outcome's
    assert place([0.7, 0.6], [2, 4], 7, "step") == pytest.approx([0.7, 0.7, 0.6, 0.6, 0, 0, 0])
    assert place([0.7, 0.6], [2, 4], 7, "progress", 0.5) == pytest.approx([0.2, 0.2, -0.1, -0.1, 0, 0, 0])
    assert place([0.7, 0.6], [2, 4], 7, "mean") == pytest.approx([0, 0, 0, 0, 0, 0, 0.65])
    assert place([], [], 3, "mean") == [0.0, 0.0, 0.0] and place([], [], 0, "step") == []
    assert place([0.7], [2], 2, "step") == pytest.approx([0.7, 0.0])  # a step ending on the last token


def test_pfr_of_a_right_and_a_diverged_path_by_hand():
    stub = StubPolicy()
    piece = build(stub)
    right, wrong_first, wrong_second = episode("1,2,#2"), episode("3,3,#3"), episode("1,3,#3")
    out = piece([right, wrong_first, wrong_second])
    assert out[0] == pytest.approx([RIGHT_1] * 2 + [RIGHT_2] * 2 + [0.0] * 3)
    assert out[1] == pytest.approx([WRONG_1] * 2 + [WRONG_2] * 2 + [0.0] * 3)
    # the prefix diverges at step 2: step 1 keeps the right path's PFR, step 2 drops to the diverged value
    assert out[2] == pytest.approx([RIGHT_1] * 2 + [WRONG_2] * 2 + [0.0] * 3)
    assert WRONG_2 < RIGHT_2 and WRONG_1 < RIGHT_1
    # one forward, two boundaries per response; the first step "1," of two responses is one row
    assert stub.calls == 1 and stub.rows == 5
    m = piece.step_metrics()
    assert m["p2s/rows"] == 5 and m["p2s/steps_per_episode"] == 2
    assert m["p2s/tokens"] == 5 + 3 + 5 + 3 + 3
    assert m["p2s/pfr"] == pytest.approx((2 * RIGHT_1 + RIGHT_2 + WRONG_1 + 2 * WRONG_2) / 6)
    assert m["p2s/pfr_first"] == pytest.approx((2 * RIGHT_1 + WRONG_1) / 3)
    assert m["time/score/p2s_s"] >= 0 and piece.step_metrics()["p2s/rows"] == 0  # reset after reading


def test_mean_progress_and_variants_by_hand():
    eps = [episode("1,2,#2"), episode("1,3,#3")]
    mean = build(combine="mean")(eps)
    assert mean[0] == pytest.approx([0.0] * 6 + [(RIGHT_1 + RIGHT_2) / 2])
    assert mean[1] == pytest.approx([0.0] * 6 + [(RIGHT_1 + WRONG_2) / 2])
    stub = StubPolicy()
    progress = build(stub, combine="progress")(eps)
    assert progress[0] == pytest.approx([RIGHT_1 - PFR_0] * 2 + [RIGHT_2 - RIGHT_1] * 2 + [0.0] * 3)
    assert progress[1] == pytest.approx([RIGHT_1 - PFR_0] * 2 + [WRONG_2 - RIGHT_1] * 2 + [0.0] * 3)
    assert stub.rows == 3 + 1  # the shared first step and PFR_0 once for the two responses to the same prompt
    geo = build(variant="geo_p", end_token=False)([episode("1,2,#2")])
    assert geo[0][:4] == pytest.approx([(0.8 * 0.9 * 0.5 * 0.6) ** 0.25] * 2 + [(0.5 * 0.6) ** 0.5] * 2)


def test_degenerate_responses_and_gold():
    stub = StubPolicy()
    piece = build(stub)
    # no step boundary (the answer alone, an empty response): nothing scored, no forward
    assert piece([episode("#2"), episode("")]) == [[0.0] * 3, [0.0]]
    assert stub.calls == 0
    assert build(combine="mean")([episode("#2")]) == [[0.0] * 3]
    assert build(combine="progress")([episode("")]) == [[0.0]]
    # extra steps: the third boundary has an empty gold suffix (gold has N − 1 = 2 inner steps) and is not scored
    out = build()([episode("1,2,2,#2")])
    assert out[0] == pytest.approx([RIGHT_1] * 2 + [RIGHT_2] * 2 + [0.0] * 5)
    # a gold CoT of one step (the answer alone): every suffix after a boundary would be empty
    stub = StubPolicy()
    assert build(stub, gold="#2")([episode("1,2,#2")]) == [[0.0] * 7] and stub.calls == 0
    # a truncated response ending on a delimiter: its step's last token is the outcome's
    assert build()([episode("1,", eos=False)])[0] == pytest.approx([RIGHT_1, 0.0])


def test_compose_weights_the_dense_rewards():
    piece = build()
    eps = [episode("1,2,#2")]
    compose(eps, [Component("p2s", piece, 0.5, "score[1]")])
    assert eps[0].rewards["token"]["p2s"] == pytest.approx([0.5 * RIGHT_1] * 2 + [0.5 * RIGHT_2] * 2 + [0.0] * 3)


def test_stepsum_gold_cot_hook_and_the_default_gold_of():
    task = StepSumTask(StepSumConfig(min_terms=3, max_terms=4, long_fraction=0.0))
    env = task.make_env("train")
    env.reset(7)
    terms = env.problem["metadata"]["terms"]
    assert task.gold_cot(env) == trace(terms, "short")
    assert task.gold_cot(env).endswith(f"#{sum(terms)}") and task.gold_cot(env).count(",") == len(terms) - 1
    entry, cfg = SCORE.build({"name": "p2s"}, "score[1]")
    piece = entry.create(cfg, BuildContext(task=task, policy=StubPolicy(), where="score[1]"))
    e = Episode(group_id=0, seed=7)
    e.turns.append(Turn("q", [ID["q"]], "1", [ID["1"], EOS]))
    assert piece.gold_of(e) == trace(terms, "short")


def test_errors_name_the_field():
    with pytest.raises(OutriderError, match=r"score\[1\].*combine"):
        SCORE.build({"name": "p2s", "combine": "sum"}, "score[1]")
    with pytest.raises(OutriderError, match=r"score\[1\].*variant"):
        SCORE.build({"name": "p2s", "variant": "max_p"}, "score[1]")
    with pytest.raises(OutriderError, match=r"score\[1\].*delimiter"):
        SCORE.build({"name": "p2s", "delimiter": ""}, "score[1]")
    entry, cfg = ENVS.build({"name": "sortlist"}, "task")
    sortlist = entry.fn(cfg)
    p_entry, p_cfg = SCORE.build({"name": "p2s"}, "score[1]")
    with pytest.raises(OutriderError, match=r"^score\[1\]: needs the task's gold_cot\(env\) hook"):
        p_entry.create(p_cfg, BuildContext(task=sortlist, policy=StubPolicy(), where="score[1]"))
