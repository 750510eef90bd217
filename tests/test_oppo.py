"""OPPO [38] and its baselines: the losses against hand-computed numbers (degenerate cases included), the
dataset format and its errors, held-out layouts, and resume."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
import yaml

from outrider.errors import OutriderError
from outrider.offline.baselines import BTFilteredBC, bt_loss
from outrider.offline.oppo import OPPO, Encoder, nll, norm_loss, preference_loss, triplet
from outrider.offline.run import load_config, run
from outrider.offline.trajectories import Dataset, Trajectory, generate, layout_id, load_dataset, make_env, \
    save_dataset

T = torch.tensor


def test_triplet_hand_computed_and_equal_to_torch():
    a, p, n = T([[0.0, 0.0]]), T([[3.0, 0.0]]), T([[0.0, 1.0]])
    assert triplet(a, p, n, 1.0).item() == pytest.approx(3.0, abs=1e-5)  # 3 − 1 + 1
    assert triplet(a, n, p, 1.0).item() == pytest.approx(0.0, abs=1e-6)  # 1 − 3 + 1 < 0
    g = torch.Generator().manual_seed(0)
    a, p, n = (torch.randn(5, 4, generator=g) for _ in range(3))
    ref = torch.nn.TripletMarginLoss(margin=1.0, p=2, reduction="sum")(a, p, n)
    assert triplet(a, p, n, 1.0).item() == pytest.approx(ref.item(), abs=1e-6)


def test_preference_loss_hand_computed():
    z_star = T([0.0, 0.0])
    z_a = T([[3.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 2.0]])
    z_b = T([[0.0, 1.0], [3.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    pref = T([1.0, 0.0, 0.5, 0.5])
    # strict pairs: 3 − 1 + 1 = 3 each; ties (margin 0, side a positive): max(1 − 2, 0) = 0, max(2 − 1, 0) = 1
    assert preference_loss(z_star, z_a, z_b, pref).item() == pytest.approx((3 + 3 + 0 + 1) / 4, abs=1e-5)


def test_preference_loss_degenerate_cases():
    z_star = torch.nn.Parameter(T([0.5, -0.5]))
    z = T([[1.0, 2.0], [0.0, -1.0]])
    # equal trajectories: a strict pair costs the margin and gives z* no gradient; a tie costs nothing
    loss = preference_loss(z_star, z, z.clone(), T([1.0, 0.0]), margin=1.0)
    loss.backward()
    assert loss.item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(z_star.grad, torch.zeros(2), atol=1e-6)
    assert preference_loss(z_star, z, z.clone(), T([0.5, 0.5])).item() == pytest.approx(0.0, abs=1e-6)
    # all pairs one way: swapping the sides and the labels changes nothing
    g = torch.Generator().manual_seed(1)
    za, zb = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    ones = torch.ones(6)
    assert preference_loss(T([0.1, 0.2, 0.3]), za, zb, ones).item() == pytest.approx(
        preference_loss(T([0.1, 0.2, 0.3]), zb, za, 1 - ones).item(), abs=1e-6)
    # z* moves toward the preferred embedding
    zs = torch.nn.Parameter(torch.zeros(2))
    preference_loss(zs, T([[1.0, 0.0]]), T([[-1.0, 0.0]]), T([1.0])).backward()
    assert zs.grad[0] < 0


def test_norm_nll_and_bt_losses():
    assert norm_loss(T([[3.0, 4.0], [0.3, 0.4]])).item() == pytest.approx(2.0)  # (5 − 1 + 0) / 2
    logits, actions = torch.zeros(1, 3, 6), T([[0, 1, 5]])
    assert nll(logits, actions, T([[1.0, 1.0, 0.0]])).item() == pytest.approx(math.log(6))
    logits[0, 2, 5] = 100.0  # a padded step does not count
    assert nll(logits, actions, T([[1.0, 1.0, 0.0]])).item() == pytest.approx(math.log(6))
    assert bt_loss(T([1.0]), T([0.0]), T([1.0])).item() == pytest.approx(-math.log(1 / (1 + math.exp(-1))))
    assert bt_loss(T([2.0]), T([2.0]), T([0.5])).item() == pytest.approx(math.log(2))
    assert bt_loss(T([0.0]), T([1.0]), T([0.0])).item() == pytest.approx(-math.log(1 / (1 + math.exp(-1))))


def test_encoder_ignores_padding():
    torch.manual_seed(0)
    enc = Encoder(4, 6, 8, 3)
    obs, act = torch.randn(1, 3, 4), T([[1, 2, 3]])
    padded_obs = torch.cat([obs, torch.randn(1, 2, 4)], 1)
    padded_act = torch.cat([act, T([[5, 5]])], 1)
    z = enc(obs, act, torch.ones(1, 3))
    assert torch.allclose(z, enc(padded_obs, padded_act, T([[1.0, 1, 1, 0, 0]])), atol=1e-6)


def test_filtered_bc_keeps_the_top_fraction():
    bt = BTFilteredBC.mlp(4, 6, 8, 1e-3, 0.0, 0, reward_steps=1, keep=0.5)
    assert bt.select(T([0.1, 0.9, 0.5, 0.9])) == [1, 3]
    bt.keep = 0.1
    assert bt.select(T([0.1, 0.9, 0.5, 0.9])) == [1]  # ceil(0.4) = 1; ties: the lower index


def test_oppo_alternation_updates_the_right_parts():
    torch.manual_seed(0)
    oppo = OPPO.mlp(4, 6, 8, 2, 1e-2, 1e-2, 2.0, None, 0.0, 0.1, 0.1, 1.0, 0.1, seed=0)
    obs, act, mask = torch.randn(3, 5, 4), torch.randint(6, (3, 5)), torch.ones(3, 5)
    pairs = ((obs, act, mask), (obs.flip(0), act.flip(0), mask), T([1.0, 0.0, 0.5]))
    before = {k: v.clone() for k, v in oppo.state_dict()["policy"].items()}
    z0, e0 = oppo.z_star.detach().clone(), oppo.encoder.head.weight.detach().clone()
    m = oppo.step(2, (obs, act, mask), pairs, torch.Generator().manual_seed(0))  # even step: no HIM step
    assert "oppo/him" not in m and set(m) >= {"oppo/pref_z", "oppo/pref_encoder", "oppo/norm"}
    assert all(torch.equal(before[k], v) for k, v in oppo.state_dict()["policy"].items())  # policy frozen
    assert not torch.equal(oppo.z_star.detach(), z0) and not torch.equal(oppo.encoder.head.weight, e0)
    m = oppo.step(3, (obs, act, mask), pairs, torch.Generator().manual_seed(0))  # odd: HIM trains the policy
    assert "oppo/him" in m
    assert any(not torch.equal(before[k], v) for k, v in oppo.state_dict()["policy"].items())


def test_z_star_projected_into_the_ball():
    oppo = OPPO.mlp(4, 6, 8, 3, 1e-2, 1e-2, 2.0, 0.5, 0.0, 0.1, 0.1, 1.0, 0.1, seed=0)
    assert oppo.z_star.norm() > 0.5  # randn · 2 at init
    obs, act, mask = torch.randn(2, 5, 4), torch.randint(6, (2, 5)), torch.ones(2, 5)
    oppo.step(2, (obs, act, mask), ((obs, act, mask), (obs.flip(0), act.flip(0), mask), T([1.0, 0.0])),
              torch.Generator().manual_seed(0))
    assert oppo.z_star.norm().item() == pytest.approx(0.5, abs=1e-6)


def _tiny_dataset() -> Dataset:
    trajs = [Trajectory("x", np.zeros((2, 3), np.float32), np.array([0, 1]), 1.0, "expert", "L1"),
             Trajectory("y", np.ones((1, 3), np.float32), np.array([5]), None)]
    return Dataset(trajs, [(0, 1, 1.0), (1, 0, 0.5)], {"env": "none"})


def test_dataset_round_trip(tmp_path):
    save_dataset(_tiny_dataset(), tmp_path)
    ds = load_dataset(tmp_path)
    assert [t.id for t in ds.trajectories] == ["x", "y"] and ds.pairs == [(0, 1, 1.0), (1, 0, 0.5)]
    assert ds.trajectories[0].ret == 1.0 and ds.trajectories[1].ret is None and ds.obs_dim == 3
    assert np.array_equal(ds.trajectories[1].actions, [5]) and ds.meta == {"env": "none"}


@pytest.mark.parametrize("line, message", [
    ({"id": "z", "observations": [[0, 0, 0]]}, "trajectories.jsonl:3: missing field 'actions'"),
    ({"id": "z", "observations": [[0, 0, 0]], "actions": [1, 2]}, "trajectories.jsonl:3: 'observations' has 1 rows"),
    ({"id": "z", "observations": [[0, 0]], "actions": [1]}, "trajectories.jsonl:3: 'observations' rows must all"),
    ({"id": "z", "observations": [[0, 0, 0]], "actions": [6]}, "trajectories.jsonl:3: 'actions' must be integers"),
    ({"id": "x", "observations": [[0, 0, 0]], "actions": [1]}, "trajectories.jsonl:3: id 'x' repeats"),
    ({"id": "z", "observations": [[0, 0, 0]], "actions": [1], "reward": 1}, "trajectories.jsonl:3: unknown field"),
])
def test_malformed_trajectory_is_one_line_naming_it(tmp_path, line, message):
    save_dataset(_tiny_dataset(), tmp_path)
    with open(tmp_path / "trajectories.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    with pytest.raises(OutriderError, match=message.replace("(", r"\(")) as e:
        load_dataset(tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("line, message", [
    ({"a": "x", "b": "y"}, "pairs.jsonl:3: missing field 'preferred'"),
    ({"a": "x", "b": "w", "preferred": "a"}, "pairs.jsonl:3: 'b' names no trajectory"),
    ({"a": "x", "b": "y", "preferred": 1}, "pairs.jsonl:3: 'preferred' must be"),
])
def test_malformed_pair_is_one_line_naming_it(tmp_path, line, message):
    save_dataset(_tiny_dataset(), tmp_path)
    with open(tmp_path / "pairs.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    with pytest.raises(OutriderError, match=message):
        load_dataset(tmp_path)


def test_generated_labels_follow_returns_and_eval_layouts_are_disjoint():
    ds = generate("MiniGrid-DoorKey-5x5-v0", {"expert": (3, 0.0), "random": (3, 1.0)}, 30, 0.0, 20, seed=0)
    rets = [t.ret for t in ds.trajectories]
    assert all(r > 0 for r in rets[:3]) and ds.meta["flipped"] == 0
    for i, j, p in ds.pairs:
        assert p == (0.5 if rets[i] == rets[j] else float(rets[i] > rets[j]))
    noisy = generate("MiniGrid-DoorKey-5x5-v0", {"expert": (3, 0.0), "random": (3, 1.0)}, 30, 0.5, 20, seed=0)
    assert noisy.meta["flipped"] > 0  # the same trajectories and pairs, some labels flipped
    train = {layout_id(_reset(make_env("MiniGrid-DoorKey-5x5-v0", "train"), s)) for s in range(300)}
    held = {layout_id(_reset(make_env("MiniGrid-DoorKey-5x5-v0", "eval"), s)) for s in range(100)}
    assert train and held and not train & held and {t.layout for t in ds.trajectories} <= train


def _reset(tenv, seed):
    tenv.reset(seed)
    return tenv.env


SMALL = ["data.env=MiniGrid-DoorKey-5x5-v0", "data.expert=3", "data.noisy=3", "data.random=3", "data.pairs=20",
         "data.horizon=20", "steps=30", "batch=4", "pair_batch=4", "hidden=8", "reward_steps=20",
         "eval_episodes=3", "eval_every=0", "checkpoint_every=20"]


@pytest.mark.parametrize("method", ["oppo", "bt_filtered_bc"])
def test_cut_run_resumes_bit_identically(tmp_path, method):
    cfg = load_config(None, SMALL + [f"method={method}"])
    full = run(cfg, tmp_path / "full")
    assert run(cfg, tmp_path / "cut", stop_after=30 - 5) == {}  # the newest checkpoint is step 20
    resumed = run(cfg, tmp_path / "cut", resume=True)
    drop = ("train_s_per_step", "data_s")
    assert {k: v for k, v in full.items() if k not in drop} == {k: v for k, v in resumed.items() if k not in drop}
    last = f"checkpoints/step_{full['steps']}.pt"  # bt_filtered_bc: 20 reward steps + 30 cloning steps
    a = torch.load(tmp_path / "full" / last, weights_only=False)["learner"]
    b = torch.load(tmp_path / "cut" / last, weights_only=False)["learner"]
    for part in ("policy",) + (("encoder",) if method == "oppo" else ("reward",)):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    if method == "oppo":
        assert torch.equal(a["z_star"], b["z_star"])

    def rows(d):
        return [{k: v for k, v in r.items() if not k.startswith("time/")}
                for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
    assert rows(tmp_path / "full") == rows(tmp_path / "cut")


def test_cli_bad_input_is_one_line(tmp_path, monkeypatch, capsys):
    from outrider.cli import main

    for given, message in ((f"data.path={tmp_path / 'nowhere'}", "data.path: no such file"), ("method=cql", "method")):
        monkeypatch.setattr(sys, "argv", ["outrider", "offline", "train", "--out", str(tmp_path / "r"), "--set", given])
        with pytest.raises(SystemExit) as e:
            main()
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and message in err


def _offline_yaml(path, method):
    data = {"method": method, "data": {}}
    for item in SMALL:
        key, value = item.split("=")
        node, *rest = key.split(".")
        if rest:
            data[node][rest[0]] = yaml.safe_load(value)
        else:
            data[key] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(data))
    return path


def test_compare_plans_offline_configs_beside_recipes(tmp_path, monkeypatch, capsys):
    from conftest import call_main, tiny_recipe
    from outrider import compare as compare_mod

    rl = tmp_path / "tiny.yaml"
    rl.write_text(yaml.safe_dump(tiny_recipe()))
    bt = _offline_yaml(tmp_path / "bt.yaml", "bt_filtered_bc")
    jobs = compare_mod.plan([rl, bt], 2, tmp_path / "c", [], resume=False)
    assert [(j.kind, j.total_steps) for j in jobs] == [("rl", tiny_recipe()["train"]["steps"])] * 2 + [
        ("offline", 30 + 20)] * 2
    cmd = " ".join(compare_mod._command(jobs[3], ["steps=5"], 2))
    assert "-m outrider.cli offline train" in cmd and cmd.endswith("--set steps=5 --set seed=1 --set threads=2")
    code, _, err = call_main(monkeypatch, capsys, "compare", str(bt), "--out", str(tmp_path / "d"),
                             "--set", "method=cql")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "method" in err and not (tmp_path / "d").exists()


def test_compare_runs_offline_configs_end_to_end(tmp_path):
    import subprocess

    from conftest import cli_env

    paths = [str(_offline_yaml(tmp_path / f"{m}.yaml", m)) for m in ("bc", "oppo")]
    result = subprocess.run([sys.executable, "-m", "outrider", "compare", *paths, "--seeds", "1", "--jobs", "2",
                             "--threads", "1", "--out", str(tmp_path / "c")], cwd=tmp_path, env=cli_env(),
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["failed"] == [] and {g: v["n"] for g, v in summary["groups"].items()} == {"bc": 1, "oppo": 1}
    assert "eval/success" in summary["metrics"] and summary["recipe_diff"]["method"] == {"bc": "bc", "oppo": "oppo"}
    saved = json.loads((tmp_path / "c" / "oppo" / "seed0" / "config.json").read_text())
    assert saved["seed"] == 0 and saved["threads"] == 1
    ours = json.loads((tmp_path / "c" / "bc" / "seed0" / "summary.json").read_text())
    alone = run(load_config(paths[0], ["seed=0"]), tmp_path / "alone")  # the same run outside compare
    assert ours["eval/success"] == alone["eval/success"] and ours["eval/return"] == alone["eval/return"]
