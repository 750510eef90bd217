"""A lean decoding step for Llama-family HF models (llama, qwen2, mistral): the same math as the HF forward with
the per-token overhead removed — fused q/k/v and gate/up projections, a preallocated static KV buffer written in
place, one attention call per layer, and no cache objects or mask builders in the loop. On x86 CPUs in float32
the glue between the matmuls (RoPE, KV write and attention; residual add and RMSNorm; silu·up) runs as small C
kernels (`outrider.policy.native`), where the machine's compiler builds them.

It reads the HF model's own weights (rebuilt per sampling call, so it always sees the current policy) and uses the
model's own rotary-embedding module, so RoPE variants the config selects are honoured. Anything else (other
architectures, sliding windows, non-SiLU MLPs) falls back to the HF path.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from outrider.errors import OutriderError
from outrider.policy import native, onednn
from outrider.policy.adapters import effective_weight
from outrider.policy.kept_memory import KV_STORAGE, PACKS
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
    # LoRA on the projections is folded in (`effective_weight`); on the embeddings or LM head it is not
    if any(hasattr(m, "lora_A") or hasattr(m, "lora_embedding_A")
           for m in (model.get_input_embeddings(), model.get_output_embeddings())):
        return False
    # RoPE tables are built once per sampling call: a rotary that rescales with the sequence length cannot be
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    return rope.get("rope_type", rope.get("type", "default")) != "dynamic"


def _rms(x: Tensor, weight: Tensor | None, eps: float | Tensor) -> Tensor:
    """RMSNorm. With `weight` None (fp32: the decoder folded weight·√H into the next projection) the unit form
    x / sqrt(‖x‖² + H·ε) = x·rsqrt(mean(x²) + ε)/√H, with `eps` the tensor sqrt(H·ε): three cheap ops where the
    fused CPU kernel runs five. Else the HF formula (float32 statistics, weight applied after the cast back)."""
    if weight is None:
        return x / torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), eps)
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling: float) -> Tensor:
    """softmax(q kᵀ·scaling + mask) v for q [B, H, S, D] and k, v [B, kv, T, D] (H a multiple of kv; query
    head h reads key head h // (H/kv), as HF's repeat_kv), `mask` additive [B, 1, S, T] or None; returns
    [B, S, H, D]. Two batched matmuls with the query heads of a key head stacked along the query axis, so
    grouped-query keys are never repeated; at these sizes faster on CPU than SDPA's kernel (a single query:
    about 2×; prefills of 16-64 prompts of 17-30 tokens: 1.7-2.9×)."""
    B, H, S, D = q.shape
    kv, T = k.shape[1], k.shape[2]
    scores = torch.matmul(q.reshape(B, kv, H // kv * S, D), k.transpose(-1, -2))
    if scaling != 1.0:
        scores.mul_(scaling)
    if mask is not None:
        scores.view(B, kv, H // kv, S, T).add_(mask.unsqueeze(1))
    return torch.matmul(torch.softmax(scores, dim=-1), v).view(B, H, S, D).transpose(1, 2)


# above this many attention scores (B·H·S·T) a prefill takes SDPA's kernel, which never holds them all
DENSE_ATTENTION_MAX = 2 ** 22
# prefills of up to this many positions per row take the C kernel where it is built (longer ones: the matmuls)
FUSED_PREFILL_MAX = 128
# a prefill runs its rows in blocks whose widest activation (rows × positions × widest projection) fits this
PREFILL_BLOCK_BYTES = 2 ** 21


def _torch_attention(qkv: Tensor, cos: Tensor, sin: Tensor, t: Tensor | slice, end: int, keys: Tensor,
                     values: Tensor, mask: Tensor | None, first: int, heads: int, kv_heads: int, head_dim: int,
                     scaling: float) -> Tensor:
    """A layer's RoPE, KV write and attention in PyTorch ops: `qkv` [B, S, ·] at slots `t` of `keys`/`values`
    [B, kv, L, D], queries `first`.. of them attending over slots [0, end) under `mask` [B, 1, S, end]; returns
    [B, S - first, H, D]. Attention is `_attend`'s two matmuls, or SDPA's kernel for a prefill too long to
    hold its scores."""
    B, S = qkv.shape[:2]
    q_size, kv_size, half = heads * head_dim, kv_heads * head_dim, head_dim // 2
    qk = qkv[..., :q_size + kv_size].view(B, S, heads + kv_heads, head_dim)
    # rotate_half(x)·sin == (x with its halves swapped) · (the table's sin, first half negated)
    qk = torch.addcmul(qk * cos, torch.cat((qk[..., half:], qk[..., :half]), dim=-1), sin)
    new_k = qk[:, :, heads:].transpose(1, 2)
    new_v = qkv[..., q_size + kv_size:].view(B, S, kv_heads, head_dim).transpose(1, 2)
    if isinstance(t, slice):  # eager: a slice write is the cheaper op
        keys[:, :, t], values[:, :, t] = new_k, new_v
    else:  # compiled: the slot is a tensor, so the graph does not depend on the step
        keys.index_copy_(2, t, new_k)
        values.index_copy_(2, t, new_v)
    q = qk[:, first:, :heads].transpose(1, 2)
    k, v = keys[:, :, :end], values[:, :, :end]
    if mask is not None and first:
        mask = mask[:, :, first:]
    if B * heads * (S - first) * end <= DENSE_ATTENTION_MAX:
        return _attend(q, k, v, mask, scaling)
    if kv_heads != heads:
        k, v = k.repeat_interleave(heads // kv_heads, dim=1), v.repeat_interleave(heads // kv_heads, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling).transpose(1, 2)


def _add_rms(h: Tensor, y: Tensor | None, weight: Tensor | None, eps: float | Tensor, kernels) -> Tensor:
    """`h += y` in place (h is the forward's own residual stream, so no fresh multi-MB buffer in a prefill; y None:
    no add), then `_rms(h)`; through the C kernel where `kernels` is given (float32, folded norms: `eps` is then
    the float sqrt(H·ε))."""
    if kernels is not None:
        return native.add_rms(kernels, h, y, eps * eps)
    if y is not None:
        h += y
    return _rms(h, weight, eps)


def _silu_mul(gate_up: Tensor, kernels) -> Tensor:
    if kernels is not None:
        return native.silu_mul(kernels, gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate, inplace=True).mul_(up)


def _run_layers(ids: Tensor, positions: Tensor, t: Tensor | slice, end: int, keys: list[Tensor],
                values: list[Tensor], mask: Tensor | None, layers: list[tuple], embed: Tensor,
                norm_w: Tensor, lm_head: Tensor, cos_table: Tensor, sin_table: Tensor, heads: int, kv_heads: int,
                head_dim: int, eps: float | Tensor, scaling: float, linear=F.linear, kernels=None) -> Tensor:
    """The model on `ids` [B, S] at `positions`, writing their keys/values at slots `t` of the buffers `keys`/
    `values` (per layer [B, kv, L, D]) and attending over slots [0, end) under the additive `mask` [B, 1, S, end]
    (None: every slot is visible): the written part when eager, the whole buffer when compiled. Returns the
    last position's logits [B, V].

    RoPE comes from tables and is applied to q and k together. Free of Python state, so `torch.compile` takes it
    as is: with whole buffers every shape is fixed, and one graph serves every step. `linear(x, w, b)` computes
    every projection (the eager decoder passes oneDNN's, on weights it packed). With `kernels`
    (`native.kernels()`; eager float32 CPU steps with folded norms, slots a slice) the glue between the matmuls
    runs as C kernels: attention (causal, so `mask` is then the additive key bias [B, L] or None), residual
    add + norm, and silu·up."""
    B, S = ids.shape
    if kernels is None:
        cos, sin = cos_table[positions].unsqueeze(2), sin_table[positions].unsqueeze(2)
    h = F.embedding(ids, embed)
    x = _add_rms(h, None, layers[0][0], eps, kernels)
    for i, (_, w_qkv, b_qkv, w_o, b_o, w_post, w_gu, w_down) in enumerate(layers):
        qkv = linear(x, w_qkv, b_qkv)
        # past the last layer's keys and values only the last position's output is read: a prefill runs the
        # rest of that layer (attention, o, MLP) for one query per row
        first = S - 1 if S > 1 and i == len(layers) - 1 else 0
        if kernels is not None:
            att = native.attention(kernels, qkv, cos_table, sin_table, positions, keys[i], values[i], mask,
                                   t.start, first, heads, scaling)
        else:
            att = _torch_attention(qkv, cos, sin, t, end, keys[i], values[i], mask, first, heads, kv_heads,
                                   head_dim, scaling)
        if first:
            h, S = h[:, -1:].contiguous(), 1
        x = _add_rms(h, linear(att.reshape(B, S, heads * head_dim), w_o, b_o), w_post, eps, kernels)
        y = linear(_silu_mul(linear(x, w_gu), kernels), w_down)
        x = _add_rms(h, y, layers[i + 1][0] if i + 1 < len(layers) else norm_w, eps, kernels)
    return linear(x[:, -1], lm_head)


def _decode_and_draw(*args, temperature: float, uniform: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`_run_layers` followed by the plain draw at `temperature` (token, log-prob, entropy), so the draw's
    vocab-sized ops fuse into the same compiled graph."""
    return draw_with_stats(_run_layers(*args), temperature, uniform)


_COMPILED: dict[str, object] = {}


def _compiled_step(fused_draw: bool = False):
    name = "decode_and_draw" if fused_draw else "decode"
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(_decode_and_draw if fused_draw else _run_layers, dynamic=False)
    return _COMPILED[name]


class FastDecoder:
    """Prefill a left-padded batch once, then decode one token per call against a static KV buffer.

    RoPE tables are built once per call, from the model's own rotary module at every position the call can reach.
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
        dtype, device = self.embed.dtype, self.embed.device
        # eager steps multiply through oneDNN on weights packed once per call, where the call multiplies enough
        # rows (at most batch × max_len) to repay the packing (see onednn.py); the compiled step keeps F.linear,
        # which inductor lowers itself
        packs = not compiled and device.type == "cpu" and onednn.available(dtype)
        self.linear = onednn.linear if packs else F.linear
        packed: list[Tensor] = []

        def prepared(w: Tensor) -> Tensor:
            if packs and onednn.pays(w, batch * max_len):
                packed.append(PACKS.pack(w, batch))
                return packed[-1]
            return w

        fold = dtype == torch.float32
        self.layers, self.widest = [], 0
        for layer in core.layers:
            att, mlp = layer.self_attn, layer.mlp
            projections = (att.q_proj, att.k_proj, att.v_proj)
            # torch.cat copies: the fused weights are the decoder's own, and the fold below works on them in place
            w_qkv = torch.cat([effective_weight(p) for p in projections])
            b_qkv = (torch.cat([p.bias if p.bias is not None else torch.zeros(p.out_features, dtype=w_qkv.dtype,
                                                                               device=w_qkv.device)
                                for p in projections]) if any(p.bias is not None for p in projections) else None)
            w_gu = torch.cat([effective_weight(mlp.gate_proj), effective_weight(mlp.up_proj)])
            w_in, w_post = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
            if fold:
                self._fold_into(w_qkv, b_qkv, w_in, w_gu, w_post, cfg.hidden_size)
                w_in = w_post = None
            self.widest = max(self.widest, w_qkv.shape[0], w_gu.shape[0])
            # packed layer by layer, as they are fused: each fused copy is freed before the next layer's is made,
            # so they reuse one another's memory instead of faulting in new pages (11 MB of them on the 4.2M model)
            self.layers.append((w_in, prepared(w_qkv), b_qkv, prepared(effective_weight(att.o_proj)), att.o_proj.bias,
                                w_post, prepared(w_gu), prepared(effective_weight(mlp.down_proj))))
            del w_qkv, w_gu
        if fold:
            self._fold_final_norm_and_scale(cfg.hidden_size)
        self.lm_head = prepared(self.lm_head)
        if packed:  # their memory goes to the next decoder's packs (kept_memory.PackRecycler)
            weakref.finalize(self, PACKS.keep, packed)
        # eager float32 steps on CPU run the glue between the matmuls as C kernels, where they build
        self._native = None if compiled or device.type != "cpu" or dtype != torch.float32 else native.kernels()
        shape = (batch, self.kv_heads, max_len, self.head_dim)
        # eager steps read only written slots ([:length]); the compiled step reads the whole buffer under a
        # mask, and a masked NaN of uninitialised memory would still poison its weighted sum: zeros there
        if compiled:
            self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
            self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        else:
            per = batch * self.kv_heads * max_len * self.head_dim
            flat = KV_STORAGE.take(2 * len(self.layers) * per, dtype, device)
            weakref.finalize(self, KV_STORAGE.give_back, flat)  # when this decoder goes (end of its call)
            views = flat.view(2 * len(self.layers), *shape).unbind(0)
            self.k, self.v = list(views[:len(self.layers)]), list(views[len(self.layers):])
        # additive attention bias over the buffer: 0 where a key is real, -inf for padding and unwritten slots
        # (eager steps read only written slots, so there every slot past the prompts is 0 from the start)
        self.bias = torch.full((batch, 1, 1, max_len), float("-inf") if compiled else 0.0, dtype=dtype,
                               device=device)
        self.length = 0
        positions = torch.arange(max_len, device=device)[None]
        cos, sin = core.rotary_emb(self.embed[:1][None], positions)
        half = self.head_dim // 2
        self.cos_table, self.sin_table = cos[0], torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)

    def _fold_into(self, w_qkv: Tensor, b_qkv: Tensor | None, w_in: Tensor, w_gu: Tensor, w_post: Tensor,
                   hidden: int) -> None:
        """Fold a layer's RMSNorm weights (and √H) into the fused projections after them, and the attention scale
        1/√D into the query rows of W_qkv (and their bias), in place: linear(w ⊙ n, W) = linear(n, W·diag(w)), and
        RoPE is linear, so scaling q before it is scaling the scores. Saves the weight multiply of every norm and
        the scores' scaling per layer; same math up to rounding."""
        root_h, q_size = hidden ** 0.5, self.heads * self.head_dim
        w_qkv.mul_((w_in * root_h)[None])
        w_qkv[:q_size] *= self.scaling
        if b_qkv is not None:
            b_qkv[:q_size] *= self.scaling
        w_gu.mul_((w_post * root_h)[None])

    def _fold_final_norm_and_scale(self, hidden: int) -> None:
        """The final norm's weight into the LM head (a new tensor: the model's own is never written); the norms
        are then the unit x / hypot(‖x‖, √(Hε)) and the attention unscaled."""
        self.lm_head = self.lm_head * (self.norm_w * hidden ** 0.5)[None]
        self.norm_w, self.scaling = None, 1.0
        self.root_h_eps = (hidden * self.eps) ** 0.5
        self.eps = torch.tensor(self.root_h_eps, dtype=self.embed.dtype, device=self.embed.device)

    def _forward(self, ids: Tensor, positions: Tensor, mask: Tensor | None, block: int | None = None) -> Tensor:
        """Eager: the model on `ids` at the next slots, attending over the buffer written so far (under `mask`,
        or, through the C kernels, under the key bias of padded prompts). `block` rows at a time (None: all)."""
        start, end = self.length, self.length + ids.shape[1]
        self.length = end
        kernels = self._native if self._uses_kernels(ids.shape[1]) else None
        if kernels is not None:
            mask = self.bias.view(self.bias.shape[0], -1) if self.padded else None
        # the kernels take ε as a float
        weights = self._weights(eps=self.root_h_eps if kernels is not None else self.eps)
        if block is None or block >= ids.shape[0]:
            return _run_layers(ids, positions, slice(start, end), end, self.k, self.v, mask, *weights,
                               linear=self.linear, kernels=kernels)
        return torch.cat([_run_layers(ids[r], positions[r], slice(start, end), end, [k[r] for k in self.k],
                                      [v[r] for v in self.v], None if mask is None else mask[r], *weights,
                                      linear=self.linear, kernels=kernels)
                          for r in (slice(i, i + block) for i in range(0, ids.shape[0], block))])

    def _uses_kernels(self, positions_per_row: int) -> bool:
        return self._native is not None and positions_per_row <= FUSED_PREFILL_MAX

    def _weights(self, eps: float | Tensor | None = None) -> tuple:
        return (self.layers, self.embed, self.norm_w, self.lm_head, self.cos_table, self.sin_table, self.heads,
                self.kv_heads, self.head_dim, self.eps if eps is None else eps, self.scaling)

    def prefill(self, input_ids: Tensor, attention: Tensor, rows: Tensor | None = None) -> Tensor:
        """`input_ids` [U, W] left-padded, `attention` [U, W]; returns the last position's logits [B, V].
        `rows` [B] names each batch row's prompt (None: U = B, row i is prompt i); each prompt is computed once."""
        # eager steps read only written slots, and a finished row's keys matter to nobody (its outputs are
        # dropped): only the prompts' padding needs a mask, and none at all when no prompt is padded
        self.padded = not bool(attention.bool().all())
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
        self.bias[:, 0, 0, :W] = torch.zeros_like(self.bias[:, 0, 0, :W]).masked_fill_(~valid, float("-inf"))
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        self._next_position = positions[:, -1:] + 1
        # a prefill's activations are rows × W × the widest projection: in blocks of rows, each block's fit the
        # allocator's reused memory instead of fresh pages (page faults; see docs/benchmarks.md)
        block = max(1, PREFILL_BLOCK_BYTES // (W * self.widest * self.embed.element_size()))
        if self._uses_kernels(W):  # the attention kernel is causal and reads self.bias
            return self._forward(input_ids, positions, None, block)
        causal = torch.ones(W, W, dtype=torch.bool, device=input_ids.device).tril()
        # padded queries may see themselves, so no attention row is empty (their outputs are never used)
        allowed = (causal & valid[:, None, None, :]) | torch.eye(W, dtype=torch.bool, device=input_ids.device)
        mask = torch.zeros(allowed.shape, dtype=self.bias.dtype, device=input_ids.device)
        mask.masked_fill_(~allowed, float("-inf"))
        return self._forward(input_ids, positions, mask, block)

    def keep(self, rows: Tensor) -> None:
        """Drop every row not in `rows` (finished ones) from the KV buffer."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]
        self.bias, self._next_position = self.bias[rows], self._next_position[rows]

    def step(self, tokens: Tensor, live: Tensor,
             draw: tuple[float, Tensor] | None = None) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """Feed one token per row (`live` rows are real); returns the next logits [B, V]. Compiled decoders also
        take `draw` = (temperature, uniforms [B, 1]) and return the drawn (token, log-prob, entropy) instead."""
        positions = self._next_position
        self._next_position = positions + 1
        if self.compiled:  # reads the whole buffer: unmask the slot written now
            self.bias[:, 0, 0, self.length].masked_fill_(live, 0.0)
            t = torch.tensor([self.length], device=tokens.device)
            self.length += 1
            args = (tokens.unsqueeze(-1), positions, t, self.bias.shape[-1], self.k, self.v, self.bias,
                    *self._weights())
            try:
                if draw is not None:
                    return _compiled_step(fused_draw=True)(*args, temperature=draw[0], uniform=draw[1])
                return _compiled_step()(*args)
            except Exception as e:  # noqa: BLE001  (inductor needs a working C++ compiler, among other things)
                raise OutriderError(f"policy.compile: torch.compile of the decoding step failed "
                                    f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); set policy.compile: "
                                    "false") from e
        return self._forward(tokens.unsqueeze(-1), positions,
                             self.bias[..., :self.length + 1] if self.padded else None)
