"""OPPO [38] with the tiny LM policy (outrider.offline.text): prefix injection and action positions, the encoder's
pooling over padding, the HIM loss on a 2-trajectory batch by hand, text datasets, the generated bandit data and
its held-out split, config errors, and resume (in-process cut, and a real `outrider offline train` killed with
SIGKILL)."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

from conftest import finish, run_cli, start_cli
from outrider.errors import OutriderError
from outrider.offline import text
from outrider.offline.oppo import OPPO
from outrider.offline.run import load_config, run
from outrider.offline.trajectories import Dataset, Trajectory, load_dataset, save_dataset

T = torch.tensor
RECIPE = Path(__file__).resolve().parents[1] / "outrider/recipes/offline/oppo_bandit.yaml"
SMALL = ["lm_hidden=16", "lm_heads=2", "lm_layers=1", "data.expert=6", "data.noisy=6", "data.random=6",
         "data.pairs=30", "batch=4", "pair_batch=4", "eval_episodes=8", "data.env_options.pulls=4"]


def tok():
    return text.tokenizer()


def test_trajectory_ids_and_action_positions_by_hand():
    t = tok()
    ids, pos = text.trajectory_ids(t, ["ab\n", "c\n"], ["1", "2"])
    chars = "ab\n1\nc\n2\n"
    assert ids == [t.bos_token_id] + [t.convert_tokens_to_ids(c) for c in chars]
    assert pos == [4, 8] and ids[4] == t.convert_tokens_to_ids("1") and ids[8] == t.convert_tokens_to_ids("2")
    with pytest.raises(OutriderError, match="one-token actions"):
        text.action_ids(t, ["1", "10"])


class PositionLM(nn.Module):
    """A stand-in LM whose logit of token `hot` at sequence position i is 0.5·i (every other logit 0)."""

    def __init__(self, vocab: int, hot: int):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=3)
        self.emb, self.vocab, self.hot = nn.Embedding(vocab, 3), vocab, hot

    def get_input_embeddings(self) -> nn.Module:
        return self.emb

    def forward(self, inputs_embeds, attention_mask):
        b, length, _ = inputs_embeds.shape
        self.seen = (inputs_embeds, attention_mask)
        logits = torch.zeros(b, length, self.vocab)
        logits[..., self.hot] = 0.5 * torch.arange(length, dtype=torch.float32)
        return SimpleNamespace(logits=logits)


def test_prefix_injection_shapes_positions_and_two_trajectory_loss_by_hand():
    lm = PositionLM(20, hot=7)
    policy = text.TextPolicy(lm, [5, 7], z_dim=2, prefix_tokens=4)
    ids, attn = T([[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 0, 0, 0, 0]]), T([[1.0] * 9, [1.0] * 5 + [0.0] * 4])
    z = T([0.3, -0.2])
    emb, mask = policy.embed(ids, attn, z)
    assert emb.shape == (2, 4 + 9, 3) and mask.shape == (2, 13)
    assert torch.equal(mask[:, :4], torch.ones(2, 4)) and torch.equal(mask[:, 4:], attn)
    assert torch.allclose(emb[0, :4], policy.prefix(z).view(4, 3)) and torch.allclose(emb[1, :4], emb[0, :4])
    assert torch.equal(emb[:, 4:], lm.emb(ids))
    # actions at token positions 4 and 8 (row 0) and 4 (row 1, then padding); candidate 1 (token 7) has logit 0.5·i
    # at sequence position i = p − 1 + 4 (the prefix shifts the text by 4), candidate 0 logit 0
    positions, act, act_mask = T([[4, 8], [4, 0]]), T([[0, 1], [1, 0]]), T([[1.0, 1.0], [1.0, 0.0]])
    logits = policy(ids, attn, positions, z)
    assert logits.shape == (2, 2, 2)
    assert logits[0, :, 1].tolist() == [3.5, 5.5] and logits[0, :, 0].tolist() == [0.0, 0.0]
    ls = nn.functional.logsigmoid
    by_hand = -(ls(T(-3.5)) + ls(T(5.5)) + ls(T(3.5))) / 3
    assert policy.loss((ids, attn, positions, act, act_mask), z).item() == pytest.approx(by_hand.item(), abs=1e-6)
    # no z (BC): no prefix, the logit predicting position p is the one at p − 1
    plain = text.TextPolicy(lm, [5, 7], z_dim=0, prefix_tokens=4)
    assert plain.prefix is None and plain(ids, attn, positions)[0, :, 1].tolist() == [1.5, 3.5]
    assert lm.seen[0].shape == (2, 9, 3)


def test_text_encoder_mean_pools_over_real_tokens_only():
    enc = text.TextEncoder(tok(), 16, 1, 2, 3, seed=0)
    ids = T([[1, 40, 41, 42]])
    alone = enc(ids, torch.ones(1, 4))
    padded = enc(T([[1, 40, 41, 42, 0, 0], [1, 43, 0, 0, 0, 0]]), T([[1.0, 1, 1, 1, 0, 0], [1.0, 1, 0, 0, 0, 0]]))
    assert torch.allclose(padded[0], alone[0], atol=1e-5)
    # the pooled vector is the mean of the per-token hidden states: a head on it is linear
    h = enc.body(input_ids=ids, attention_mask=torch.ones(1, 4)).last_hidden_state
    assert torch.allclose(alone, enc.head(h.mean(1)), atol=1e-6)
    reward = text.TextReward(tok(), 16, 1, 2, seed=0)
    assert reward(ids, torch.ones(1, 4), ids).shape == (1,)


def _text_dataset() -> Dataset:
    trajs = [Trajectory("x", ["K2 H2\n", "1:1\n"], ["1", "1"], 1.6, "expert", "bandit:3"),
             Trajectory("y", ["K2 H2\n"], ["2"], None)]
    return Dataset(trajs, [(0, 1, 1.0)], {"env": "bandit"})


def test_text_dataset_round_trip_and_errors(tmp_path):
    save_dataset(_text_dataset(), tmp_path)
    ds = load_dataset(tmp_path)
    assert ds.is_text and ds.trajectories[0].observations == ["K2 H2\n", "1:1\n"]
    assert ds.trajectories[1].actions == ["2"] and ds.pairs == [(0, 1, 1.0)]
    ids, attn, pos, act, mask = text.text_tensors(ds, tok(), ["1", "2"])
    assert ids.shape == (2, 15) and attn[1].sum() == 9 and pos.tolist() == [[7, 13], [7, 0]]
    assert act.tolist() == [[0, 0], [1, 0]] and mask.tolist() == [[1, 1], [1, 0]]
    with pytest.raises(OutriderError, match="trajectory 'y' has action '2'"):
        text.text_tensors(ds, tok(), ["1"])
    lines = (tmp_path / "trajectories.jsonl").read_text().splitlines()
    (tmp_path / "trajectories.jsonl").write_text(lines[0] + "\n" + json.dumps(
        {"id": "z", "observations": [[0.0]], "actions": [0]}) + "\n")
    with pytest.raises(OutriderError, match=r"trajectories.jsonl:2: 'observations' must be strings"):
        load_dataset(tmp_path)


def test_generated_bandit_labels_follow_returns_and_eval_bandits_are_held_out():
    sources = {"expert": (20, 0.0), "random": (20, 1.0)}
    ds = text.generate_bandit({"pulls": 12}, sources, 200, 0.0, seed=1)
    rets = {t.id: t.ret for t in ds.trajectories}
    for i, j, p in ds.pairs:
        ri, rj = ds.trajectories[i].ret, ds.trajectories[j].ret
        assert p == (0.5 if math.isclose(ri, rj) else float(ri > rj))
    assert ds.meta["mean_return"]["expert"] > ds.meta["mean_return"]["random"] + 1
    assert len(rets) == 40 and all(len(t.actions) == 12 for t in ds.trajectories)
    layouts = {t.layout for t in ds.trajectories}
    from outrider.envs.bandit import BanditConfig, BanditEnv

    env = BanditEnv(BanditConfig(), "eval")
    assert all(text.bandit_layout(env, e) not in layouts for e in range(100))
    noisy = text.generate_bandit({"pulls": 12}, sources, 200, 0.2, seed=1)
    assert noisy.meta["flipped"] > 0 and [t.actions for t in noisy.trajectories] == [t.actions for t in ds.trajectories]


def test_config_errors_are_one_line(tmp_path):
    with pytest.raises(OutriderError, match="policy lm needs a text env"):
        load_config(None, ["policy=lm"])
    with pytest.raises(OutriderError, match="set policy: lm"):
        load_config(None, ["data.env=bandit"])
    cfg = load_config(str(RECIPE), [*SMALL, "data.env_options.arms=1"])
    with pytest.raises(OutriderError, match="data.env_options.arms"):
        run(cfg, tmp_path / "r")


def test_oppo_text_alternation_and_z_star_used_at_test_time():
    cfg = load_config(str(RECIPE), SMALL)
    ds = text.generate_bandit(cfg.data.env_options, {"expert": (4, 0.0), "random": (4, 1.0)}, 10, 0.0, seed=0)
    learner = text.build(cfg, tok(), ["1", "2"])
    assert isinstance(learner, OPPO) and learner.policy.k == 4
    tensors = text.text_tensors(ds, tok(), ["1", "2"])
    batch = tuple(x[:4] for x in tensors)
    pol0 = {k: v.clone() for k, v in learner.policy.state_dict().items()}
    z0 = learner.z_star.detach().clone()
    m = learner.step(2, batch, (batch, tuple(x[4:] for x in tensors), T([1.0, 0.0, 0.5, 1.0])),
                     torch.Generator().manual_seed(0))
    assert "oppo/him" not in m and not torch.equal(learner.z_star.detach(), z0)
    assert all(torch.equal(pol0[k], v) for k, v in learner.policy.state_dict().items())
    learner.step(1, batch, (batch, tuple(x[4:] for x in tensors), T([1.0, 0.0, 0.5, 1.0])),
                 torch.Generator().manual_seed(0))
    assert any(not torch.equal(pol0[k], v) for k, v in learner.policy.state_dict().items())
    assert learner.policy.prefix.weight.grad is not None  # z reaches the policy through the prefix


@pytest.mark.parametrize("method", ["oppo", "bt_filtered_bc"])
def test_text_cut_run_resumes_bit_identically(tmp_path, method):
    cfg = load_config(str(RECIPE), [*SMALL, f"method={method}", "steps=8", "reward_steps=4", "checkpoint_every=4",
                                    "eval_every=4"])
    full = run(cfg, tmp_path / "full")
    assert run(cfg, tmp_path / "cut", stop_after=6) == {}
    resumed = run(cfg, tmp_path / "cut", resume=True)
    drop = ("train_s_per_step", "data_s")
    assert {k: v for k, v in full.items() if k not in drop} == {k: v for k, v in resumed.items() if k not in drop}
    assert_same_state(tmp_path / "full", tmp_path / "cut", cfg.steps + (4 if method == "bt_filtered_bc" else 0))


def assert_same_state(a: Path, b: Path, steps: int) -> None:
    """The final checkpoints' every tensor is equal, and so is every logged metric but the timings."""
    sa, sb = (torch.load(d / "checkpoints" / f"step_{steps}.pt", weights_only=False) for d in (a, b))

    def flat(x, prefix=""):
        if isinstance(x, dict):
            for k, v in x.items():
                yield from flat(v, f"{prefix}/{k}")
        elif isinstance(x, (list, tuple)):
            for k, v in enumerate(x):
                yield from flat(v, f"{prefix}/{k}")
        else:
            yield prefix, x

    fa, fb = dict(flat(sa)), dict(flat(sb))
    assert fa.keys() == fb.keys()
    for k in fa:
        if isinstance(fa[k], torch.Tensor):
            assert torch.equal(fa[k], fb[k]), k
        else:
            assert fa[k] == fb[k], k
    rows = [[{k: v for k, v in r.items() if not k.startswith("time/")} for r in map(json.loads, (d / "metrics.jsonl")
             .read_text().splitlines())] for d in (a, b)]
    assert rows[0] == rows[1] and [r["step"] for r in rows[1]] == sorted({r["step"] for r in rows[1]})


