"""A lean decoding step for Llama-family HF models (llama, qwen2, mistral): the same math as the HF forward with
the per-token overhead removed — fused q/k/v and gate/up projections, a preallocated static KV buffer written in
place, one attention call per layer, and no cache objects or mask builders in the loop.

It reads the HF model's own weights (rebuilt per sampling call, so it always sees the current policy) and uses the
model's own rotary-embedding module, so RoPE variants the config selects are honoured. Anything else (other
architectures, sliding windows, non-SiLU MLPs) falls back to the HF path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED = {"llama", "qwen2", "mistral"}


def supports(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    if cfg is None or cfg.model_type not in SUPPORTED:
        return False
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "use_sliding_window", False):
        return False
    if cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None):
        return False
    # the fused projections below carry no MLP biases (q/k/v biases of Qwen2 are handled)
    if getattr(cfg, "mlp_bias", False):
        return False
    return True


def _rms(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # the HF formula (float32 statistics, weight applied after the cast back)
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class FastDecoder:
    """Prefill a left-padded batch once, then decode one token per call against a static KV buffer."""

    def __init__(self, model: nn.Module, batch: int, max_len: int):
        cfg = model.config
        core = model.model
        self.embed = core.embed_tokens.weight
        self.rotary = core.rotary_emb
        self.norm_w, self.eps = core.norm.weight, core.norm.variance_epsilon
        self.lm_head = model.lm_head.weight
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.scaling = self.head_dim ** -0.5
        self.layers = []
        for layer in core.layers:
            att, mlp = layer.self_attn, layer.mlp
            projections = (att.q_proj, att.k_proj, att.v_proj)
            w_qkv = torch.cat([p.weight for p in projections])
            b_qkv = (torch.cat([p.bias if p.bias is not None else torch.zeros(p.out_features, dtype=w_qkv.dtype,
                                                                               device=w_qkv.device)
                                for p in projections]) if any(p.bias is not None for p in projections) else None)
            self.layers.append((layer.input_layernorm.weight, w_qkv, b_qkv, att.o_proj.weight, att.o_proj.bias,
                                layer.post_attention_layernorm.weight,
                                torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), mlp.down_proj.weight))
        dtype, device = self.embed.dtype, self.embed.device
        shape = (batch, self.kv_heads, max_len, self.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.gqa = self.kv_heads != self.heads

    def _forward(self, ids: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        B, S = ids.shape
        h = F.embedding(ids, self.embed)
        cos, sin = self.rotary(h, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        start, end = self.length, self.length + S
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for i, (w_in, w_qkv, b_qkv, w_o, b_o, w_post, w_gu, w_down) in enumerate(self.layers):
            qkv = F.linear(_rms(h, w_in, self.eps), w_qkv, b_qkv)
            q = qkv[..., :q_size].view(B, S, self.heads, self.head_dim).transpose(1, 2)
            k = qkv[..., q_size:q_size + kv_size].view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
            v = qkv[..., q_size + kv_size:].view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.k[i][:, :, start:end] = k
            self.v[i][:, :, start:end] = v
            keys, values = self.k[i][:, :, :end], self.v[i][:, :, :end]
            if self.gqa:
                rep = self.heads // self.kv_heads
                keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
            att = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling)
            h = h + F.linear(att.transpose(1, 2).reshape(B, S, q_size), w_o, b_o)
            gate, up = F.linear(_rms(h, w_post, self.eps), w_gu).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, w_down)
        self.length = end
        return F.linear(_rms(h[:, -1], self.norm_w, self.eps), self.lm_head)

    def prefill(self, input_ids: Tensor, attention: Tensor) -> Tensor:
        """`input_ids` [B, W] left-padded, `attention` [B, W]; returns the last position's logits [B, V]."""
        B, W = input_ids.shape
        self.valid[:, :W] = attention.bool()
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(W, W, dtype=torch.bool, device=input_ids.device).tril()
        # padded queries may see themselves, so no attention row is empty (their outputs are never used)
        mask = (causal & self.valid[:, None, None, :W]) | torch.eye(W, dtype=torch.bool, device=input_ids.device)
        self._next_position = positions[:, -1:] + 1
        return self._forward(input_ids, positions, mask)

    def step(self, tokens: Tensor, live: Tensor) -> Tensor:
        """Feed one token per row (`live` rows are real); returns the next logits [B, V]."""
        t = self.length
        self.valid[:, t] = live
        mask = self.valid[:, None, None, : t + 1]
        positions = self._next_position
        self._next_position = positions + 1
        return self._forward(tokens.unsqueeze(-1), positions, mask)
