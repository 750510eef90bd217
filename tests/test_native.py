"""The C kernels (outrider/policy/native) against the PyTorch ops they replace, and their fallbacks."""

from __future__ import annotations

import logging

import pytest
import torch

from outrider.errors import OutriderError
from outrider.policy import native

lib = native.kernels()
needs_kernel = pytest.mark.skipif(lib is None, reason="the native kernels do not build on this machine")


def reference(qkv, cos, sin, positions, keys, values, bias, start, first, heads, scale):
    """RoPE, the KV write and causal attention with PyTorch ops, as the lean decoder's PyTorch path does them."""
    B, S, _ = qkv.shape
    kv, D = keys.shape[1], keys.shape[3]
    half = D // 2
    x = qkv.view(B, S, heads + 2 * kv, D)
    qk = x[:, :, :heads + kv]
    qk = qk * cos[positions][:, :, None] + torch.cat((qk[..., half:], qk[..., :half]), -1) * sin[positions][:, :, None]
    keys[:, :, start:start + S] = qk[:, :, heads:].transpose(1, 2)
    values[:, :, start:start + S] = x[:, :, heads + kv:].transpose(1, 2)
    end = start + S
    q = qk[:, :, :heads].transpose(1, 2) * scale  # [B, H, S, D]
    k = keys[:, :, :end].repeat_interleave(heads // kv, dim=1)
    v = values[:, :, :end].repeat_interleave(heads // kv, dim=1)
    scores = q @ k.transpose(-1, -2)
    causal = torch.ones(S, end, dtype=torch.bool).tril(start)
    scores = scores.masked_fill(~causal, float("-inf"))
    if bias is not None:
        scores = scores + bias[:, None, None, :end]
    weights = torch.softmax(scores, -1).nan_to_num()  # a query that sees no key: zeros, as the kernel
    return (weights @ v).transpose(1, 2)[:, first:].reshape(B, S - first, heads * D)


def operands(B=3, S=5, heads=4, kv=2, D=8, L=12, start=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = 20
    return dict(qkv=torch.randn(B, S, (heads + 2 * kv) * D, generator=g), cos=torch.randn(P, D, generator=g),
                sin=torch.randn(P, D, generator=g), positions=torch.randint(0, P, (B, S), generator=g),
                keys=torch.randn(B, kv, L, D, generator=g), values=torch.randn(B, kv, L, D, generator=g))


@needs_kernel
@pytest.mark.parametrize("S, start, first", [(1, 7, 0), (5, 0, 0), (5, 0, 4), (3, 4, 1)])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("D", [8, 32, 64, 128])
def test_kernel_equals_the_pytorch_ops(S, start, first, padded, D):
    """Decoding steps (S = 1) and prefills (start 0, and the last-layer case first = S - 1), grouped-query heads,
    a scale, and left padding as an additive -inf bias (row 1 fully padded up to slot 2: its first queries see
    no key at all); the head sizes the kernel specialises (32, 64, 128) and a generic one, with key counts that
    leave a remainder after its blocks of four."""
    ops = operands(S=S, start=start, D=D)
    bias = None
    if padded:
        bias = torch.zeros(3, 12)
        bias[1, :3] = float("-inf")
        bias[2, :1] = float("-inf")
    k_ref, v_ref = ops["keys"].clone(), ops["values"].clone()
    expected = reference(ops["qkv"], ops["cos"], ops["sin"], ops["positions"], k_ref, v_ref, bias, start, first,
                         heads=4, scale=0.5)
    got = native.attention(lib, ops["qkv"], ops["cos"], ops["sin"], ops["positions"], ops["keys"], ops["values"],
                           bias, start, first, heads=4, scale=0.5)
    assert got.shape == (3, S - first, 4 * D)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops["keys"], k_ref, atol=1e-6, rtol=1e-6)  # the new slots, and nothing else
    torch.testing.assert_close(ops["values"], v_ref, atol=0, rtol=0)


@needs_kernel
def test_kernels_refuse_operands_they_cannot_read():
    """Strided or non-float32 operands get a clear error, never a wrong read of their memory."""
    ops = operands()
    with pytest.raises(ValueError, match="contiguous"):
        native.attention(lib, ops["qkv"][:, ::2], ops["cos"], ops["sin"], ops["positions"][:, ::2], ops["keys"],
                         ops["values"], None, 0, 0, heads=4, scale=1.0)
    with pytest.raises(ValueError, match="float32"):
        native.attention(lib, ops["qkv"].double(), ops["cos"], ops["sin"], ops["positions"], ops["keys"],
                         ops["values"], None, 0, 0, heads=4, scale=1.0)
    with pytest.raises(ValueError, match="float32"):
        native.draw(lib, torch.randn(2, 5, dtype=torch.float64), 1.0, torch.rand(2, 1))
    with pytest.raises(ValueError, match="float32"):
        native.add_rms(lib, torch.randn(2, 4), torch.randn(2, 4, dtype=torch.float64), 1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        native.silu_mul(lib, torch.randn(4, 6).t())


def test_switched_off_or_without_a_compiler_the_callers_keep_pytorch(monkeypatch, caplog):
    monkeypatch.setenv("OUTRIDER_NATIVE", "0")
    assert native.kernels() is None
    monkeypatch.setenv("OUTRIDER_NATIVE", "auto")
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_compiler", lambda: None)
    with caplog.at_level(logging.INFO, logger="outrider.policy.native"):
        assert native.kernels() is None
    assert "no C compiler" in caplog.text
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("OUTRIDER_NATIVE", "1")
    with pytest.raises(OutriderError, match="OUTRIDER_NATIVE=1: building the native kernels failed"):
        native.kernels()


def test_a_build_is_cached_and_rebuilt_into_a_fresh_directory(monkeypatch, tmp_path):
    """The library lands in $XDG_CACHE_HOME/outrider/native under a hashed name; a second load reuses it."""
    cc = native._compiler()
    if cc is None or native.kernels() is None:
        pytest.skip("no working C compiler")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = native._build(cc)
    assert first.parent == tmp_path / "outrider" / "native" and first.suffix == ".so"
    mtime = first.stat().st_mtime_ns
    assert native._build(cc) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary file left behind


def log_softmax_at(logits, token):
    return torch.log_softmax(logits, -1).gather(-1, token[:, None])[:, 0]


@needs_kernel
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_draw_equals_the_pytorch_draw(temperature):
    """Same tokens as `draw.draw_with_stats` for the same uniforms (the same inverse-CDF rule), the same log-probs
    and entropies; a token of probability 0 (logit -inf) is never drawn, even at u just below 1."""
    from outrider.policy.draw import draw_with_stats

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g) * 3
    logits[:, -5:] = float("-inf")  # the last tokens can't be drawn
    uniform = torch.rand(64, 1, generator=g)
    uniform[:4] = torch.tensor([[0.0], [1 - 2 ** -24], [0.5], [1 - 2 ** -20]])
    token, logprob, entropy = native.draw(lib, logits, temperature, uniform)
    ref_token, _, ref_entropy = draw_with_stats(logits, temperature, uniform)
    # rows 1 and 3 sit within rounding of the total mass, where the two summation orders may pick neighbours
    assert token[[0, 2] + list(range(4, 64))].tolist() == ref_token[[0, 2] + list(range(4, 64))].tolist()
    assert int(token.max()) < 45
    torch.testing.assert_close(logprob, log_softmax_at(logits / temperature, token), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_draw_of_a_strided_view_reads_its_rows():
    logits = torch.randn(8, 3, 20)[:, -1]  # rows 60 floats apart, as the HF path's logits[:, -1]
    uniform = torch.rand(8, 1)
    assert native.draw(lib, logits, 1.0, uniform)[0].tolist() == native.draw(lib, logits.clone(), 1.0,
                                                                             uniform)[0].tolist()


@needs_kernel
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_adds_in_place_and_normalises(with_residual):
    g = torch.Generator().manual_seed(1)
    h, y = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    expected_h = h + y if with_residual else h.clone()
    eps = 16 * 1e-6
    out = native.add_rms(lib, h, y if with_residual else None, eps)
    torch.testing.assert_close(h, expected_h, atol=0, rtol=0)
    # the unit RMSNorm: h / sqrt(Σh² + H·ε) = rsqrt(mean(h²) + ε)·h / √H
    expected = expected_h * torch.rsqrt(expected_h.pow(2).mean(-1, keepdim=True) + 1e-6) / 16 ** 0.5
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


@needs_kernel
def test_silu_mul_of_the_fused_gate_up():
    gate_up = torch.randn(3, 2, 24, generator=torch.Generator().manual_seed(2)) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(native.silu_mul(lib, gate_up), torch.nn.functional.silu(gate) * up,
                               atol=1e-5, rtol=1e-5)
