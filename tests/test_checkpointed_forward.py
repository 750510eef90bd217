"""Gradient checkpointing on outrider's own training forwards: the unpadded rows and the shared-prefix packed
layout (`policy.unpadded`, `policy.shared_prefix`) stay in use under `policy.gradient_checkpointing`, with the
same gradients as without it and fewer tensors kept for the backward pass, on Llama and Qwen2 models with and
without LoRA."""

from __future__ import annotations

import pytest
import torch

from outrider.policy import shared_prefix, unpadded
from outrider.policy.adapters import LoraConfig, add_lora
from outrider.policy.model import Policy
from outrider.policy.random_model import write_model_dir

ARCHS = ["llama", "qwen2"]
# two groups of three rows sharing a 4-token prefix, with padding: the packed layout (with groups) and the
# unpadded rows (without) both apply
LENGTHS = [9, 7, 6, 8, 5, 9]
PREFIX = [[5, 9, 40, 41], [120, 3, 8, 17]]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gc")
    return {a: write_model_dir(root / a, a, hidden=32, layers=3, heads=4, kv_heads=2 if a == "qwen2" else None,
                               vocab_size=320, max_positions=64) for a in ARCHS}


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    T = max(LENGTHS)
    ids = torch.randint(20, 300, (len(LENGTHS), T), generator=gen)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    for row, g in enumerate(groups.tolist()):
        ids[row, :4] = torch.tensor(PREFIX[g])
    mask = (torch.arange(T)[None] < torch.tensor(LENGTHS)[:, None]).long()
    return ids * mask, mask, groups


def _policy(path, lora: bool, checkpointing: bool) -> Policy:
    policy = Policy.load(path, chat_template=False)
    if lora:
        add_lora(policy, LoraConfig(r=4, alpha=8, target_modules="all-linear"), seed=0)
        with torch.no_grad():  # B = 0 at the start: move it, so the adapters' gradients reach A too
            for name, p in policy.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    if checkpointing:
        policy.enable_gradient_checkpointing()
    return policy.eval()  # the learner scores in eval mode: checkpointing must still apply


def _run(policy: Policy, grouped: bool, monkeypatch) -> tuple[list[torch.Tensor], int, list[str]]:
    ids, mask, groups = _batch()
    paths: list[str] = []
    for module, name in ((unpadded, "forward"), (shared_prefix, "_forward_packed")):
        original = getattr(module, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            paths.append(_name)
            return _original(*args, **kwargs)
        monkeypatch.setattr(module, name, spy)
    count = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        scores = policy.score(ids, mask, entropy=True, groups=groups if grouped else None)
        loss = (scores.logprobs * mask).sum() + 0.1 * (scores.entropy * mask).sum()
    loss.backward()
    monkeypatch.undo()
    grads = [p.grad.clone() for p in policy.model.parameters() if p.grad is not None]
    return grads, count[0], paths


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("grouped", [False, True], ids=["unpadded", "packed"])
def test_checkpointing_keeps_the_unpadded_forward_and_its_gradients(model_dirs, monkeypatch, arch, lora, grouped):
    plain = _run(_policy(model_dirs[arch], lora, checkpointing=False), grouped, monkeypatch)
    checkpointed = _run(_policy(model_dirs[arch], lora, checkpointing=True), grouped, monkeypatch)
    expected = ["_forward_packed", "forward"] if grouped else ["forward"]
    assert plain[2] == expected and checkpointed[2] == expected  # not the padded HF forward
    assert checkpointed[1] < plain[1] / 2, (plain[1], checkpointed[1])  # the layers' activations were not kept
    assert len(plain[0]) == len(checkpointed[0]) > 0
    if lora:
        assert len(plain[0]) < sum(1 for _ in _policy(model_dirs[arch], True, False).model.parameters())
    for g0, g1 in zip(plain[0], checkpointed[0]):
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-5)


def test_recomputation_runs_under_the_forwards_attention(model_dirs):
    """The model's attention outside the forward is its own again, and a later plain forward is unaffected."""
    policy = _policy(model_dirs["llama"], lora=False, checkpointing=True)
    before = policy.model.config._attn_implementation
    ids, mask, groups = _batch()
    policy.score(ids, mask, groups=groups).logprobs.sum().backward()
    assert policy.model.config._attn_implementation == before
    with torch.no_grad():
        dense = policy.model(input_ids=ids[:1, :LENGTHS[0]]).logits.log_softmax(-1)
        ours = policy.score(ids[:1, :LENGTHS[0]], mask[:1, :LENGTHS[0]]).logprobs
    picked = dense[0, :-1].gather(-1, ids[0, 1:LENGTHS[0], None]).squeeze(-1)
    torch.testing.assert_close(ours[0, 1:], picked, rtol=1e-5, atol=1e-5)
