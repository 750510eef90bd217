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

from outrider.errors import OutriderError
from outrider.policy.draw import draw_with_stats

SUPPORTED = {"llama", "qwen2", "mistral"}
COMPILE_BUCKET = 64  # compiled decoding rounds the KV buffer up to a multiple of this


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
    # RoPE tables are built once per sampling call: a rotary that rescales with the sequence length cannot be
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    return rope.get("rope_type", rope.get("type", "default")) != "dynamic"


def _rms(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # the HF formula (float32 statistics, weight applied after the cast back); fp32 takes the fused kernel
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _decode_step(ids: Tensor, positions: Tensor, t: Tensor, keys: list[Tensor], values: list[Tensor], bias: Tensor,
                 layers: list[tuple], embed: Tensor, norm_w: Tensor, lm_head: Tensor, cos_table: Tensor,
                 sin_table: Tensor, heads: int, kv_heads: int, head_dim: int, eps: float, scaling: float) -> Tensor:
    """One decoding step over the whole static buffer (unwritten slots are masked by `bias`), written for
    `torch.compile`: every shape is fixed for a call, so one compiled graph serves every step."""
    B = ids.shape[0]
    h = F.embedding(ids, embed)
    q_size, kv_size, half = heads * head_dim, kv_heads * head_dim, head_dim // 2
    cos, sin = cos_table[positions].unsqueeze(2), sin_table[positions].unsqueeze(2)
    for i, (w_in, w_qkv, b_qkv, w_o, b_o, w_post, w_gu, w_down) in enumerate(layers):
        qkv = F.linear(_rms(h, w_in, eps), w_qkv, b_qkv)
        qk = qkv[..., :q_size + kv_size].view(B, 1, heads + kv_heads, head_dim)
        qk = torch.addcmul(qk * cos, torch.cat((qk[..., half:], qk[..., :half]), dim=-1), sin)
        keys[i].index_copy_(2, t, qk[:, :, heads:].transpose(1, 2))
        values[i].index_copy_(2, t, qkv[..., q_size + kv_size:].view(B, 1, kv_heads, head_dim).transpose(1, 2))
        grouped = qk[:, :, :heads].reshape(B, kv_heads, heads // kv_heads, head_dim)
        scores = torch.matmul(grouped, keys[i].transpose(-1, -2)) * scaling + bias
        att = torch.matmul(torch.softmax(scores, dim=-1), values[i]).reshape(B, 1, q_size)
        h = h + F.linear(att, w_o, b_o)
        gate, up = F.linear(_rms(h, w_post, eps), w_gu).chunk(2, dim=-1)
        h = h + F.linear(F.silu(gate) * up, w_down)
    return F.linear(_rms(h[:, -1], norm_w, eps), lm_head)


def _decode_and_draw(*args, temperature: float, uniform: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`_decode_step` followed by the plain draw at `temperature` (token, log-prob, entropy), so the draw's
    vocab-sized ops fuse into the same compiled graph."""
    return draw_with_stats(_decode_step(*args), temperature, uniform)


_COMPILED: dict[str, object] = {}


def _compiled_step(fused_draw: bool = False):
    name = "decode_and_draw" if fused_draw else "decode"
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(_decode_and_draw if fused_draw else _decode_step, dynamic=False)
    return _COMPILED[name]


class FastDecoder:
    """Prefill a left-padded batch once, then decode one token per call against a static KV buffer.

    Per decoding step the work is the model's matmuls plus a few fused elementwise ops: RoPE tables are built
    once per call (the model's own rotary module, evaluated at every position the call can reach) and applied to
    q and k together; a single query attends through two batched matmuls (faster on CPU than the SDPA kernel,
    and grouped-query heads share their keys by broadcasting, never copied).
    """

    def __init__(self, model: nn.Module, batch: int, max_len: int, compiled: bool = False):
        cfg = model.config
        self.compiled = compiled
        if compiled:  # few distinct buffer lengths, so few compiled graphs
            max_len = -(-max_len // COMPILE_BUCKET) * COMPILE_BUCKET
        core = model.model
        self.embed = core.embed_tokens.weight
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
        # eager steps read only written slots ([:length]); the compiled step reads the whole buffer under a
        # mask, and a masked NaN of uninitialised memory would still poison its weighted sum: zeros there
        alloc = torch.zeros if compiled else torch.empty
        self.k = [alloc(shape, dtype=dtype, device=device) for _ in self.layers]
        self.v = [alloc(shape, dtype=dtype, device=device) for _ in self.layers]
        # additive attention bias over the buffer: 0 where a key is real, -inf for padding and unwritten slots
        self.bias = torch.full((batch, 1, 1, max_len), float("-inf"), dtype=dtype, device=device)
        self.length = 0
        positions = torch.arange(max_len, device=device)[None]
        cos, sin = core.rotary_emb(self.embed[:1][None], positions)
        half = self.head_dim // 2
        # rotate_half(x)·sin == (x with its halves swapped) · (sin with its first half negated)
        self.cos_table, self.sin_table = cos[0], torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)

    def _rope(self, qk: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """RoPE on q and k heads at once: `qk` [B, S, heads, D], `cos`/`sin` [B, S, 1, D] from the tables."""
        half = self.head_dim // 2
        swapped = torch.cat((qk[..., half:], qk[..., :half]), dim=-1)
        return torch.addcmul(qk * cos, swapped, sin)

    def _attend(self, q: Tensor, i: int, end: int, mask: Tensor | None) -> Tensor:
        keys, values = self.k[i][:, :, :end], self.v[i][:, :, :end]
        B, S = q.shape[0], q.shape[2]
        if mask is not None:  # prefill: a full causal/padding mask, the SDPA kernel handles it
            if self.kv_heads != self.heads:
                rep = self.heads // self.kv_heads
                keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling)
        # one query per row: [B, kv, rep, D] @ [B, kv, D, L] -- query heads of a group share their keys
        grouped = q.reshape(B, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
        scores = torch.matmul(grouped, keys.transpose(-1, -2)).mul_(self.scaling).add_(self.bias[:, :, :, :end])
        out = torch.matmul(torch.softmax(scores, dim=-1), values)
        return out.reshape(B, self.heads, S, self.head_dim)

    def _forward(self, ids: Tensor, positions: Tensor, mask: Tensor | None) -> Tensor:
        B, S = ids.shape
        h = F.embedding(ids, self.embed)
        start, end = self.length, self.length + S
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        cos, sin = self.cos_table[positions].unsqueeze(2), self.sin_table[positions].unsqueeze(2)
        for i, (w_in, w_qkv, b_qkv, w_o, b_o, w_post, w_gu, w_down) in enumerate(self.layers):
            qkv = F.linear(_rms(h, w_in, self.eps), w_qkv, b_qkv)
            qk = self._rope(qkv[..., :q_size + kv_size].view(B, S, self.heads + self.kv_heads, self.head_dim),
                            cos, sin)
            q = qk[:, :, :self.heads].transpose(1, 2)
            self.k[i][:, :, start:end] = qk[:, :, self.heads:].transpose(1, 2)
            self.v[i][:, :, start:end] = qkv[..., q_size + kv_size:].view(B, S, self.kv_heads,
                                                                           self.head_dim).transpose(1, 2)
            att = self._attend(q, i, end, mask)
            h = h + F.linear(att.transpose(1, 2).reshape(B, S, q_size), w_o, b_o)
            gate, up = F.linear(_rms(h, w_post, self.eps), w_gu).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, w_down)
        self.length = end
        return F.linear(_rms(h[:, -1], self.norm_w, self.eps), self.lm_head)

    def prefill(self, input_ids: Tensor, attention: Tensor, rows: Tensor | None = None) -> Tensor:
        """`input_ids` [U, W] left-padded, `attention` [U, W]; returns the last position's logits [B, V].
        `rows` [B] names each batch row's prompt (None: U = B, row i is prompt i); each prompt is computed once."""
        if rows is None:
            return self._prefill(input_ids, attention)
        U, W = input_ids.shape
        full_k, full_v, full_bias = self.k, self.v, self.bias
        self.k = [torch.zeros(U, k.shape[1], W, k.shape[3], dtype=k.dtype, device=k.device) for k in full_k]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.bias = torch.full((U, 1, 1, W), float("-inf"), dtype=full_bias.dtype, device=full_bias.device)
        logits = self._prefill(input_ids, attention)
        for i in range(len(full_k)):
            full_k[i][:, :, :W] = self.k[i][rows]
            full_v[i][:, :, :W] = self.v[i][rows]
        full_bias[..., :W] = self.bias[rows]
        self.k, self.v, self.bias = full_k, full_v, full_bias
        self._next_position = self._next_position[rows]
        return logits[rows]

    def _prefill(self, input_ids: Tensor, attention: Tensor) -> Tensor:
        B, W = input_ids.shape
        valid = attention.bool()
        self.bias[:, 0, 0, :W].masked_fill_(valid, 0.0)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(W, W, dtype=torch.bool, device=input_ids.device).tril()
        # padded queries may see themselves, so no attention row is empty (their outputs are never used)
        mask = (causal & valid[:, None, None, :]) | torch.eye(W, dtype=torch.bool, device=input_ids.device)
        self._next_position = positions[:, -1:] + 1
        return self._forward(input_ids, positions, mask)

    def keep(self, rows: Tensor) -> None:
        """Drop every row not in `rows` (finished ones) from the KV buffer."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]
        self.bias, self._next_position = self.bias[rows], self._next_position[rows]

    def step(self, tokens: Tensor, live: Tensor,
             draw: tuple[float, Tensor] | None = None) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """Feed one token per row (`live` rows are real); returns the next logits [B, V]. Compiled decoders also
        take `draw` = (temperature, uniforms [B, 1]) and return the drawn (token, log-prob, entropy) instead."""
        self.bias[:, 0, 0, self.length].masked_fill_(live, 0.0)
        positions = self._next_position
        self._next_position = positions + 1
        if self.compiled:
            t = torch.tensor([self.length], device=tokens.device)
            self.length += 1
            args = (tokens.unsqueeze(-1), positions, t, self.k, self.v, self.bias, self.layers, self.embed,
                    self.norm_w, self.lm_head, self.cos_table, self.sin_table, self.heads, self.kv_heads,
                    self.head_dim, self.eps, self.scaling)
            try:
                if draw is not None:
                    return _compiled_step(fused_draw=True)(*args, temperature=draw[0], uniform=draw[1])
                return _compiled_step()(*args)
            except Exception as e:  # noqa: BLE001  (inductor needs a working C++ compiler, among other things)
                raise OutriderError(f"policy.compile: torch.compile of the decoding step failed "
                                    f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); set policy.compile: "
                                    "false") from e
        return self._forward(tokens.unsqueeze(-1), positions, None)
