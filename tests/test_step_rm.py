"""The step-label PRM (`score.step_rm`): step-token positions, the per-step cross-entropy on a hand-set head, a
response without a delimiter and an empty one, the first-wrong-step AUROC by hand, the data file's one-line errors,
`outrider rm train` on step labels end to end, and `process_reward` with ``prm: learned`` (its shapings on a PRM
of known scores, its one-line errors)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import call_main
from outrider.data import Episode, Turn
from outrider.errors import OutriderError
from outrider.policy.model import Policy
from outrider.registry import BuildContext
from outrider.score import SCORE
from outrider.score.reward_model import RewardModel, read_examples
from outrider.score.step_rm import (StepScorer, auroc, evaluate_steps, first_wrong_split, parse_step_labelled,
                                    split_at, step_batch_loss, step_loss, step_tokens)


@pytest.fixture(scope="module")
def chars() -> Policy:
    return Policy.tiny(hidden=16, layers=1, heads=2, value_head=True)


def hand_rm(bias: float) -> RewardModel:
    """A PRM whose head reads nothing but its bias: every step's logit is `bias`."""
    rm = RewardModel(Policy.tiny(hidden=16, layers=1, heads=2, value_head=True))
    with torch.no_grad():
        rm.policy.value_head.weight.zero_()
        rm.policy.value_head.bias.fill_(bias)
    return rm


def test_step_tokens_put_each_step_at_its_last_token(chars):
    prompt = chars.encode_observation("3+5+2=", first=True)
    ids, ends = step_tokens(chars, "3+5+2=", "8,10,#10")
    n = len(prompt)
    # steps "8," "10," "#10": their last tokens are the two delimiters and the final '0'; EOS after the response
    assert ends == [n + 1, n + 4, n + 7]
    assert ids == prompt + chars.encode("8,10,#10") + [chars.eos_id]
    assert [chars.decode([ids[e]]) for e in ends] == [",", ",", "0"]
    # no delimiter: one step, ending at the response's last token; a trailing delimiter leaves an empty last step
    assert step_tokens(chars, "q", "#10")[1] == [len(chars.encode_observation("q", first=True)) + 2]
    _, ends = step_tokens(chars, "q", "8,")
    assert ends[1] is None and split_at("8,") == ["8,", ""]
    # an empty response: one empty step with no token, only the EOS after the prompt
    ids, ends = step_tokens(chars, "q", "")
    assert ends == [None] and ids == chars.encode_observation("q", first=True) + [chars.eos_id]


def test_step_loss_hand_computed_and_unlabelled_steps_left_out():
    z = [torch.tensor([0.0, 2.0]), torch.tensor([5.0])]
    loss, ok = step_loss(z, [[1.0, 0.0], [None]])
    assert float(loss) == pytest.approx((math.log(2) + math.log(1 + math.e ** 2)) / 2, abs=1e-6)
    assert ok.tolist() == [0.0, 0.0]  # z = 0 is not > 0 (label 1), z = 2 > 0 (label 0)
    loss, ok = step_loss([torch.zeros(0, requires_grad=True)], [[]])
    assert float(loss) == 0.0 and ok.numel() == 0 and loss.requires_grad


def test_step_batch_loss_on_a_hand_set_head():
    rm = hand_rm(math.log(3))  # p = 0.75 at every step
    rows = [parse_step_labelled({"prompt": "1+2+3=", "response": "3,6,#6", "step_labels": [1, 1, 0]}, "x"),
            parse_step_labelled({"prompt": "1+2=", "response": "#3", "step_labels": [1]}, "x"),  # no delimiter
            parse_step_labelled({"prompt": "1+2=", "response": "", "step_labels": [0]}, "x")]  # empty: no step
    loss, ok = step_batch_loss(rm, rows)
    # three steps labelled 1 cost −log 0.75 each, one labelled 0 costs −log 0.25; the empty response adds nothing
    assert float(loss) == pytest.approx((-3 * math.log(0.75) - math.log(0.25)) / 4, abs=1e-5)
    assert ok.tolist() == [1.0, 1.0, 0.0, 1.0]
    loss.backward()
    assert rm.policy.value_head.bias.grad is not None
    # only empty responses: no step to train on, loss 0
    loss, ok = step_batch_loss(rm, rows[2:])
    assert float(loss) == 0.0 and ok.numel() == 0


