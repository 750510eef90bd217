"""oneDNN's packed fp32 linear (the lean decoder's matmul on x86): the same numbers as `F.linear`, any number of
rows, and a fallback where it is missing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from outrider.policy import fast_decode, kept_memory, onednn
from outrider.policy.model import Policy

needs_onednn = pytest.mark.skipif(not onednn.available(), reason="this torch build has no oneDNN")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 7, 64, 1088])
def test_packed_linear_equals_f_linear_for_any_row_count(rows):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    packed = onednn.pack(w, batch=64)  # the hint need not match the rows
    x = torch.randn(rows, 32, generator=g)
    torch.testing.assert_close(onednn.linear(x, packed, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    x3 = torch.randn(2, rows, 32, generator=g)[:, :, :]  # [..., in] inputs, as the decoder passes them
    torch.testing.assert_close(onednn.linear(x3, packed), F.linear(x3, w), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_packing_copies_the_weight():
    w = torch.randn(8, 4)
    packed = onednn.pack(w, batch=2)
    x = torch.randn(3, 4)
    before = onednn.linear(x, packed)
    w.mul_(2)
    torch.testing.assert_close(onednn.linear(x, packed), before)


def test_plain_weights_take_f_linear():
    w, x = torch.randn(6, 4), torch.randn(3, 4)
    torch.testing.assert_close(onednn.linear(x, w), F.linear(x, w), rtol=0, atol=0)


@needs_onednn
def test_only_calls_that_multiply_enough_rows_pack_their_weights():
    """Packing costs about 0.2 ms a weight: a short call (few rows, few tokens) keeps plain weights, and so do
    weights too small for the packed kernel to beat BLAS (`PACK_MIN_NUMEL`), however many rows they multiply."""
    model = Policy.tiny(hidden=128, layers=1, heads=4, seed=0).model.eval()
    long_call = fast_decode.FastDecoder(model, batch=64, max_len=48)
    short_call = fast_decode.FastDecoder(model, batch=4, max_len=24)
    assert long_call.layers[0][6].is_mkldnn  # gate/up: 1024 × 128
    assert not any(w.is_mkldnn for w in (long_call.layers[0][1], long_call.layers[0][3], long_call.layers[0][7],
                                         long_call.lm_head))  # q/k/v 384 × 128, o, down 128 × 512, LM head
    assert not any(w.is_mkldnn for w in (short_call.layers[0][1], short_call.layers[0][6], short_call.lm_head))
    assert onednn.pays(torch.empty(768, 256), rows=64 * 48)
    assert not onednn.pays(torch.empty(1024, 128), rows=8 * 16)
    assert not onednn.pays(torch.empty(384, 128), rows=64 * 48)  # under PACK_MIN_NUMEL
    assert onednn.pays(torch.empty(1024, 128), rows=64 * 48)


def test_only_float32_takes_the_onednn_path():
    assert not onednn.available(torch.bfloat16)
    assert not onednn.available(torch.float16)


def test_the_decoder_uses_onednn_eagerly_and_f_linear_compiled_or_without_it(monkeypatch):
    model = Policy.tiny(hidden=32, layers=1, heads=4, seed=0).model.eval()
    assert fast_decode.FastDecoder(model, 4, 8, compiled=True).linear is F.linear
    expected = onednn.linear if onednn.available() else F.linear
    assert fast_decode.FastDecoder(model, 4, 8).linear is expected
    monkeypatch.setattr(onednn, "available", lambda dtype=torch.float32: False)
    assert fast_decode.FastDecoder(model, 4, 8).linear is F.linear


def test_greedy_decoding_is_the_same_with_and_without_onednn(monkeypatch, pack_every_weight):
    from outrider.policy.sampler import SamplingParams, sample

    policy = Policy.tiny(hidden=32, layers=2, heads=4, seed=0).eval()
    prompts = [[2, 40, 41], [2, 50, 51, 52, 53], [2, 60]]
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True, backend="fast")
    packed = []
    original_pack = onednn.pack
    monkeypatch.setattr(onednn, "pack", lambda w, batch: (packed.append(w.shape), original_pack(w, batch))[1])
    with_onednn = sample(policy, prompts, params, torch.Generator().manual_seed(0))
    assert len(packed) == (9 if onednn.available() else 0)  # 4 per layer and the LM head
    monkeypatch.setattr(onednn, "available", lambda dtype=torch.float32: False)
    without = sample(policy, prompts, params, torch.Generator().manual_seed(0))
    for a, b in zip(with_onednn, without):
        assert a.ids == b.ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_not_taken_off_x86(monkeypatch):
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    onednn._runs.cache_clear()
    try:
        assert not onednn.available()
    finally:
        monkeypatch.undo()
        onednn._runs.cache_clear()


@needs_onednn
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch's own, from flags()
def test_switching_onednn_off_in_torch_is_honoured():
    model = Policy.tiny(hidden=128, layers=1, heads=4, seed=0).model.eval()
    with torch.backends.mkldnn.flags(enabled=False):
        decoder = fast_decode.FastDecoder(model, batch=64, max_len=48)
    assert decoder.linear is F.linear and not decoder.layers[0][6].is_mkldnn


def test_the_availability_check_leaves_the_global_rng_alone():
    onednn._runs.cache_clear()
    torch.manual_seed(0)
    onednn.available()
    after_check = torch.rand(3)
    torch.manual_seed(0)
    torch.testing.assert_close(after_check, torch.rand(3), rtol=0, atol=0)


@needs_onednn
def test_a_finished_calls_packs_are_kept_and_freed_one_per_new_pack(pack_every_weight):
    model = Policy.tiny(hidden=32, layers=2, heads=4, seed=0).model.eval()
    recycler = kept_memory.PACKS
    decoder = fast_decode.FastDecoder(model, batch=4, max_len=8)
    packs = [w for layer in decoder.layers for w in (layer[1], layer[3], layer[6], layer[7])] + [decoder.lm_head]
    assert all(w.is_mkldnn for w in packs)
    del decoder
    assert [id(w) for w in recycler._kept] == [id(w) for w in packs]  # in packing order
    recycler.pack(torch.ones(8, 8), batch=4)
    assert len(recycler._kept) == len(packs) - 1 and recycler._kept[0] is packs[1]
    recycler.keep([torch.empty(kept_memory.MAX_BYTES // 4 + 1)])  # a set too big to keep
    assert not recycler._kept


@needs_onednn
def test_recycled_packs_hold_the_current_weights_and_the_model_is_never_written(pack_every_weight):
    """The next call's packs reuse the last call's memory, never its values; the fold works on the decoder's
    own fused copies, not on the model's parameters."""
    from outrider.policy.sampler import SamplingParams, sample

    policy = Policy.tiny(hidden=32, layers=2, heads=4, seed=0).eval()
    prompts = [[2, 40, 41], [2, 50, 51, 52, 53]]
    params = SamplingParams(temperature=1.0, max_new_tokens=12, ignore_eos=True, backend="fast")
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    sample(policy, prompts, params, torch.Generator().manual_seed(0))
    assert all(torch.equal(v, before[k]) for k, v in policy.model.state_dict().items())
    with torch.no_grad():
        for p in policy.model.parameters():
            p.mul_(-1.5)  # in place, as an optimiser step is
    for prompt, s in zip(prompts, sample(policy, prompts, params, torch.Generator().manual_seed(0))):
        ids = torch.tensor([prompt + s.ids])
        scored = policy.score(ids, torch.ones_like(ids)).logprobs[0, len(prompt):]
        assert s.logprobs == pytest.approx(scored.tolist(), abs=1e-4)