@pytest.mark.slow  # two real processes and a reference run, 20-60 s on a shared 2-core machine
def test_offline_train_killed_with_sigkill_resumes_like_an_uninterrupted_run(tmp_path):
    """A real `outrider offline train` process, SIGKILLed once a checkpoint exists (and before it finishes), then
    `--resume`d, ends with the state and metrics of the same config run without a kill (the offline analogue of
    `killed_run_resumes_like` in tests/test_resume.py, whose checks are the RL trainer's files)."""
    sets = [*SMALL, "steps=60", "checkpoint_every=5", "eval_every=0"]
    config = tmp_path / "oppo.yaml"
    config.write_text(yaml.safe_dump(yaml.safe_load(RECIPE.read_text())))
    run(load_config(str(config), sets), tmp_path / "A")
    args = ["offline", "train", config, "--out", tmp_path / "B", *[x for s in sets for x in ("--set", s)]]
    proc = start_cli(args, tmp_path)
    killed, deadline = False, time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if any(int(p.stem.split("_")[1]) >= 10 for p in (tmp_path / "B" / "checkpoints").glob("step_*.pt")):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            killed = True
            break
        time.sleep(0.001)
    first = finish(proc)
    assert killed and first.returncode == -signal.SIGKILL, first.stderr
    assert not (tmp_path / "B" / "summary.json").exists(), "killed, but the run had finished"
    second = run_cli([*args, "--resume"], tmp_path)
    assert second.returncode == 0 and "Traceback" not in second.stderr, second.stderr
    assert_same_state(tmp_path / "A", tmp_path / "B", 60)