def test_first_wrong_step_auroc_by_hand():
    assert first_wrong_split([0.9, 0.2, 0.8], [1, 0, 1]) == ([0.2], [0.9])  # steps after the first wrong left out
    assert first_wrong_split([0.9, 0.7], [1, 1]) == ([], [0.9, 0.7])  # a right response: all negatives
    assert first_wrong_split([0.9, 0.7], [None, 0]) == ([0.7], [])
    assert auroc([3.0], [1.0, 3.0, 5.0]) == pytest.approx((1 + 0.5) / 3)
    assert math.isnan(auroc([], [1.0]))
    # a PRM whose p is the same everywhere cannot tell first wrong steps apart: 0.5
    rows = [parse_step_labelled({"prompt": "1+2+3=", "response": "3,7,#7", "step_labels": [1, 0, 0]}, "x"),
            parse_step_labelled({"prompt": "1+2=", "response": "#3", "step_labels": [1]}, "x")]
    out = evaluate_steps(hand_rm(0.0), rows)
    assert out["first_wrong_auroc"] == 0.5 and out["first_wrong_steps"] == 1 and out["right_steps_before"] == 2
    assert out["loss"] == pytest.approx(math.log(2), abs=1e-6) and out["steps"] == 4


def test_step_label_files_one_line_errors(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"prompt": "q", "response": "1,2", "step_labels": [True, None]}) + "\n")
    kind, rows = read_examples(str(path))
    assert kind == "steps" and rows[0].step_labels == (1.0, None)
    cases = [({"prompt": "q", "response": "1,2", "step_labels": [1]}, "must be a list of 2 labels"),
             ({"prompt": "q", "response": "1", "step_labels": [2]}, "each label is a number from 0 to 1"),
             ({"prompt": "q", "response": "1", "step_labels": [1], "x": 0}, "unknown field 'x'"),
             ({"prompt": 1, "response": "1", "step_labels": [1]}, "field 'prompt' is a int")]
    for row, fragment in cases:
        path.write_text(json.dumps(row) + "\n")
        with pytest.raises(OutriderError) as e:
            read_examples(str(path))
        assert fragment in str(e.value) and str(e.value).startswith(f"{path}:1") and "\n" not in str(e.value)
    # another delimiter cuts other steps
    assert parse_step_labelled({"prompt": "q", "response": "1;2", "step_labels": [1, 0]}, "x", ";").step_labels


def test_rm_train_on_step_labels_prints_and_saves_step_accuracy_and_auroc(tmp_path, monkeypatch, capsys):
    # a step starting with '7' is right, one starting with '3' wrong
    rows = []
    for i in range(10):
        steps = ["7,", "7,", "3"] if i % 2 else ["7,", "3,", "3"]
        rows.append({"prompt": f"{i}=", "response": "".join(steps), "step_labels": [s[0] == "7" for s in steps]})
    data = tmp_path / "steps.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "prm"
    code, stdout, err = call_main(monkeypatch, capsys, "rm", "train", str(data), "--out", str(out), "--hidden", "16",
                                  "--layers", "1", "--heads", "2", "--epochs", "1", "--batch-size", "8",
                                  "--heldout", "0.2", "--quiet")
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["objective"] == "step_bce" and summary["delimiter"] == ","
    held = summary["heldout"]
    assert 0 <= held["accuracy"] <= 1 and 0 <= held["first_wrong_auroc"] <= 1
    assert f"first-wrong-step AUROC {held['first_wrong_auroc']:.3f}" in stdout
    # 2 held-out responses × 3 steps; each has one first wrong step (7,3 or 3) and one or two right steps before it
    assert held["steps"] == 6 and held["first_wrong_steps"] == 2
    assert RewardModel.load(out).meta["heldout"] == held


def episode(response: str) -> Episode:
    e = Episode(group_id=0, seed=0)
    e.turns.append(Turn("3+5+2=", [1], response, [5] * len(response)))
    return e


def test_process_reward_with_a_learned_prm_shapes_its_step_scores(tmp_path, chars):
    rm = hand_rm(math.log(3))  # every step scores p = 0.75
    rm.meta = {"objective": "step_bce", "delimiter": ","}
    rm.save(tmp_path / "prm")
    build = BuildContext(policy=chars, where="score[1]")
    eps = [episode("3+5=8,8+2=10,#10"), episode("#10"), episode("")]
    opts = {"name": "process_reward", "prm": "learned", "model": str(tmp_path / "prm")}
    piece = SCORE.create({**opts, "shaping": "sum"}, build, where="score[1]")
    assert piece(eps) == pytest.approx([2.25, 0.75, 0.0])  # 3, 1 and 0 steps with tokens
    metrics = piece.step_metrics()
    assert metrics["process_reward/steps"] == pytest.approx(4 / 3) and metrics["time/score/process_reward_s"] > 0
    # the same scorer under the other shapings (one model load)
    piece.cfg = piece.cfg.model_copy(update={"shaping": "clip", "eta": 1.0})
    assert piece(eps) == pytest.approx([-0.75, -0.25, 0.0])  # min(0.75 − 1, 0) per step
    piece.cfg = piece.cfg.model_copy(update={"shaping": "delta"})
    assert piece(eps) == pytest.approx([0.75, 0.75, 0.0])  # telescopes to the first step's p
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    piece.cfg = piece.cfg.model_copy(update={"shaping": "par", "references": 3})
    # PAR's references are the first three sums it sees, 2.25, 0.75 and 0
    assert piece(eps)[0] == pytest.approx((sig(0.0) + sig(1.5) + sig(2.25)) / 3, abs=1e-6)


