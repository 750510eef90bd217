"""Model merging (`outrider merge`, outrider/merge.py): interpolation and task arithmetic against hand-computed
numbers on tiny state dicts, exact endpoints, one-line errors naming the key, and a merged directory that
`from_pretrained` loads."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import call_main
from outrider.errors import OutriderError
from outrider.merge import merged_state
from outrider.policy.model import Policy


def states(**extra):
    a = {"w": torch.tensor([1.0, 2.0, -4.0]), "b": torch.tensor([[0.5]]), "n": torch.tensor([3])}
    b = {"w": torch.tensor([3.0, 0.0, 4.0]), "b": torch.tensor([[1.5]]), "n": torch.tensor([3])}
    return {"A": a, "B": b, **extra}


def test_interpolation_by_hand():
    m = merged_state(states(), 0.25)
    # 0.75 A + 0.25 B
    assert torch.equal(m["w"], torch.tensor([1.5, 1.5, -2.0]))
    assert torch.equal(m["b"], torch.tensor([[0.75]]))
    assert torch.equal(m["n"], torch.tensor([3])) and m["n"].dtype == torch.int64


def test_weight_zero_and_one_give_a_and_b_exactly():
    s = states()
    s["A"]["w"] = torch.tensor([0.1, 1e-8, 3.3333333])  # values whose (1 - w) x + w y would round
    for w, side in ((0.0, "A"), (1.0, "B")):
        m = merged_state(s, w)
        assert all(torch.equal(m[k], s[side][k]) for k in s[side])


def test_task_arithmetic_by_hand():
    base = {"w": torch.tensor([1.0, 1.0, 0.0]), "b": torch.tensor([[1.0]]), "n": torch.tensor([3])}
    s = states(base=base)
    # tau_A = (0, 1, -4), tau_B = (2, -1, 4); lambda = 2, w = 0.5: base + tau_A + tau_B = (3, 1, 0)
    m = merged_state(s, 0.5, scale=2.0)
    assert torch.equal(m["w"], torch.tensor([3.0, 1.0, 0.0]))
    assert torch.equal(m["b"], torch.tensor([[1.0]]))  # tau_A = -0.5, tau_B = 0.5
    # lambda = 1 is the interpolation whatever the base
    assert torch.allclose(merged_state(s, 0.3, scale=1.0)["w"], merged_state(states(), 0.3)["w"], atol=1e-7)
    # w = 0, lambda = 0.5: half of A's task vector
    assert torch.equal(merged_state(s, 0.0, scale=0.5)["w"], torch.tensor([1.0, 1.5, -2.0]))


def test_ties_by_hand():
    base = {"w": torch.tensor([1.0, 1.0, 0.0]), "b": torch.tensor([[1.0]]), "n": torch.tensor([3])}
    s = states(base=base)
    # tau_A = (0, 1, -4), tau_B = (2, -1, 4); w = 0.25: weighted (0, .75, -3) and (.5, -.25, 1), sum (.5, .5, -2):
    # elected signs (+, +, -); entry 0: only B agrees, .5 / .25 = 2; entry 1: A, .75 / .75 = 1; entry 2: A, -4
    m = merged_state(s, 0.25, method="ties")
    assert torch.equal(m["w"], torch.tensor([3.0, 2.0, -4.0]))
    assert torch.equal(m["b"], torch.tensor([[0.5]]))  # tau_A = -.5 (weighted -.375) outweighs tau_B = .5 (.125)
    # trimmed to the largest third (one entry of three): (0, 0, -4) and (0, 0, 4); entries 0 and 1 stay at base
    m = merged_state(s, 0.25, method="ties", density=1 / 3)
    assert torch.equal(m["w"], torch.tensor([1.0, 1.0, -4.0]))
    # w = 0.5: entries 1 and 2 cancel exactly (no elected sign): they stay at base; lambda scales what is merged
    m = merged_state(s, 0.5, scale=0.5, method="ties")
    assert torch.equal(m["w"], torch.tensor([2.0, 1.0, 0.0]))
    # agreeing signs are a plain weighted mean: TIES equals task arithmetic there
    agree = states(base={"w": torch.zeros(3), "b": torch.zeros(1, 1), "n": torch.tensor([3])})
    agree["B"]["w"] = torch.tensor([2.0, 4.0, -2.0])
    assert torch.allclose(merged_state(agree, 0.3, method="ties")["w"], merged_state(agree, 0.3)["w"], atol=1e-6)


def test_dare_ties_drops_and_rescales():
    n = 20000
    base = {"w": torch.zeros(n), "b": torch.zeros(1, 1), "n": torch.tensor([3])}
    s = {"A": {"w": torch.zeros(n), "b": torch.zeros(1, 1), "n": torch.tensor([3])},
         "B": {"w": torch.full((n,), 0.5), "b": torch.ones(1, 1), "n": torch.tensor([3])}, "base": base}
    m = merged_state(s, 0.5, method="dare_ties", density=0.25, seed=3)
    # A's task vector is 0: every kept entry of B's (1/0.25) * 0.5 = 2 is the merge; the rest stay at base
    assert set(m["w"].unique().tolist()) == {0.0, 2.0}
    assert abs((m["w"] == 2.0).float().mean().item() - 0.25) < 0.02
    assert abs(m["w"].mean().item() - 0.5) < 0.04  # unbiased: the rescaling keeps the task vector's mean
    assert torch.equal(m["w"], merged_state(s, 0.5, method="dare_ties", density=0.25, seed=3)["w"])
    assert not torch.equal(m["w"], merged_state(s, 0.5, method="dare_ties", density=0.25, seed=4)["w"])
    full = states(base={"w": torch.tensor([1.0, 1.0, 0.0]), "b": torch.tensor([[1.0]]), "n": torch.tensor([3])})
    assert torch.equal(merged_state(full, 0.25, method="dare_ties")["w"], merged_state(full, 0.25, method="ties")["w"])
    with pytest.raises(OutriderError, match="--method ties: merges task vectors, so it needs --base"):
        merged_state(states(), 0.5, method="ties")


@pytest.mark.parametrize("change, fragments", [
    (lambda s: s["B"].pop("b"), ("A has the parameter b and B has not",)),
    (lambda s: s["B"].update(extra=torch.zeros(1)), ("B has the parameter extra and A has not",)),
    (lambda s: s["B"].update(w=torch.zeros(4)), ("parameter w has shape (3,) in A and (4,) in B",)),
    (lambda s: s["base"].update(b=torch.zeros(2, 1)), ("parameter b", "in base")),
    (lambda s: s["B"].update(n=torch.tensor([4])), ("integer tensor n",)),
])
def test_mismatches_are_one_line_naming_the_key(change, fragments):
    s = states(base={k: v.clone() for k, v in states()["A"].items()})
    change(s)
    with pytest.raises(OutriderError) as e:
        merged_state(s, 0.5)
    assert "\n" not in str(e.value) and all(f in str(e.value) for f in fragments), str(e.value)


def tiny_dir(tmp_path, name: str, seed: int, hidden: int = 32):
    path = tmp_path / name
    Policy.tiny(hidden=hidden, layers=1, heads=2, seed=seed).save(path)
    return path


def test_cli_merge_is_loadable_and_exact(tmp_path, monkeypatch, capsys):
    a, b, base = tiny_dir(tmp_path, "a", 1), tiny_dir(tmp_path, "b", 2), tiny_dir(tmp_path, "base", 3)
    code, out, err = call_main(monkeypatch, capsys, "merge", str(a), str(b), "--weight", "0.3",
                               "--out", str(tmp_path / "c"))
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "c").state_dict()
    sa = AutoModelForCausalLM.from_pretrained(a).state_dict()
    sb = AutoModelForCausalLM.from_pretrained(b).state_dict()
    for key in sa:
        assert torch.allclose(merged[key], 0.7 * sa[key] + 0.3 * sb[key], atol=1e-6), key
    assert Policy.load(tmp_path / "c").decode(Policy.load(tmp_path / "c").encode("12 ->")) == "12 ->"
    # weight 1 is B exactly; task arithmetic with --base runs through the CLI too
    assert call_main(monkeypatch, capsys, "merge", str(a), str(b), "--weight", "1", "--out",
                     str(tmp_path / "d"))[0] == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "d").state_dict()
    assert all(torch.equal(merged[k], sb[k]) for k in sb)
    code, _, err = call_main(monkeypatch, capsys, "merge", str(a), str(b), "--base", str(base), "--scale", "2",
                             "--out", str(tmp_path / "e"))
    assert code == 0, err
    # an existing output is refused without --overwrite
    code, _, err = call_main(monkeypatch, capsys, "merge", str(a), str(b), "--out", str(tmp_path / "c"))
    assert code == 2 and "--overwrite" in " ".join(err.split())


@pytest.mark.parametrize("argv, fragments", [
    (["--weight", "1.5"], ("--weight", "between 0 and 1")),
    (["--scale", "2"], ("--scale", "--base")),
    (["--method", "dare_ties"], ("--method dare_ties", "needs --base")),
    (["--method", "slerp"], ("--method", "linear, ties or dare_ties", "'slerp'")),
    (["--density", "0.5"], ("--density", "not linear")),
])
def test_cli_bad_options(tmp_path, monkeypatch, capsys, argv, fragments):
    a, b = tiny_dir(tmp_path, "a", 1), tiny_dir(tmp_path, "b", 2)
    code, _, err = call_main(monkeypatch, capsys, "merge", str(a), str(b), "--out", str(tmp_path / "c"), *argv)
    err = " ".join(err.split())  # the console may wrap the one-line error at its width
    assert code == 2 and all(f in err for f in fragments), err


def test_cli_different_architectures_and_missing_model(tmp_path, monkeypatch, capsys):
    a, b = tiny_dir(tmp_path, "a", 1), tiny_dir(tmp_path, "b", 2, hidden=16)
    code, _, err = call_main(monkeypatch, capsys, "merge", str(a), str(b), "--out", str(tmp_path / "c"))
    err = " ".join(err.split())  # the console may wrap the one-line error at its width
    assert code == 2 and "different architectures (head_dim: 16 vs 8" in err, err
    code, _, err = call_main(monkeypatch, capsys, "merge", str(a), str(tmp_path / "nope"), "--out",
                             str(tmp_path / "c"))
    err = " ".join(err.split())
    assert code == 2 and "B:" in err and "neither a model directory" in err, err


def test_a_run_directory_means_its_newest_checkpoint(tmp_path, monkeypatch, capsys):
    a, b = tiny_dir(tmp_path, "a", 1), tiny_dir(tmp_path, "b", 2)
    for step, model in ((2, a), (4, b)):  # a run whose newest checkpoint holds B's weights
        ckpt = tmp_path / "run" / "checkpoints" / f"step_{step}"
        Policy.load(model).save(ckpt)
        (ckpt / "trainer_state.pt").write_bytes(b"")
    code, _, err = call_main(monkeypatch, capsys, "merge", str(a), str(tmp_path / "run"), "--weight", "1",
                             "--out", str(tmp_path / "c"))
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "c").state_dict()
    sb = AutoModelForCausalLM.from_pretrained(b).state_dict()
    assert all(torch.equal(merged[k], sb[k]) for k in sb)