def test_process_reward_learned_errors_name_the_field(tmp_path, chars):
    opts = {"name": "process_reward", "prm": "learned"}
    with pytest.raises(OutriderError, match=r"score\[1\].*model.*prm learned needs"):
        SCORE.create(opts, BuildContext(), where="score[1]")
    with pytest.raises(OutriderError, match=r"^score\[1\]\.model: no model directory at") as e:
        SCORE.create({**opts, "model": str(tmp_path / "none")}, BuildContext(where="score[1]"), where="score[1]")
    assert "\n" not in str(e.value)
    outcome = RewardModel(Policy.tiny(hidden=16, layers=1, heads=2, value_head=True), {"objective": "label_bce"})
    outcome.save(tmp_path / "orm")
    with pytest.raises(OutriderError, match=r"^score\[1\]\.model: .* label_bce reward model, not a step PRM"):
        SCORE.create({**opts, "model": str(tmp_path / "orm")}, BuildContext(where="score[1]"), where="score[1]")
    step = RewardModel(Policy.tiny(hidden=16, layers=1, heads=2, value_head=True), {"objective": "step_bce",
                                                                                   "delimiter": ","})
    step.save(tmp_path / "prm")
    other = SimpleNamespace(tokenizer=SimpleNamespace(get_vocab=lambda: {"a": 0}))
    with pytest.raises(OutriderError, match=r"^score\[1\]\.model: .* another tokenizer"):
        SCORE.create({**opts, "model": str(tmp_path / "prm")}, BuildContext(policy=other, where="score[1]"),
                     where="score[1]")
    with pytest.raises(OutriderError, match=r"^score\[1\]\.model: .* steps ending in ','"):
        SCORE.create({**opts, "model": str(tmp_path / "prm"), "delimiter": ";"},
                     BuildContext(policy=chars, where="score[1]"), where="score[1]")


def test_rm_train_save_epochs_snapshots_are_the_shorter_runs_models(tmp_path, monkeypatch, capsys):
    # the lr is constant and each pass's order is drawn in turn, so pass 2 of a 3-pass run is a 2-pass run's end
    rows = [{"prompt": f"{i}=", "response": "7,3" if i % 2 else "7,7", "step_labels": [1, i % 2 == 0]}
            for i in range(12)]
    data = tmp_path / "steps.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tiny = ["--hidden", "16", "--layers", "1", "--heads", "2", "--batch-size", "4", "--quiet"]
    code, _, err = call_main(monkeypatch, capsys, "rm", "train", str(data), "--out", str(tmp_path / "prm3"),
                             "--epochs", "3", "--save-epochs", *tiny)
    assert code == 0, err
    code, _, err = call_main(monkeypatch, capsys, "rm", "train", str(data), "--out", str(tmp_path / "prm2"),
                             "--epochs", "2", *tiny)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["prm2", "prm3", "prm3_epoch1",
                                                                        "prm3_epoch2"]
    two, snap = RewardModel.load(tmp_path / "prm2"), RewardModel.load(tmp_path / "prm3_epoch2")
    for (name, a), b in zip(two.policy.state_dict().items(), snap.policy.state_dict().values()):
        assert torch.equal(a, b), name
    assert snap.meta["objective"] == "step_bce" and snap.meta["epochs"] == 2 and "heldout" not in snap.meta
    StepScorer(str(tmp_path / "prm3_epoch1"), "score[0].model")  # loads as a step scorer
    # a snapshot directory already there is refused up front, naming it
    (tmp_path / "prm4_epoch1").mkdir()
    (tmp_path / "prm4_epoch1" / "x").write_text("")
    code, _, err = call_main(monkeypatch, capsys, "rm", "train", str(data), "--out", str(tmp_path / "prm4"),
                             "--epochs", "2", "--save-epochs", *tiny)
    assert code != 0 and "prm4_epoch1' is not empty" in err and not (tmp_path / "prm4").exists()
